"""Celery tasks: thin wrappers that pass a job id to its stage (ids only, never bytes).

Routing (queues) and delivery (acks_late, time limits) are configured in workers.celery_app
and service.queue; retries and idempotency live in workers.runtime.run_task.
"""

from __future__ import annotations

from celery import Task

from service.queue import (
    CLEANUP_TASK,
    EVENTS_QUEUE,
    FINETUNE_QUEUE,
    FINETUNE_TASK,
    PREPROCESS_QUEUE,
    PREPROCESS_TASK,
    REENACT_QUEUE,
    REENACT_TASK,
    REQUEUE_TASK,
    WEBHOOK_SWEEP_TASK,
    WEBHOOK_TASK,
)
from workers import maintenance, webhooks
from workers.celery_app import app
from workers.preprocess import preprocess_job
from workers.runtime import default_context, run_task


# max_retries=None: run_task bounds retries itself (transient: task_max_retries; busy: none).
@app.task(name=PREPROCESS_TASK, bind=True, queue=PREPROCESS_QUEUE, max_retries=None)
def preprocess(self: Task, job_id: str) -> None:
    """Photos -> crops, masks and the zero-shot identity; hands fine-tune jobs on."""
    run_task(self, job_id, preprocess_job)
    webhooks.dispatch_job_events(default_context(self.app), job_id)


@app.task(name=FINETUNE_TASK, bind=True, queue=FINETUNE_QUEUE, max_retries=None)
def finetune(self: Task, job_id: str) -> None:
    """Fine-tune the avatar (torch is imported by the stage, on first use)."""
    from workers.finetune import finetune_job

    run_task(self, job_id, finetune_job)
    webhooks.dispatch_job_events(default_context(self.app), job_id)


# --- events queue: webhooks and upkeep (beat publishes the periodic ones) --------------------


@app.task(name=WEBHOOK_TASK, bind=True, queue=EVENTS_QUEUE, max_retries=None)
def deliver_webhook(self: Task, delivery_id: str) -> None:
    """One attempt at a webhook delivery; the row bounds the retries (webhook_max_attempts)."""
    attempt = webhooks.deliver(default_context(self.app), delivery_id)
    if attempt.retry_in is not None:
        raise self.retry(countdown=attempt.retry_in)


@app.task(name=WEBHOOK_SWEEP_TASK, bind=True, queue=EVENTS_QUEUE)
def sweep_webhooks(self: Task) -> int:
    """Publish due webhook deliveries (new ones from the API, lost retries)."""
    return len(webhooks.sweep(default_context(self.app)))


@app.task(name=CLEANUP_TASK, bind=True, queue=EVENTS_QUEUE)
def cleanup(self: Task) -> None:
    """Expire old results, remove stale uploads and old webhook rows."""
    maintenance.cleanup(default_context(self.app))


@app.task(name=REENACT_TASK, bind=True, queue=REENACT_QUEUE, max_retries=None)
def reenact(self: Task, job_id: str) -> None:
    """Every job of the reenact (GPU) queue, by kind: a reenactment (driver video or pose
    track), a pose track's encoding, or a pose-space render."""
    from workers.pose_tracks import run_reenact_queue_job, sync_track_status

    run_task(self, job_id, run_reenact_queue_job)
    sync_track_status(default_context(self.app), job_id)
    webhooks.dispatch_job_events(default_context(self.app), job_id)


@app.task(name=REQUEUE_TASK, bind=True, queue=EVENTS_QUEUE)
def requeue_stalled(self: Task) -> int:
    """Publish again queued jobs whose message was lost (beat, every minute)."""
    return len(maintenance.requeue_stalled(default_context(self.app)))
