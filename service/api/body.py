"""JSON request bodies read with a size cap: FastAPI reads a declared body whole before any
check runs, and a render request (thousands of poses) must be refused by its declared or
streamed size, not after it is in memory."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from service.errors import ApiError, validation_details

M = TypeVar("M", bound=BaseModel)


async def read_json(request: Request, max_bytes: int) -> Any:
    """The parsed JSON body: 415 unless `application/json`, 413 `payload_too_large` over
    `max_bytes` (declared or streamed), 422 `invalid_request` if it is not JSON."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the request as application/json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))  # NaN and Infinity parse: routes refuse them typed
    except ValueError:
        raise ApiError(422, "invalid_request", "the body is not valid JSON") from None


def parse(model: type[M], data: Any) -> M:
    """`model` from parsed JSON, or 422 `invalid_request` with pydantic's details."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(
            422, "invalid_request", "the request is not valid", validation_details(exc.errors())
        ) from None


def is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return content_type == "application/json"


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the request may be at most {max_bytes} bytes",
        {"max_bytes": max_bytes},
    )


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its `$defs` inlined, for `openapi_extra`: a body read by
    the route itself registers no nested models under `components`, and `#/$defs/...`
    would point into the OpenAPI document's root."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return dict(inline(schema))
