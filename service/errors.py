"""One error shape for every response: `{"error": {"code", "message", "details"}}`.

Client faults are 4xx with a stable `code`; a dependency that is down is 503 with Retry-After;
anything unexpected is a logged 500 `internal_error` that reveals nothing of the internals.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.blobs import StorageUnavailable
from service.triton import TritonError

logger = logging.getLogger(__name__)

# Codes for errors Starlette raises itself (unknown route, wrong method, ...).
_HTTP_CODES: Final[Mapping[int, str]] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable reason, e.g. `not_found`.")
    message: str = Field(description="What went wrong, for a person.")
    details: Any = Field(None, description="Structured context; shape depends on `code`.")


class ErrorResponse(BaseModel):
    """The body of every non-2xx response."""

    error: ErrorInfo


class ApiError(Exception):
    """Raise anywhere in a request to answer with this status and a typed error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = dict(headers or {})


def unavailable(code: str, message: str, retry_after_s: int, details: Any = None) -> ApiError:
    """A 503 for a dependency that is down, telling the client when to try again."""
    return ApiError(503, code, message, details, {"Retry-After": str(retry_after_s)})


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def error_example(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """An OpenAPI `responses` entry showing the error body."""
    example = {"error": {"code": code, "message": message, "details": details}}
    return {"model": ErrorResponse, "content": {"application/json": {"example": example}}}


def error_examples(*errors: ApiError, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An OpenAPI `responses` entry for several errors of one status (named by code), with
    response headers as {name: description}."""
    examples = {
        e.code: {"value": {"error": {"code": e.code, "message": e.message, "details": e.details}}}
        for e in errors
    }
    entry: dict[str, Any] = {
        "model": ErrorResponse,
        "content": {"application/json": {"examples": examples}},
    }
    if headers:
        entry["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return entry


def validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic errors made JSON-safe: where, what, why; the rejected input is left out (it
    may be a whole upload or a secret)."""
    details = []
    for err in errors:
        item: dict[str, Any] = {
            "loc": [p if isinstance(p, int | str) else str(p) for p in err.get("loc", ())],
            "type": str(err.get("type", "")),
            "msg": str(err.get("msg", "")),
        }
        if ctx := err.get("ctx"):
            item["ctx"] = {
                str(k): v if isinstance(v, bool | int | float | str | None) else str(v)
                for k, v in ctx.items()
            }
        details.append(item)
    return details


def _retry_after(request: Request) -> int:
    settings = getattr(request.app.state, "settings", None)
    return int(getattr(settings, "retry_after_s", 5))


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = validation_details(exc.errors())
    return error_response(422, "invalid_request", "the request is not valid", details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _HTTP_CODES.get(status, "http_error" if status < 500 else "server_error")
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    return error_response(status, code, message, None, exc.headers)


async def _database_down(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("database unavailable: %s", exc)
    err = unavailable("database_unavailable", "the database is unavailable", _retry_after(request))
    return await _api_error(request, err)


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("redis unavailable: %s", exc)
    err = unavailable("queue_unavailable", "the job queue is unavailable", _retry_after(request))
    return await _api_error(request, err)


async def _storage_down(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("storage unavailable: %s", exc)
    err = unavailable("storage_unavailable", "the file store is unavailable", _retry_after(request))
    return await _api_error(request, err)


async def _triton_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TritonError)
    if exc.retryable:
        logger.warning("inference unavailable: %s", exc)
        err = unavailable(exc.code, "the inference server is unavailable", _retry_after(request))
        return await _api_error(request, err)
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Render every error as `ErrorResponse`."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(TritonError, _triton_error)
    app.add_exception_handler(StorageUnavailable, _storage_down)
    app.add_exception_handler(Exception, _unexpected)
