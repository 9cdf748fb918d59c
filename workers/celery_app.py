"""The workers' Celery app: broker and routes from service.queue, plus the delivery
guarantees a worker needs. Start one from the repository root with

    python -m celery -A workers.celery_app worker -Q preprocess          # CPU
    python -m celery -A workers.celery_app worker -Q finetune -c 1       # one per GPU
    python -m celery -A workers.celery_app worker -Q reenact -c 2        # Triton clients
    python -m celery -A workers.celery_app worker -Q events              # webhooks, upkeep
    python -m celery -A workers.celery_app beat                          # exactly one

(beat publishes the webhook sweep and the cleanup; on a single node `worker -B` runs it.)

(`python -m` keeps the root on sys.path, where the stages import model/ and training/.)

Importing this module loads no torch; tasks import it lazily (workers.tasks via `include`).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from service.config import Settings, get_settings
from service.queue import (
    CLEANUP_TASK,
    FINETUNE_TASK,
    PREPROCESS_TASK,
    REENACT_TASK,
    REQUEUE_TASK,
    WEBHOOK_SWEEP_TASK,
    WEBHOOK_TASK,
    create_celery,
)


def _limits(hard_s: int) -> dict[str, Any]:
    """Hard and soft time limits; the soft one lets the task record a typed failure first."""
    return {"time_limit": hard_s, "soft_time_limit": max(1, hard_s - max(10, hard_s // 20))}


REQUEUE_INTERVAL_S = 60.0  # how often stalled queued jobs are looked for


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Beat's periodic tasks; a run not started within one interval expires (the next one
    does the same work), so a backlog never piles up behind a missing events worker."""
    every = {
        WEBHOOK_SWEEP_TASK: settings.webhook_sweep_interval_s,
        CLEANUP_TASK: settings.cleanup_interval_s,
        REQUEUE_TASK: REQUEUE_INTERVAL_S,
    }
    return {
        name: {"task": name, "schedule": interval, "options": {"expires": interval}}
        for name, interval in every.items()
    }


def create_worker_app(settings: Settings) -> Celery:
    """The Celery app for `settings`, with the worker-side options."""
    app = create_celery(settings, main="workers")
    app.conf.update(
        include=["workers.tasks"],
        # Acknowledge after the task ran: a worker that dies mid-task (OOM, SIGKILL, lost
        # node) leaves its message to be redelivered, and the job resumes elsewhere.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Long GPU tasks: never hold a second message hostage behind a running one.
        worker_prefetch_multiplier=1,
        # On a broker reconnect the unacked message is redelivered anyway; stop the running
        # copy instead of doing the work twice.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        task_annotations={
            PREPROCESS_TASK: _limits(settings.preprocess_time_limit_s),
            FINETUNE_TASK: _limits(settings.finetune_time_limit_s),
            REENACT_TASK: _limits(settings.reenact_time_limit_s),
            # A receiver that trickles bytes never trips the per-read socket timeout; this
            # bounds the whole attempt (the row's claim then lapses and the sweep resends).
            WEBHOOK_TASK: _limits(int(3 * settings.webhook_timeout_s) + 30),
        },
        beat_schedule=beat_schedule(settings),
    )
    return app


app = create_worker_app(get_settings())
