"""Request dependencies (Annotated + Depends): settings, a database session, the caller, the
artifact store and the task queue.

Tests replace any of them with `app.dependency_overrides[get_settings] = ...`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Request, Security
from fastapi.requests import HTTPConnection
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from service.auth import AuthenticationError, Principal, authenticate
from service.config import MAX_REQUEST_SESSIONS, Settings
from service.db import session_scope
from service.errors import ApiError
from service.queue import TaskQueue
from service.ratelimit import enforce_rate_limit
from service.signing import UrlSigner
from service.storage import ArtifactStore
from service.triton import TritonBackend

# Declares the scheme in OpenAPI (the docs' Authorize button); the header is parsed by
# service.auth so that every failure gets the same typed 401.
_bearer = HTTPBearer(
    auto_error=False, scheme_name="ApiKey", description="`Authorization: Bearer lpd_...`"
)


def get_settings(request: Request) -> Settings:
    """The Settings the app was created with (`create_app(settings)`)."""
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for this request: committed after the endpoint returns, rolled back if it
    raises.

    At most MAX_REQUEST_SESSIONS run at once (more wait, without a thread), fewer than the
    connection pool holds. A sync endpoint's session keeps its connection through a second
    thread-pool turn (FastAPI validates the response in one); unbounded, 200 concurrent
    pollers filled the pool with sessions waiting for threads while every thread waited for
    a connection (30 s pool timeouts). The commit runs in a thread of its own small
    limiter (`app.state.teardown_limiter`), off the event loop and off the pool endpoints
    wait on.
    """
    sessions: sessionmaker[Session] = request.app.state.sessions
    limiter: anyio.CapacityLimiter = request.app.state.teardown_limiter
    session = sessions()
    try:
        yield session
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_end, session, False, limiter=limiter)
        raise
    await anyio.to_thread.run_sync(_end, session, True, limiter=limiter)


def _end(session: Session, commit: bool) -> None:
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[
    Session, Depends(get_session, scope="function", max_concurrency=MAX_REQUEST_SESSIONS)
]


def get_principal(
    request: Request,
    settings: SettingsDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    """The authenticated caller; 401 `unauthorized` with `WWW-Authenticate: Bearer` if none.

    Also counts the request against the key's rate limit (429 `rate_limited`): done here, so
    that no authenticated route can forget it.
    """
    sessions: sessionmaker[Session] = request.app.state.sessions
    try:
        # A session of its own, closed here: no connection is held until the endpoint runs.
        with session_scope(sessions) as session:
            principal = authenticate(session, request.headers.get("Authorization"))
    except AuthenticationError as exc:
        raise ApiError(
            401, "unauthorized", str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from None
    enforce_rate_limit(request, principal, settings)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_store(request: Request) -> ArtifactStore:
    """Where avatars' files live (`settings.artifacts_dir`)."""
    store: ArtifactStore = request.app.state.store
    return store


def get_queue(request: Request) -> TaskQueue:
    """The task queue the API publishes to (Celery over Redis; tests pass a recorder)."""
    queue: TaskQueue = request.app.state.queue
    return queue


def get_sessions(request: Request) -> sessionmaker[Session]:
    """The session factory, for routes that must commit before they act (e.g. enqueue)."""
    sessions: sessionmaker[Session] = request.app.state.sessions
    return sessions


def get_signer(request: Request) -> UrlSigner | None:
    """Signs result links; None when no `signed_url_secret` is configured."""
    signer: UrlSigner | None = request.app.state.signer
    return signer


StoreDep = Annotated[ArtifactStore, Depends(get_store)]
SignerDep = Annotated[UrlSigner | None, Depends(get_signer)]
QueueDep = Annotated[TaskQueue, Depends(get_queue)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]


def get_inference(connection: HTTPConnection) -> TritonBackend:
    """The API process's Triton client for live inference (HTTP routes and WebSockets alike);
    tests override it with a fake."""
    backend: TritonBackend = connection.app.state.inference
    return backend


InferenceDep = Annotated[TritonBackend, Depends(get_inference)]
