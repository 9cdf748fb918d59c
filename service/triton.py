"""The Triton client adapter: the only module of the service and workers that imports tritonclient.

One place owns the URL, model and tensor names, dtypes, batching, timeouts and retries, and maps
client errors to typed ones; callers pass numpy in, get numpy out, and depend on `InferenceBackend`.
"""

from __future__ import annotations

import http.client
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar

import numpy as np

from deploy.triton.spec import (
    AVATAR_ID,
    AVATAR_ID_PATTERN,
    FRAMES,
    GENERATOR,
    IDENTITY,
    IDENTITY_ENCODER,
    IMAGES,
    MASK,
    MODELS,
    POSE,
    POSE_ENCODER,
    REENACT,
    RGB,
)

if TYPE_CHECKING:  # the adapter itself depends on no service module
    from service.config import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

# --- the wire contract, client side: the server's names (deploy/triton/spec.py, constants only)

ALL_MODELS: Final = MODELS

UINT8: Final = "UINT8"
FP32: Final = "FP32"
BYTES: Final = "BYTES"

# model -> (inputs, outputs) as {tensor name: Triton datatype}. IDENTITY and AVATAR_ID are
# alternatives for the generator and reenact models: a model must accept at least one of them.
_CONTRACT: Final[dict[str, tuple[dict[str, str], dict[str, str]]]] = {
    IDENTITY_ENCODER: ({IMAGES: UINT8}, {IDENTITY: FP32}),
    POSE_ENCODER: ({FRAMES: UINT8}, {POSE: FP32}),
    GENERATOR: ({POSE: FP32, IDENTITY: FP32, AVATAR_ID: BYTES}, {RGB: FP32, MASK: FP32}),
    REENACT: ({FRAMES: UINT8, IDENTITY: FP32, AVATAR_ID: BYTES}, {RGB: FP32, MASK: FP32}),
}
_ALTERNATIVES: Final = frozenset({IDENTITY, AVATAR_ID})
_CONDITIONED: Final = frozenset({GENERATOR, REENACT})

_MAX_BACKOFF_S: Final = 2.0


# --- errors ----------------------------------------------------------------------------------


class TritonError(Exception):
    """An inference call failed; `code` is a stable machine-readable reason."""

    code: str = "inference_error"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: str | None = None,
        model: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status  # the client's status string ("StatusCode.UNAVAILABLE", "503")
        self.model = model
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        where = f"{self.model}: " if self.model else ""
        status = f" [{self.status}]" if self.status else ""
        return f"{where}{self.message}{status}"


class InferenceUnavailable(TritonError):
    """The server is down, unreachable, overloaded or timed out; worth retrying later."""

    code = "inference_unavailable"
    retryable = True


class ModelNotReady(TritonError):
    """The server answers but the model is not loaded or not ready."""

    code = "model_not_ready"


class BadInput(TritonError):
    """The request is malformed (shape, dtype, avatar id) or the server rejected it."""

    code = "bad_input"


class ContractMismatch(BadInput):
    """The served model's metadata does not match this client's names, dtypes or shapes."""

    code = "model_contract_mismatch"


_GRPC_STATUS: Final[dict[str, type[TritonError]]] = {
    "UNAVAILABLE": InferenceUnavailable,
    "DEADLINE_EXCEEDED": InferenceUnavailable,
    "RESOURCE_EXHAUSTED": InferenceUnavailable,
    "ABORTED": InferenceUnavailable,
    "CANCELLED": InferenceUnavailable,
    "NOT_FOUND": ModelNotReady,
    "INVALID_ARGUMENT": BadInput,
    "OUT_OF_RANGE": BadInput,
    "FAILED_PRECONDITION": BadInput,
}
_HTTP_STATUS: Final[dict[int, type[TritonError]]] = {
    408: InferenceUnavailable,
    429: InferenceUnavailable,
    502: InferenceUnavailable,
    503: InferenceUnavailable,
    504: InferenceUnavailable,
    404: ModelNotReady,
    400: BadInput,
    413: BadInput,
    422: BadInput,
}
# Triton reports an unloaded model with a 400 or UNAVAILABLE in some versions: trust the text.
_MODEL_NOT_READY_TEXT: Final = re.compile(
    r"unknown model|no available versions|not at ready state|model .*is not ready", re.IGNORECASE
)
_UNKNOWN_AVATAR_TEXT: Final = re.compile(
    r"(unknown|invalid|no such) avatar|avatar\b.*\bnot found", re.IGNORECASE
)
_TIMEOUT_TEXT: Final = re.compile(
    r"deadline exceeded|timed out|failed to obtain inference response", re.IGNORECASE
)


