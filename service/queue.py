"""The task-queue contract shared by the API (producer) and the workers: task names, queues,
routes and the Celery settings both sides must agree on. Tasks are sent by name, so the API
never imports workers/ (nor torch)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Final, Protocol

from celery import Celery

from service.config import QueueName, Settings

PREPROCESS_QUEUE: Final[QueueName] = "preprocess"  # CPU: decode, detect, crop, segment, embed
FINETUNE_QUEUE: Final[QueueName] = "finetune"  # GPU
REENACT_QUEUE: Final[QueueName] = "reenact"  # GPU
# CPU, any worker with the artifacts dir: webhook deliveries and beat's periodic upkeep.
EVENTS_QUEUE: Final[QueueName] = "events"
QUEUES: Final[tuple[QueueName, ...]] = (
    PREPROCESS_QUEUE,
    FINETUNE_QUEUE,
    REENACT_QUEUE,
    EVENTS_QUEUE,
)

PREPROCESS_TASK: Final = "avatars.preprocess"
FINETUNE_TASK: Final = "avatars.finetune"
REENACT_TASK: Final = "reenactments.render"
WEBHOOK_TASK: Final = "webhooks.deliver"
WEBHOOK_SWEEP_TASK: Final = "webhooks.sweep"
CLEANUP_TASK: Final = "maintenance.cleanup"
REQUEUE_TASK: Final = "maintenance.requeue_stalled"
TASK_ROUTES: Final[dict[str, dict[str, str]]] = {
    PREPROCESS_TASK: {"queue": PREPROCESS_QUEUE},
    FINETUNE_TASK: {"queue": FINETUNE_QUEUE},
    WEBHOOK_TASK: {"queue": EVENTS_QUEUE},
    WEBHOOK_SWEEP_TASK: {"queue": EVENTS_QUEUE},
    CLEANUP_TASK: {"queue": EVENTS_QUEUE},
    REQUEUE_TASK: {"queue": EVENTS_QUEUE},
    REENACT_TASK: {"queue": REENACT_QUEUE},
}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Broker, serialization and routing: what producer and consumer must share."""
    timeout = settings.broker_timeout_s
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_routes": TASK_ROUTES,
        # Job state lives in the database; nobody waits on Celery results.
        "task_ignore_result": True,
        "broker_connection_timeout": timeout,
        "broker_transport_options": {
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        },
        "redis_socket_timeout": timeout,
        "redis_socket_connect_timeout": timeout,
        # A request must not hang on a dead broker: a few quick tries, then an error (503).
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
    }


def create_celery(settings: Settings, main: str = "lpd") -> Celery:
    """A Celery app configured for `settings` (no connection is made until it is used)."""
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


class TaskQueue(Protocol):
    """What the API needs from the queue (tests pass a recorder)."""

    def enqueue(self, task: str, job_id: str) -> None: ...

    def workers_per_queue(self, timeout_s: float) -> dict[str, int]: ...


class CeleryQueue:
    """Sends tasks by name through a Celery app and asks workers which queues they consume."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def enqueue(self, task: str, job_id: str) -> None:
        """Publish `task(job_id)` to its routed queue; raises kombu's OperationalError if the
        broker is unreachable."""
        self.app.send_task(task, args=[job_id])

    def workers_per_queue(self, timeout_s: float) -> dict[str, int]:
        """How many live workers consume each queue (broadcast, replies within `timeout_s`)."""
        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout_s)
            inspect = self.app.control.inspect(timeout=timeout_s, connection=conn)
            replies: dict[str, list[dict[str, Any]]] = inspect.active_queues() or {}
        counts = Counter(q["name"] for queues in replies.values() for q in queues)
        return {name: counts.get(name, 0) for name in sorted({*QUEUES, *counts})}
