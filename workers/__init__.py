"""Celery workers: fine-tuning and reenactment jobs, Triton through `service.triton` only."""
