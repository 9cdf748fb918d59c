"""The FastAPI application: `create_app()` wires settings, the database, Redis, the task
queue, the artifact store, the Triton readiness probe, error handlers, request metrics,
routers and the demo page (`/`, from service/static). Run with
`uvicorn --factory service.main:create_app`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)
from redis import Redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.routes import (
    avatars,
    files,
    health,
    jobs,
    models,
    pose_tracks,
    reenactments,
    render,
    stream,
)
from service.config import Settings, get_settings
from service.db import create_db_engine, create_session_factory
from service.errors import ApiError, install_error_handlers
from service.live import LiveStreams
from service.queue import CeleryQueue, create_celery
from service.ratelimit import RateLimiter, RateLimitHeaders
from service.signing import UrlSigner
from service.storage import ArtifactStore
from service.triton import TritonBackend, TritonConfig

API_VERSION = "1.0.0"
TEARDOWN_THREADS = 8
UNMATCHED_ROUTE = "<unmatched>"  # one label for every unknown path, so scans can't add series
STATIC_DIR = Path(__file__).resolve().parent / "static"  # the demo page (no build step)
STATIC_PATH = "/static"
# The page's browser libraries (onnxruntime-web, mediapipe tasks-vision), built by `make web`.
VENDOR_DIR = Path(__file__).resolve().parents[1] / "web" / "dist"
VENDOR_PATH = "/vendor"


class HttpMetrics:
    """Request counter and latency histogram in a registry of the app's own (so that two
    apps in one process, as in tests, don't collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.requests = Counter(
            "lpd_http_requests_total",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lpd_http_request_duration_seconds",
            "Time to the end of the response, by method and route template.",
            ["method", "route"],
            registry=self.registry,
        )


class MetricsMiddleware:
    """Counts and times HTTP requests by route template (`/v1/jobs/{job_id}`), not raw path;
    requests under a mounted app (`mounts`, e.g. `/static`) by the mount's path."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, mounts: Sequence[str] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.mounts = tuple(mounts)

    def _mount(self, path: str) -> str | None:
        # FastAPI's router sets scope["route"] for its routes only, not for a Mount.
        return next((m for m in self.mounts if path.startswith(f"{m}/")), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app raises before sending a response

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The router stores the matched route in the (shared) scope.
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or self._mount(scope["path"]) or UNMATCHED_ROUTE
            method = scope["method"]
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for `settings` (default: `get_settings()`, from the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Clients only: nothing connects until the first request or readiness probe.
        engine = create_db_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
        )
        timeout = settings.readiness_timeout_s
        app.state.engine = engine
        app.state.sessions = create_session_factory(engine)
        # Request sessions commit in threads of their own (service.api.deps.get_session).
        app.state.teardown_limiter = anyio.CapacityLimiter(TEARDOWN_THREADS)
        app.state.redis = Redis.from_url(
            settings.redis_url, socket_connect_timeout=timeout, socket_timeout=timeout
        )
        app.state.rate_limiter = RateLimiter(app.state.redis)
        app.state.triton_probe = TritonBackend(
            TritonConfig.from_settings(settings, timeout_s=timeout, retries=0)
        )
        # Live inference (the stream): the per-attempt deadline of jobs, one quick retry.
        app.state.inference = TritonBackend(TritonConfig.from_settings(settings, retries=1))
        try:
            yield
        finally:
            app.state.inference.close()
            if isinstance(app.state.queue, CeleryQueue):
                app.state.queue.app.close()
            app.state.triton_probe.close()
            app.state.redis.close()
            engine.dispose()

    app = FastAPI(
        title="Latent Pose Reenactment API",
        version=API_VERSION,
        summary="Head reenactment from a few photos (latent pose descriptors, Burkov et al. "
        "CVPR 2020): avatars, reenactment jobs and a live stream.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = ArtifactStore.from_settings(settings)
    app.state.signer = UrlSigner.from_settings(settings)
    # Publishes tasks by name; connects on first use. Tests may swap in a recorder.
    app.state.queue = CeleryQueue(create_celery(settings))
    app.state.metrics = HttpMetrics()
    app.state.live = LiveStreams(app.state.metrics.registry, settings.max_streams_per_tenant)
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(
        MetricsMiddleware, metrics=app.state.metrics, mounts=(STATIC_PATH, VENDOR_PATH)
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(avatars.router)
    app.include_router(jobs.router)
    app.include_router(reenactments.router)
    app.include_router(pose_tracks.router)
    app.include_router(render.router)
    app.include_router(files.router)
    app.include_router(stream.router)
    app.include_router(models.router)
    # The demo page: `/` and `/static/*` are routes too, so metrics label them by template.
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="static")
    if VENDOR_DIR.is_dir():
        app.mount(VENDOR_PATH, StaticFiles(directory=VENDOR_DIR), name="vendor")
    else:

        @app.get(VENDOR_PATH + "/{path:path}", include_in_schema=False)
        def vendor_not_built(path: str) -> None:
            raise ApiError(
                404,
                "web_not_built",
                "the demo page's browser libraries are not built: run `make web`",
            )

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    return app
