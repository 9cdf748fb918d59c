"""Liveness, readiness, Prometheus metrics, and `/v1/me` (proves an API key end to end)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from redis import Redis
from sqlalchemy import Engine, text

from service.api.deps import PrincipalDep, QueueDep, SessionDep, SettingsDep
from service.errors import ApiError, error_example, unavailable
from service.models import ApiKey, Tenant
from service.queue import TaskQueue
from service.triton import TritonBackend

logger = logging.getLogger(__name__)

router = APIRouter()

WORKERS_NOT_CHECKED: Final = "not checked"


# --- schemas ---------------------------------------------------------------------------------


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Each dependency: True if it answered within `readiness_timeout_s`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ok",
                    "checks": {
                        "database": True,
                        "redis": True,
                        "triton": True,
                        "workers": True,
                    },
                    "queues": {"finetune": 1, "preprocess": 2, "reenact": 1},
                }
            ]
        }
    )

    status: Literal["ok"] = "ok"
    checks: dict[str, bool | str]
    queues: dict[str, int] | None = Field(
        None, description="Live workers per queue (when `required_queues` is set)."
    )


@dataclass(frozen=True)
class WorkerCheck:
    ok: bool | str  # True / False, or WORKERS_NOT_CHECKED
    queues: dict[str, int]  # live workers per queue


class TenantInfo(BaseModel):
    id: str
    name: str


class KeyInfo(BaseModel):
    id: str
    name: str
    prefix: str


class Me(BaseModel):
    """The tenant and API key a request authenticated as."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant": {"id": "7d1c0d9e-3f55-4d7a-9a51-0c2f1b3e8a10", "name": "acme"},
                    "key": {
                        "id": "b8e0f6a2-5c1d-4e0b-8f3a-2d9c7e6b5a41",
                        "name": "ci",
                        "prefix": "3fa85f6457b2",
                    },
                }
            ]
        }
    )

    tenant: TenantInfo
    key: KeyInfo


# --- readiness checks ------------------------------------------------------------------------


def check_database(engine: Engine) -> bool:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return True


def check_redis(client: Redis) -> bool:
    return bool(client.ping())


def check_triton(backend: TritonBackend) -> bool:
    return backend.is_ready()  # the server and every model the service calls


def check_workers(queue: TaskQueue, required: Sequence[str], timeout_s: float) -> WorkerCheck:
    """Whether every queue in `required` has at least one live Celery worker.

    Workers are asked which queues they consume (`inspect().active_queues()`, a broadcast
    answered within `timeout_s`). With nothing required it asks nobody: "not checked".
    """
    if not required:
        return WorkerCheck(WORKERS_NOT_CHECKED, {})
    counts = queue.workers_per_queue(timeout_s)
    return WorkerCheck(all(counts.get(name, 0) > 0 for name in required), counts)


async def _within(check: Callable[[], bool], timeout_s: float, name: str) -> bool:
    """Run a blocking check in a thread; an error or a timeout reads as down."""
    try:
        return bool(await asyncio.wait_for(asyncio.to_thread(check), timeout_s))
    except TimeoutError:
        logger.warning("readiness: %s did not answer within %.1fs", name, timeout_s)
    except Exception as exc:
        logger.warning("readiness: %s is down: %s", name, exc)
    return False


async def _workers_within(
    queue: TaskQueue, required: Sequence[str], timeout_s: float
) -> WorkerCheck:
    """check_workers in a thread, bounded like the other checks; a failure reads as down."""
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(check_workers, queue, required, timeout_s), timeout_s + 1.0
        )
    except TimeoutError:
        logger.warning("readiness: workers did not answer within %.1fs", timeout_s)
    except Exception as exc:
        logger.warning("readiness: cannot ask workers: %s", exc)
    return WorkerCheck(False, {})


# --- routes ----------------------------------------------------------------------------------


@router.get("/healthz", tags=["health"], summary="Liveness: the process answers")
def healthz() -> Health:
    """Always 200 while the process serves requests; checks no dependency."""
    return Health()


@router.get(
    "/readyz",
    tags=["health"],
    response_model_exclude_none=True,
    summary="Readiness: database, Redis, Triton and workers answer",
    responses={
        503: error_example(
            "not_ready",
            "not ready: redis, triton, workers down",
            {
                "checks": {
                    "database": True,
                    "redis": False,
                    "triton": False,
                    "workers": False,
                },
                "down": ["redis", "triton", "workers"],
                "queues": {"finetune": 0, "preprocess": 1, "reenact": 0},
                "required_queues": ["preprocess", "finetune", "reenact"],
            },
        )
    },
)
async def readyz(request: Request, settings: SettingsDep, queue: QueueDep) -> Readiness:
    """200 with each check when every dependency answers, else 503 with Retry-After.

    Checks run concurrently, each bounded by `readiness_timeout_s`. `workers` is true when
    each of `required_queues` has a live worker (`queues` counts workers per queue), and
    "not checked" when none is required.
    """
    state = request.app.state
    timeout = settings.readiness_timeout_s
    names = ("database", "redis", "triton")
    *results, workers = await asyncio.gather(
        _within(lambda: check_database(state.engine), timeout, "database"),
        _within(lambda: check_redis(state.redis), timeout, "redis"),
        _within(lambda: check_triton(state.triton_probe), timeout, "triton"),
        # A broadcast: it waits out the whole timeout for replies, so run it alongside.
        _workers_within(queue, settings.required_queues, timeout),
    )
    checks: dict[str, bool | str] = dict(zip(names, results, strict=True))
    checks["workers"] = workers.ok
    down = [name for name, ok in checks.items() if ok is False]
    if down:
        details: dict[str, Any] = {"checks": checks, "down": down}
        if settings.required_queues:
            details["queues"] = workers.queues
            details["required_queues"] = list(settings.required_queues)
        raise unavailable(
            "not_ready", f"not ready: {', '.join(down)} down", settings.retry_after_s, details
        )
    return Readiness(checks=checks, queues=workers.queues or None)


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
def metrics(request: Request) -> Response:
    """HTTP request counts and latencies by route template, plus process metrics."""
    registry: CollectorRegistry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/v1/me",
    tags=["account"],
    summary="The caller's tenant and API key",
    responses={
        401: error_example("unauthorized", "invalid API key"),
    },
)
def me(principal: PrincipalDep, session: SessionDep) -> Me:
    """Who this API key belongs to; a cheap way to check a key works."""
    tenant = session.get(Tenant, principal.tenant_id)
    key = session.get(ApiKey, principal.key_id)
    if tenant is None or key is None:  # deleted since authenticate() read the key
        raise ApiError(
            401, "unauthorized", "invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )
    return Me(
        tenant=TenantInfo(id=tenant.id, name=tenant.name),
        key=KeyInfo(id=key.id, name=key.name, prefix=key.prefix),
    )