def _classify(status: str | None, message: str) -> type[TritonError]:
    if _UNKNOWN_AVATAR_TEXT.search(message):
        return BadInput
    if _MODEL_NOT_READY_TEXT.search(message):
        return ModelNotReady
    if status is None:
        return InferenceUnavailable if _TIMEOUT_TEXT.search(message) else TritonError
    if status.isdigit():
        return _HTTP_STATUS.get(int(status), TritonError)
    return _GRPC_STATUS.get(status.rsplit(".", 1)[-1], TritonError)


def translate_error(exc: BaseException, *, model: str | None = None) -> TritonError | None:
    """Map a tritonclient, gRPC or socket error to a typed `TritonError`; None if unrelated."""
    if isinstance(exc, TritonError):
        return exc
    # Duck-typed so this module needs neither tritonclient nor grpc imported to classify.
    e: Any = exc
    if callable(getattr(e, "status", None)) and callable(getattr(e, "message", None)):
        status = e.status()  # tritonclient.utils.InferenceServerException
        message = str(e.message() or e)
    elif callable(getattr(e, "code", None)) and callable(getattr(e, "details", None)):
        status = str(e.code())  # a grpc.RpcError that escaped the client
        message = str(e.details() or e)
    elif isinstance(exc, OSError | http.client.HTTPException):
        # refused, reset, DNS, socket timeouts (http), connection closed mid-response
        return InferenceUnavailable(f"{type(exc).__name__}: {exc}", model=model)
    elif isinstance(exc, ValueError) and "closed channel" in str(exc):
        return InferenceUnavailable(str(exc), model=model)
    else:
        return None
    status = None if status is None else str(status)
    return _classify(status, message)(message, status=status, model=model)


# --- configuration and results ---------------------------------------------------------------


@dataclass(frozen=True)
class TritonConfig:
    """Where the server is and how hard to try.

    `timeout_s` bounds each attempt (gRPC deadline; HTTP connect and per-read timeouts), so a
    call gives up within about (retries + 1) * timeout_s plus the backoff sleeps.
    """

    url: str = "127.0.0.1:8001"
    protocol: Literal["grpc", "http"] = "grpc"
    timeout_s: float = 10.0
    retries: int = 3
    backoff_s: float = 0.1
    max_batch: int = 16
    concurrency: int = 4  # chunks of one call in flight at once

    def __post_init__(self) -> None:
        if self.protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {self.protocol!r}")
        if self.url.startswith("https://"):
            raise ValueError("TLS is not supported; give host:port")
        if not _host_port(self.url):
            raise ValueError("url must be host:port")
        if self.timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError("timeout_s must be > 0 and backoff_s >= 0")
        if self.retries < 0 or self.max_batch < 1 or self.concurrency < 1:
            raise ValueError("retries must be >= 0, max_batch and concurrency >= 1")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TritonConfig:
        """The server of the service's settings (`LPD_TRITON_*`), with `overrides`."""
        values: dict[str, Any] = {
            "url": settings.triton_url,
            "protocol": settings.triton_protocol,
            "timeout_s": settings.triton_timeout_s,
        }
        return cls(**{**values, **overrides})


def _host_port(url: str) -> str:
    for scheme in ("http://", "grpc://"):
        if url.startswith(scheme):
            return url[len(scheme) :].rstrip("/")
    return url.rstrip("/")


