"""Celery tasks: thin wrappers that pass a job id to its stage (ids only, never bytes).

Routing (queues) and delivery (acks_late, time limits) are configured in workers.celery_app
and service.queue; retries and idempotency live in workers.runtime.run_task.
"""

from __future__ import annotations

from celery import Task

from service.queue import FINETUNE_QUEUE, FINETUNE_TASK, PREPROCESS_QUEUE, PREPROCESS_TASK
from workers.celery_app import app
from workers.preprocess import preprocess_job
from workers.runtime import run_task


# max_retries=None: run_task bounds retries itself (transient: task_max_retries; busy: none).
@app.task(name=PREPROCESS_TASK, bind=True, queue=PREPROCESS_QUEUE, max_retries=None)
def preprocess(self: Task, job_id: str) -> None:
    """Photos -> crops, masks and the zero-shot identity; hands fine-tune jobs on."""
    run_task(self, job_id, preprocess_job)


@app.task(name=FINETUNE_TASK, bind=True, queue=FINETUNE_QUEUE, max_retries=None)
def finetune(self: Task, job_id: str) -> None:
    """Fine-tune the avatar (torch is imported by the stage, on first use)."""
    from workers.finetune import finetune_job

    run_task(self, job_id, finetune_job)