@dataclass(frozen=True)
class Rendered:
    """Generator output: RGB premultiplied by MASK, both float32 in [0, 1]."""

    rgb: np.ndarray  # (N, 3, S, S)
    mask: np.ndarray  # (N, 1, S, S)

    def __len__(self) -> int:
        return int(self.rgb.shape[0])

    def to_uint8(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S, 3) uint8 premultiplied RGB and (N, S, S) uint8 mask, for video encoding."""
        rgb = np.clip(self.rgb * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        mask = np.clip(self.mask[:, 0] * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(rgb), mask

    @staticmethod
    def concat(parts: Sequence[Rendered]) -> Rendered:
        """Join chunks along the frame axis, in order."""
        if len(parts) == 1:
            return parts[0]
        return Rendered(
            np.concatenate([p.rgb for p in parts]), np.concatenate([p.mask for p in parts])
        )


@dataclass(frozen=True)
class ModelContract:
    """Sizes read from the served model metadata by `TritonBackend.check_models`."""

    image_size: int | None
    identity_dim: int | None
    pose_dim: int | None
    avatar_models: frozenset[str]  # models that accept AVATAR_ID
    checked: frozenset[str] = frozenset()  # models whose metadata was checked


class Renderer(Protocol):
    """Driving frames in, the avatar out: what a video job and a live stream need (Triton's
    adapter; PyTorch in cli.offline; fakes in unit tests)."""

    def image_size(self) -> int: ...

    def reenact(
        self,
        frames: np.ndarray,
        identity: np.ndarray | None = None,
        avatar_id: str | None = None,
    ) -> Rendered: ...


class PoseRenderer(Protocol):
    """Pose descriptors in, the avatar out: the generator alone (pose tracks, pose-space
    renders, pose-mode streams)."""

    def image_size(self) -> int: ...

    def render(
        self,
        poses: np.ndarray,
        identity: np.ndarray | None = None,
        avatar_id: str | None = None,
    ) -> Rendered: ...


class InferenceBackend(Renderer, PoseRenderer, Protocol):
    """Everything the service and workers need from an inference backend."""

    def embed_identity(self, images: np.ndarray) -> np.ndarray: ...

    def encode_pose(self, frames: np.ndarray) -> np.ndarray: ...

    def is_ready(self, models: Sequence[str] = ALL_MODELS) -> bool: ...


# --- helpers ---------------------------------------------------------------------------------


def _chunk_slices(n: int, size: int) -> list[slice]:
    """Split range(n) into consecutive slices of at most `size`."""
    if size < 1:
        raise ValueError("size must be >= 1")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _map_chunks(
    fn: Callable[[slice], T], n: int, size: int, executor: ThreadPoolExecutor | None = None
) -> list[T]:
    """Apply `fn` to each chunk of range(n), concurrently when given an executor; keep order."""
    slices = _chunk_slices(n, size)
    if executor is None or len(slices) == 1:
        return [fn(s) for s in slices]
    futures: list[Future[T]] = [executor.submit(fn, s) for s in slices]
    try:
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        raise


def _backoff(base_s: float, attempt: int) -> float:
    return float(min(base_s * 2**attempt, _MAX_BACKOFF_S))


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} {tuple(x.shape)}"
    return type(x).__name__


def _check_images(name: str, x: object, size: int | None, n_name: str = "N") -> np.ndarray:
    s = "S" if size is None else str(size)
    expected = f"uint8 ({n_name}, 3, {s}, {s})"
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        raise BadInput(f"{name} must be {expected}, got {_describe(x)}")
    n, c, h, w = x.shape
    if n < 1 or c != 3 or h != w or h < 1 or (size is not None and h != size):
        raise BadInput(f"{name} must be {expected}, got {_describe(x)}")
    return np.ascontiguousarray(x)


def _check_vectors(name: str, x: object, ndim: int, dim: int | None) -> np.ndarray:
    d = "D" if dim is None else str(dim)
    expected = f"float32 (N, {d})" if ndim == 2 else f"float32 ({d},)"
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != ndim:
        raise BadInput(f"{name} must be {expected}, got {_describe(x)}")
    if 0 in x.shape or (dim is not None and x.shape[-1] != dim):
        raise BadInput(f"{name} must be {expected}, got {_describe(x)}")
    if not np.isfinite(x).all():
        raise BadInput(f"{name} contains NaN or infinity")
    return np.ascontiguousarray(x)


def _check_avatar_id(avatar_id: object) -> str:
    if not isinstance(avatar_id, str) or AVATAR_ID_PATTERN.fullmatch(avatar_id) is None:
        raise BadInput(
            f"avatar_id must match {AVATAR_ID_PATTERN.pattern}, got {avatar_id!r}",
            code="bad_avatar_id",
        )
    return avatar_id


@dataclass(frozen=True)
class _Condition:
    """Who to render: a zero-shot identity vector or a fine-tuned avatar id."""

    identity: np.ndarray | None
    avatar_id: str | None

    def tensor(self, n: int) -> tuple[str, np.ndarray]:
        if self.identity is not None:
            return IDENTITY, np.tile(self.identity[None, :], (n, 1))  # (n, D_id)
        assert self.avatar_id is not None
        row = self.avatar_id.encode("utf-8")
        return AVATAR_ID, np.full((n, 1), row, dtype=np.object_)  # (n, 1)


def _dims(shape: Iterable[Any]) -> list[int]:
    return [int(d) for d in shape]  # gRPC metadata JSON gives int64 dims as strings


# --- the adapter -----------------------------------------------------------------------------


class TritonBackend:
    """`InferenceBackend` over a Triton server, by gRPC (thread-safe, shared) or HTTP (per thread).

    Every request attempt is bounded by `timeout_s`; transient failures are retried `retries`
    times with exponential backoff (capped at 2 s) on a fresh connection, then raised as
    `InferenceUnavailable`. Inputs are validated before anything is sent.
    """

    def __init__(self, config: TritonConfig | None = None) -> None:
        self.config = config or TritonConfig()
        self._lock = threading.Lock()
        self._grpc_client: Any = None
        self._local = threading.local()  # HTTP clients are single-threaded (gevent)
        self._generation = 0
        self._executor: ThreadPoolExecutor | None = None
        self._contract: ModelContract | None = None

    # --- connection -----------------------------------------------------------------------

    def _new_client(self) -> Any:
        url = _host_port(self.config.url)
        if self.config.protocol == "grpc":
            import tritonclient.grpc as grpcclient

            return grpcclient.InferenceServerClient(url)
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(
            url,
            connection_timeout=self.config.timeout_s,
            network_timeout=self.config.timeout_s,
        )

    def _client(self) -> Any:
        if self.config.protocol == "http":
            local = self._local
            if getattr(local, "client", None) is None or local.generation != self._generation:
                local.client = self._new_client()
                local.generation = self._generation
            return local.client
        with self._lock:
            if self._grpc_client is None:
                self._grpc_client = self._new_client()
            return self._grpc_client

    def _discard(self, client: Any) -> None:
        """Drop a client after a connection failure so the next attempt dials afresh."""
        if self.config.protocol == "http":
            if getattr(self._local, "client", None) is client:
                self._local.client = None
                _close_quietly(client)
            return
        with self._lock:
            # Not closed here: other threads may be mid-call on it; it closes when collected.
            if self._grpc_client is client:
                self._grpc_client = None

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self.config.concurrency, thread_name_prefix="triton"
                )
            return self._executor

    def _kwargs(self) -> dict[str, Any]:
        if self.config.protocol == "grpc":
            return {"client_timeout": self.config.timeout_s}
        return {}

    def close(self) -> None:
        """Release connections and worker threads; the backend reconnects if used again."""
        with self._lock:
            executor, self._executor = self._executor, None
            client, self._grpc_client = self._grpc_client, None
            self._generation += 1  # other threads' HTTP clients are replaced on next use
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        if client is not None:
            _close_quietly(client)
        local_client = getattr(self._local, "client", None)
        if local_client is not None:
            self._local.client = None
            _close_quietly(local_client)

    def __enter__(self) -> TritonBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, fn: Callable[[Any], T], *, model: str | None = None) -> T:
        """Run `fn(client)`, retrying transient failures with backoff on a fresh client."""
        attempts = self.config.retries + 1
        for attempt in range(attempts):
            client = self._client()
            try:
                return fn(client)
            except Exception as exc:
                err = translate_error(exc, model=model)
                if err is None:
                    raise
                if isinstance(err, InferenceUnavailable):
                    self._discard(client)
                if not err.retryable:
                    if err is exc:
                        raise
                    raise err from exc
                if attempt + 1 == attempts:
                    raise InferenceUnavailable(
                        f"Triton at {self.config.url} unavailable after {attempts} attempt(s): "
                        f"{err.message}",
                        status=err.status,
                        model=model,
                    ) from exc
                delay = _backoff(self.config.backoff_s, attempt)
                logger.warning("triton: %s; retrying in %.2fs", err, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # --- health and metadata --------------------------------------------------------------

    def _probe(self, fn: Callable[[Any], bool]) -> bool:
        client = None
        try:
            client = self._client()
            return bool(fn(client))
        except Exception as exc:
            err = translate_error(exc)
            if client is not None and (err is None or isinstance(err, InferenceUnavailable)):
                self._discard(client)
            logger.info("triton probe failed: %s", err or repr(exc))
            return False

    def is_live(self) -> bool:
        """Whether the server answers its liveness probe; False (never raises) when down."""
        kw = self._kwargs()
        return self._probe(lambda c: c.is_server_live(**kw))

    def is_ready(self, models: Sequence[str] = ALL_MODELS) -> bool:
        """Whether the server and each of `models` are ready; False (never raises) when down."""
        kw = self._kwargs()
        return self._probe(
            lambda c: c.is_server_ready(**kw) and all(c.is_model_ready(m, **kw) for m in models)
        )

    def _model_metadata(self, model: str) -> dict[str, Any]:
        kw = self._kwargs()
        if self.config.protocol == "grpc":
            kw["as_json"] = True
        meta: dict[str, Any] = self._call(lambda c: c.get_model_metadata(model, **kw), model=model)
        return meta

    def _model_ready(self, model: str) -> bool:
        kw = self._kwargs()
        return bool(self._call(lambda c: c.is_model_ready(model, **kw), model=model))

    def check_models(self, models: Sequence[str] = ALL_MODELS) -> ModelContract:
        """Verify each model is ready and its tensor names and datatypes match this client."""
        sizes: dict[str, list[int]] = {}
        avatar_models: set[str] = set()
        for model in models:
            if model not in _CONTRACT:
                raise BadInput(f"unknown model {model!r}; expected one of {ALL_MODELS}")
            if not self._model_ready(model):
                raise ModelNotReady("model is not ready", model=model)
            meta = self._model_metadata(model)
            inputs = {t["name"]: t for t in meta.get("inputs", [])}
            outputs = {t["name"]: t for t in meta.get("outputs", [])}
            want_in, want_out = _CONTRACT[model]
            _check_tensors(model, "input", inputs, want_in, model in _CONDITIONED)
            _check_tensors(model, "output", outputs, want_out, False)
            if AVATAR_ID in inputs:
                avatar_models.add(model)
            for name, tensor in (*inputs.items(), *outputs.items()):
                sizes[f"{model}.{name}"] = _dims(tensor.get("shape", []))
        contract = _contract_from_shapes(sizes, frozenset(avatar_models), frozenset(models))
        self._contract = contract
        return contract

    def image_size(self) -> int:
        """The square frame size S served by pose_encoder (FRAMES [-1, 3, S, S])."""
        if self._contract is not None and self._contract.image_size is not None:
            return self._contract.image_size
        meta = self._model_metadata(POSE_ENCODER)
        frames = next((t for t in meta.get("inputs", []) if t["name"] == FRAMES), None)
        if frames is None:
            raise ContractMismatch(f"no {FRAMES} input", model=POSE_ENCODER)
        size = _image_size(_dims(frames.get("shape", [])), f"{POSE_ENCODER}.{FRAMES}")
        if self._contract is None:
            self._contract = ModelContract(size, None, None, frozenset())
        return size

    # --- validation -----------------------------------------------------------------------

    def _known(self) -> ModelContract:
        return self._contract or ModelContract(None, None, None, frozenset())

    def _condition(
        self, identity: np.ndarray | None, avatar_id: str | None, model: str
    ) -> _Condition:
        if (identity is None) == (avatar_id is None):
            raise BadInput("give exactly one of identity and avatar_id")
        known = self._known()
        if avatar_id is not None:
            avatar_id = _check_avatar_id(avatar_id)
            if model in known.checked and model not in known.avatar_models:
                raise BadInput(f"model {model!r} does not accept {AVATAR_ID}", model=model)
            return _Condition(None, avatar_id)
        return _Condition(_check_vectors("identity", identity, 1, known.identity_dim), None)

    # --- inference ------------------------------------------------------------------------

    def _infer(
        self, model: str, inputs: Sequence[tuple[str, np.ndarray]], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """One request; returns the named outputs as numpy arrays."""
        if self.config.protocol == "grpc":
            import tritonclient.grpc as mod
        else:
            import tritonclient.http as mod
        from tritonclient.utils import np_to_triton_dtype

        tensors = []
        for name, array in inputs:
            t = mod.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            t.set_data_from_numpy(array)
            tensors.append(t)
        requested = [mod.InferRequestedOutput(name) for name in outputs]
        kw = self._kwargs()
        result = self._call(lambda c: c.infer(model, tensors, outputs=requested, **kw), model=model)
        out: dict[str, np.ndarray] = {}
        for name in outputs:
            array = result.as_numpy(name)
            if array is None:
                raise TritonError(f"response has no {name}", model=model, code="bad_output")
            out[name] = np.asarray(array, dtype=np.float32)
        return out

    def _rendered(self, out: dict[str, np.ndarray], n: int, model: str) -> Rendered:
        rgb, mask = out[RGB], out[MASK]
        if rgb.ndim != 4 or rgb.shape[:2] != (n, 3) or mask.shape != (n, 1, *rgb.shape[2:]):
            raise TritonError(
                f"expected RGB ({n}, 3, S, S) and MASK ({n}, 1, S, S), "
                f"got {rgb.shape} and {mask.shape}",
                model=model,
                code="bad_output",
            )
        return Rendered(rgb, mask)

    def _chunked(self, fn: Callable[[slice], T], n: int) -> list[T]:
        pool = self._pool() if n > self.config.max_batch else None
        return _map_chunks(fn, n, self.config.max_batch, pool)

    def embed_identity(self, images: np.ndarray) -> np.ndarray:
        """K source images, uint8 (K, 3, S, S) -> identity vector, float32 (D_id,)."""
        known = self._known()
        images = _check_images("images", images, known.image_size, "K")
        vec = self._infer(IDENTITY_ENCODER, [(IMAGES, images)], [IDENTITY])[IDENTITY]
        if vec.ndim == 2 and vec.shape[0] == 1:
            vec = vec[0]
        if vec.ndim != 1 or (known.identity_dim is not None and vec.shape[0] != known.identity_dim):
            raise TritonError(
                f"expected IDENTITY (D_id,), got {vec.shape}",
                model=IDENTITY_ENCODER,
                code="bad_output",
            )
        return vec

    def encode_pose(self, frames: np.ndarray) -> np.ndarray:
        """Driving frames, uint8 (N, 3, S, S) -> pose embeddings, float32 (N, D_pose)."""
        frames = _check_images("frames", frames, self._known().image_size)

        def chunk(s: slice) -> np.ndarray:
            part = frames[s]
            pose = self._infer(POSE_ENCODER, [(FRAMES, part)], [POSE])[POSE]
            if pose.ndim != 2 or pose.shape[0] != len(part):
                raise TritonError(
                    f"expected POSE ({len(part)}, D_pose), got {pose.shape}",
                    model=POSE_ENCODER,
                    code="bad_output",
                )
            return pose

        return np.concatenate(self._chunked(chunk, len(frames)))

    def render(
        self,
        poses: np.ndarray,
        identity: np.ndarray | None = None,
        avatar_id: str | None = None,
    ) -> Rendered:
        """Pose embeddings float32 (N, D_pose) + identity (D_id,) or avatar id -> N frames."""
        cond = self._condition(identity, avatar_id, GENERATOR)
        poses = _check_vectors("poses", poses, 2, self._known().pose_dim)

        def chunk(s: slice) -> Rendered:
            part = poses[s]
            n = len(part)
            out = self._infer(GENERATOR, [(POSE, part), cond.tensor(n)], [RGB, MASK])
            return self._rendered(out, n, GENERATOR)

        return Rendered.concat(self._chunked(chunk, len(poses)))

    def reenact(
        self,
        frames: np.ndarray,
        identity: np.ndarray | None = None,
        avatar_id: str | None = None,
    ) -> Rendered:
        """Driving frames uint8 (N, 3, S, S) + identity or avatar id -> N frames, via `reenact`."""
        cond = self._condition(identity, avatar_id, REENACT)
        frames = _check_images("frames", frames, self._known().image_size)
        return self._reenact(frames, cond)

    def _reenact(self, frames: np.ndarray, cond: _Condition) -> Rendered:
        def chunk(s: slice) -> Rendered:
            part = frames[s]
            n = len(part)
            out = self._infer(REENACT, [(FRAMES, part), cond.tensor(n)], [RGB, MASK])
            return self._rendered(out, n, REENACT)

        return Rendered.concat(self._chunked(chunk, len(frames)))

    def reenact_stream(
        self,
        frames: Iterable[np.ndarray],
        identity: np.ndarray | None = None,
        avatar_id: str | None = None,
        batch: int = 1,
    ) -> Iterator[Rendered]:
        """Reenact (3, S, S) uint8 frames as they arrive, `batch` at a time, yielding in order.

        Each yielded `Rendered` holds up to `batch` frames (fewer at the end); batch=1 is the
        real-time setting. Identity, avatar id and batch are checked before the first frame.
        """
        if batch < 1:
            raise BadInput(f"batch must be >= 1, got {batch}")
        cond = self._condition(identity, avatar_id, REENACT)
        return self._stream(iter(frames), cond, batch)

    def _stream(
        self, frames: Iterator[np.ndarray], cond: _Condition, batch: int
    ) -> Iterator[Rendered]:
        size = self._known().image_size
        pending: list[np.ndarray] = []
        for frame in frames:
            if not isinstance(frame, np.ndarray) or frame.ndim != 3:
                raise BadInput(f"each frame must be uint8 (3, S, S), got {_describe(frame)}")
            if pending and frame.shape != pending[0].shape:
                raise BadInput(f"frame shape changed from {pending[0].shape} to {frame.shape}")
            pending.append(_check_images("frame", frame[None], size)[0])
            if len(pending) == batch:
                yield self._reenact(np.stack(pending), cond)
                pending = []
        if pending:
            yield self._reenact(np.stack(pending), cond)


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:  # closing a broken connection may itself fail; nothing to recover
        logger.debug("closing triton client failed", exc_info=True)


def _check_tensors(
    model: str,
    kind: str,
    served: dict[str, dict[str, Any]],
    wanted: dict[str, str],
    alternatives: bool,
) -> None:
    """Raise ContractMismatch unless `served` tensors match `wanted` names and datatypes."""
    for name, dtype in wanted.items():
        tensor = served.get(name)
        if tensor is None:
            if alternatives and name in _ALTERNATIVES:
                continue
            raise ContractMismatch(
                f"missing {kind} {name}; served {kind}s: {sorted(served)}", model=model
            )
        if tensor.get("datatype") != dtype:
            raise ContractMismatch(
                f"{kind} {name} is {tensor.get('datatype')}, expected {dtype}", model=model
            )
    if alternatives and not _ALTERNATIVES & served.keys():
        raise ContractMismatch(f"needs an {IDENTITY} or {AVATAR_ID} input", model=model)
    if kind == "input" and (extra := sorted(served.keys() - wanted.keys())):
        raise ContractMismatch(
            f"unexpected inputs {extra}; this client cannot fill them", model=model
        )


def _image_size(shape: list[int], where: str) -> int:
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3] or shape[2] < 1:
        raise ContractMismatch(f"{where} shape is {shape}, expected [-1, 3, S, S]")
    return shape[2]


def _contract_from_shapes(
    sizes: dict[str, list[int]], avatar_models: frozenset[str], checked: frozenset[str]
) -> ModelContract:
    """Read S, D_id and D_pose from served shapes and check they agree across models."""
    image_size: int | None = None
    for key in (f"{POSE_ENCODER}.{FRAMES}", f"{REENACT}.{FRAMES}", f"{IDENTITY_ENCODER}.{IMAGES}"):
        if key in sizes:
            s = _image_size(sizes[key], key)
            if image_size is not None and s != image_size:
                raise ContractMismatch(f"{key} has image size {s}, others {image_size}")
            image_size = s

    def last_dim(keys: Sequence[str], what: str) -> int | None:
        found: int | None = None
        for key in keys:
            shape = sizes.get(key)
            if not shape or shape[-1] < 1:
                continue
            if found is not None and shape[-1] != found:
                raise ContractMismatch(f"{key} has {what} {shape[-1]}, others {found}")
            found = shape[-1]
        return found

    identity_dim = last_dim(
        [f"{m}.{IDENTITY}" for m in (IDENTITY_ENCODER, GENERATOR, REENACT)], "D_id"
    )
    pose_dim = last_dim([f"{m}.{POSE}" for m in (POSE_ENCODER, GENERATOR)], "D_pose")
    for key in (f"{GENERATOR}.{RGB}", f"{REENACT}.{RGB}"):
        shape = sizes.get(key)
        if image_size is not None and shape and shape[-1] > 0 and shape[-1] != image_size:
            raise ContractMismatch(f"{key} is {shape[-1]} px, frames are {image_size} px")
    return ModelContract(image_size, identity_dim, pose_dim, avatar_models, checked)
