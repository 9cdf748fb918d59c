"""`service.triton` without a server: validation, error mapping, retries, chunking, dead servers."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException  # noqa: TID251  # fabricate real errors

from deploy.triton import spec
from service import triton
from service.triton import (
    AVATAR_ID,
    FRAMES,
    GENERATOR,
    IDENTITY,
    IDENTITY_ENCODER,
    MASK,
    POSE,
    POSE_ENCODER,
    REENACT,
    RGB,
    BadInput,
    ContractMismatch,
    InferenceBackend,
    InferenceUnavailable,
    ModelNotReady,
    Rendered,
    TritonBackend,
    TritonConfig,
    TritonError,
    translate_error,
)

S, D_ID, D_POSE = 8, 6, 4


def frames(n: int, size: int = S) -> np.ndarray:
    return np.zeros((n, 3, size, size), np.uint8)


def identity(dim: int = D_ID) -> np.ndarray:
    return np.ones(dim, np.float32)


# --- fakes -----------------------------------------------------------------------------------


def tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    # gRPC's JSON metadata spells int64 dims as strings; the adapter must cope.
    return {"name": name, "datatype": datatype, "shape": [str(d) for d in shape]}


def metadata(avatar: bool = True, pose_dtype: str = "FP32") -> dict[str, dict[str, Any]]:
    cond = [tensor(IDENTITY, "FP32", [-1, D_ID])]
    if avatar:
        cond.append(tensor(AVATAR_ID, "BYTES", [-1, 1]))
    rendered = [tensor(RGB, "FP32", [-1, 3, S, S]), tensor(MASK, "FP32", [-1, 1, S, S])]
    return {
        IDENTITY_ENCODER: {
            "inputs": [tensor("IMAGES", "UINT8", [-1, 3, S, S])],
            "outputs": [tensor(IDENTITY, "FP32", [D_ID])],
        },
        POSE_ENCODER: {
            "inputs": [tensor(FRAMES, "UINT8", [-1, 3, S, S])],
            "outputs": [tensor(POSE, pose_dtype, [-1, D_POSE])],
        },
        GENERATOR: {"inputs": [tensor(POSE, "FP32", [-1, D_POSE]), *cond], "outputs": rendered},
        REENACT: {"inputs": [tensor(FRAMES, "UINT8", [-1, 3, S, S]), *cond], "outputs": rendered},
    }


class FakeResult:
    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.arrays.get(name)


class FakeClient:
    """Answers like a Triton client, recording (model, {input: (shape, datatype)}) per infer."""

    def __init__(self, meta: dict[str, dict[str, Any]] | None = None, ready: bool = True) -> None:
        self.meta = meta or metadata()
        self.ready = ready
        self.calls: list[tuple[str, dict[str, tuple[list[int], str]]]] = []
        self.lock = threading.Lock()
        self.closed = False

    def is_server_live(self, **kw: Any) -> bool:
        return True

    def is_server_ready(self, **kw: Any) -> bool:
        return True

    def is_model_ready(self, name: str, **kw: Any) -> bool:
        return self.ready

    def get_model_metadata(self, name: str, **kw: Any) -> dict[str, Any]:
        return self.meta[name]

    def infer(self, model: str, inputs: list[Any], outputs: Any = None, **kw: Any) -> FakeResult:
        shapes = {i.name(): (list(i.shape()), i.datatype()) for i in inputs}
        with self.lock:
            call = len(self.calls)
            self.calls.append((model, shapes))
        n = next(iter(shapes.values()))[0][0]
        if model == IDENTITY_ENCODER:
            return FakeResult({IDENTITY: np.full(D_ID, 0.5, np.float32)})
        if model == POSE_ENCODER:
            return FakeResult({POSE: np.full((n, D_POSE), call, np.float32)})
        return FakeResult(
            {
                RGB: np.full((n, 3, S, S), call, np.float32),
                MASK: np.ones((n, 1, S, S), np.float32),
            }
        )

    def close(self) -> None:
        self.closed = True


def fake_backend(
    monkeypatch: pytest.MonkeyPatch, client: Any, **config: Any
) -> tuple[TritonBackend, list[Any]]:
    """A backend whose every new connection is `client`; returns it and the list of dials."""
    dials: list[Any] = []

    def new_client(self: TritonBackend) -> Any:
        dials.append(client)
        return client

    monkeypatch.setattr(TritonBackend, "_new_client", new_client)
    return TritonBackend(TritonConfig(**config)), dials


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[TritonBackend]:
    """A backend that fails the test if it ever tries to connect."""

    def no_network(self: TritonBackend) -> Any:
        raise AssertionError("validation must fail before any network call")

    monkeypatch.setattr(TritonBackend, "_new_client", no_network)
    with TritonBackend(TritonConfig()) as backend:
        yield backend


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the contract ----------------------------------------------------------------------------


def test_client_constants_match_the_server_spec() -> None:
    assert triton.ALL_MODELS == spec.MODELS
    for name in ("IMAGES", "FRAMES", "IDENTITY", "POSE", "AVATAR_ID", "RGB", "MASK"):
        assert getattr(triton, name) == getattr(spec, name)
    assert triton.AVATAR_ID_PATTERN.pattern == spec.AVATAR_ID_PATTERN.pattern


def test_import_loads_neither_torch_nor_tritonclient() -> None:
    code = (
        "import sys, service.triton\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'tritonclient')]\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr


def test_backend_satisfies_the_protocol() -> None:
    backend: InferenceBackend = TritonBackend()
    assert callable(backend.reenact)


# --- validation before any request -----------------------------------------------------------


@pytest.mark.parametrize(
    "images",
    [
        frames(2).astype(np.float32),
        np.zeros((3, S, S), np.uint8),
        np.zeros((2, 1, S, S), np.uint8),
        np.zeros((2, 3, S, S + 1), np.uint8),
        np.zeros((0, 3, S, S), np.uint8),
        [[0]],
    ],
)
def test_embed_identity_rejects_bad_images(offline: TritonBackend, images: Any) -> None:
    with pytest.raises(BadInput, match=r"\(K, 3, S, S\)"):
        offline.embed_identity(images)


@pytest.mark.parametrize(
    "bad", [frames(2).astype(np.int16), frames(2)[0], np.zeros((2, 4, S, S), np.uint8)]
)
def test_frames_are_checked(offline: TritonBackend, bad: np.ndarray) -> None:
    with pytest.raises(BadInput, match=r"uint8 \(N, 3, S, S\)"):
        offline.encode_pose(bad)
    with pytest.raises(BadInput, match=r"uint8 \(N, 3, S, S\)"):
        offline.reenact(bad, identity=identity())


@pytest.mark.parametrize(
    ("poses", "ident", "match"),
    [
        (np.zeros((2, D_POSE), np.float64), identity(), "poses must be float32"),
        (np.zeros(D_POSE, np.float32), identity(), r"poses must be float32 \(N, D\)"),
        (np.zeros((2, D_POSE), np.float32), identity()[None], r"identity must be float32 \(D,\)"),
        (np.zeros((2, D_POSE), np.float32), identity().astype(np.float16), "identity must"),
        (np.full((2, D_POSE), np.nan, np.float32), identity(), "NaN"),
    ],
)
def test_render_checks_dtypes_and_shapes(
    offline: TritonBackend, poses: np.ndarray, ident: np.ndarray, match: str
) -> None:
    with pytest.raises(BadInput, match=match):
        offline.render(poses, identity=ident)


def test_exactly_one_of_identity_and_avatar_id(offline: TritonBackend) -> None:
    poses = np.zeros((2, D_POSE), np.float32)
    cases: list[dict[str, Any]] = [{}, {"identity": identity(), "avatar_id": "alice"}]
    for kwargs in cases:
        with pytest.raises(BadInput, match="exactly one"):
            offline.render(poses, **kwargs)
        with pytest.raises(BadInput, match="exactly one"):
            offline.reenact(frames(1), **kwargs)
        with pytest.raises(BadInput, match="exactly one"):
            offline.reenact_stream(iter([]), **kwargs)  # eager: before the first frame


@pytest.mark.parametrize(
    "avatar_id", ["", "-alice", "_a", "a/b", "../etc", "a b", "é", "a" * 65, "a\n", 7]
)
def test_bad_avatar_ids_are_rejected(offline: TritonBackend, avatar_id: Any) -> None:
    with pytest.raises(BadInput, match="avatar_id must match") as info:
        offline.reenact(frames(1), avatar_id=avatar_id)
    assert info.value.code == "bad_avatar_id"


def test_stream_checks_batch_and_each_frame(offline: TritonBackend) -> None:
    with pytest.raises(BadInput, match="batch"):
        offline.reenact_stream([], avatar_id="alice", batch=0)
    stream = offline.reenact_stream([frames(1)], avatar_id="alice")  # 4-D, not one frame
    with pytest.raises(BadInput, match=r"\(3, S, S\)"):
        next(stream)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="protocol"):
        TritonConfig(protocol="rest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_batch"):
        TritonConfig(max_batch=0)
    with pytest.raises(ValueError, match="timeout_s"):
        TritonConfig(timeout_s=0)


# --- error mapping ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", InferenceUnavailable),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", InferenceUnavailable),
        ("StatusCode.RESOURCE_EXHAUSTED", "queue full", InferenceUnavailable),
        ("StatusCode.CANCELLED", "server shutting down", InferenceUnavailable),
        ("StatusCode.INVALID_ARGUMENT", "unexpected shape for input 'FRAMES'", BadInput),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'x' is not found", ModelNotReady),
        ("StatusCode.UNAVAILABLE", "unknown model: 'x' has no available versions", ModelNotReady),
        ("StatusCode.INTERNAL", "unknown avatar 'bob'", BadInput),
        ("StatusCode.NOT_FOUND", "avatar 'bob' not found", BadInput),
        ("StatusCode.INTERNAL", "CUDA error: out of memory", TritonError),
        ("StatusCode.UNIMPLEMENTED", "", TritonError),
        ("503", "Server is not ready", InferenceUnavailable),
        ("502", "bad gateway", InferenceUnavailable),
        ("504", "gateway timeout", InferenceUnavailable),
        ("429", "too many requests", InferenceUnavailable),
        ("400", "unexpected datatype FP64 for input 'POSE'", BadInput),
        ("400", "Request for unknown model: 'generator' is not found", ModelNotReady),
        ("404", "no such model", ModelNotReady),
        ("500", "python model raised", TritonError),
        (None, "failed to obtain inference response", InferenceUnavailable),
        (None, "got unexpected numpy array shape", TritonError),
    ],
)
def test_inference_server_exceptions_map_to_typed_errors(
    status: str | None, message: str, expected: type[TritonError]
) -> None:
    err = translate_error(InferenceServerException(message, status=status), model=REENACT)
    assert type(err) is expected
    assert err.status == status and err.model == REENACT and message in str(err)
    assert err.retryable is (expected is InferenceUnavailable)


def test_codes_are_stable_strings() -> None:
    assert InferenceUnavailable("x").code == "inference_unavailable"
    assert ModelNotReady("x").code == "model_not_ready"
    assert BadInput("x").code == "bad_input"
    assert ContractMismatch("x").code == "model_contract_mismatch"
    assert isinstance(ContractMismatch("x"), BadInput)
    assert TritonError("x").code == "inference_error"


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "reset by peer"),
        TimeoutError("timed out"),
        socket.gaierror(-2, "Name or service not known"),
        http.client.RemoteDisconnected("connection closed"),
    ],
)
def test_socket_errors_are_unavailable(exc: Exception) -> None:
    assert type(translate_error(exc)) is InferenceUnavailable


def test_grpc_rpc_errors_are_mapped_and_unrelated_errors_pass_through() -> None:
    class RpcError(Exception):
        def code(self) -> str:
            return "StatusCode.UNAVAILABLE"

        def details(self) -> str:
            return "connection reset"

    assert type(translate_error(RpcError())) is InferenceUnavailable
    assert translate_error(KeyError("bug")) is None
    assert translate_error(ValueError("bug")) is None


# --- retries, recovery and chunking with a fake client ---------------------------------------


class Flaky(FakeClient):
    def __init__(self, failures: list[Exception]) -> None:
        super().__init__()
        self.failures = failures

    def infer(self, model: str, inputs: list[Any], outputs: Any = None, **kw: Any) -> FakeResult:
        if self.failures:
            raise self.failures.pop(0)
        return super().infer(model, inputs, outputs, **kw)


def test_transient_errors_are_retried_on_a_fresh_client_with_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(triton.time, "sleep", sleeps.append)
    unavailable = InferenceServerException("refused", status="StatusCode.UNAVAILABLE")
    client = Flaky([unavailable, ConnectionResetError(104, "reset")])
    backend, dials = fake_backend(monkeypatch, client, retries=3, backoff_s=0.1)
    pose = backend.encode_pose(frames(3))
    assert pose.shape == (3, D_POSE)
    assert sleeps == [0.1, 0.2]
    assert len(dials) == 3  # re-dialled after each connection failure


def test_backoff_is_exponential_and_capped() -> None:
    assert [triton._backoff(0.1, a) for a in range(3)] == [0.1, 0.2, 0.4]
    assert triton._backoff(0.1, 10) == 2.0


def test_retries_exhausted_raise_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton.time, "sleep", lambda s: None)
    errors = [InferenceServerException("busy", status="503") for _ in range(5)]
    client = Flaky(errors)
    backend, _ = fake_backend(monkeypatch, client, protocol="http", retries=2)
    with pytest.raises(InferenceUnavailable, match="after 3 attempt"):
        backend.embed_identity(frames(2))
    assert len(client.failures) == 2


def test_bad_input_from_the_server_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    invalid = InferenceServerException("bad shape", status="StatusCode.INVALID_ARGUMENT")
    client = Flaky([invalid, invalid])
    backend, dials = fake_backend(monkeypatch, client)
    with pytest.raises(BadInput, match="bad shape"):
        backend.reenact(frames(1), avatar_id="alice")
    assert len(client.failures) == 1 and len(dials) == 1


def test_chunk_slices() -> None:
    assert triton._chunk_slices(0, 16) == []
    assert triton._chunk_slices(16, 16) == [slice(0, 16)]
    assert triton._chunk_slices(33, 16) == [slice(0, 16), slice(16, 32), slice(32, 33)]


def test_map_chunks_keeps_order_when_chunks_finish_out_of_order() -> None:
    data = np.arange(50)

    def infer(s: slice) -> np.ndarray:
        time.sleep(0.02 * (4 - s.start // 16))  # later chunks finish first
        return data[s] * 10

    with ThreadPoolExecutor(4) as pool:
        parts = triton._map_chunks(infer, len(data), 16, pool)
    assert [len(p) for p in parts] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.concatenate(parts), data * 10)


def test_map_chunks_raises_the_first_failure() -> None:
    def infer(s: slice) -> slice:
        if s.start == 4:
            raise InferenceUnavailable("down")
        return s

    with ThreadPoolExecutor(2) as pool, pytest.raises(InferenceUnavailable):
        triton._map_chunks(infer, 10, 2, pool)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_video_is_chunked_and_reassembled_in_order(
    monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    client = FakeClient()
    # One worker: chunks are served in submission order, so the call index tags each chunk.
    backend, _ = fake_backend(monkeypatch, client, protocol=protocol, max_batch=16, concurrency=1)
    pose = backend.encode_pose(frames(40))
    assert pose.shape == (40, D_POSE) and pose.dtype == np.float32
    np.testing.assert_array_equal(pose[:, 0], np.repeat([0, 1, 2], [16, 16, 8]))
    assert [c[1][FRAMES] for c in client.calls] == [
        ([16, 3, S, S], "UINT8"),
        ([16, 3, S, S], "UINT8"),
        ([8, 3, S, S], "UINT8"),
    ]


def test_render_tiles_identity_and_sends_avatar_ids_as_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = FakeClient()
    backend, _ = fake_backend(monkeypatch, client, max_batch=4)
    out = backend.render(np.zeros((6, D_POSE), np.float32), identity=identity())
    assert out.rgb.shape == (6, 3, S, S) and out.mask.shape == (6, 1, S, S) and len(out) == 6
    assert sorted(c[1][IDENTITY] for c in client.calls) == [
        ([2, D_ID], "FP32"),
        ([4, D_ID], "FP32"),
    ]
    client.calls.clear()
    backend.reenact(frames(3), avatar_id="alice_2")
    assert client.calls == [
        (REENACT, {FRAMES: ([3, 3, S, S], "UINT8"), AVATAR_ID: ([3, 1], "BYTES")})
    ]


def test_stream_yields_batches_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeClient()
    backend, _ = fake_backend(monkeypatch, client)
    source = (f for f in frames(5))
    sizes = [len(r) for r in backend.reenact_stream(source, identity=identity(), batch=2)]
    assert sizes == [2, 2, 1]
    assert [len(r) for r in backend.reenact_stream(iter(frames(2)), avatar_id="bob")] == [1, 1]


def test_check_models_reads_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, _ = fake_backend(monkeypatch, FakeClient())
    contract = backend.check_models()
    assert (contract.image_size, contract.identity_dim, contract.pose_dim) == (S, D_ID, D_POSE)
    assert contract.avatar_models == {GENERATOR, REENACT}
    assert backend.image_size() == S
    assert backend.is_ready() and backend.is_live()
    assert backend.embed_identity(frames(3)).shape == (D_ID,)
    with pytest.raises(BadInput, match=rf"\(N, 3, {S}, {S}\)"):  # sizes now known
        backend.reenact(frames(1, size=S * 2), avatar_id="alice")
    with pytest.raises(BadInput, match=rf"float32 \({D_ID},\)"):
        backend.reenact(frames(1), identity=identity(D_ID + 1))


def test_check_models_rejects_mismatches(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, _ = fake_backend(monkeypatch, FakeClient(metadata(pose_dtype="FP16")))
    with pytest.raises(ContractMismatch, match="POSE is FP16, expected FP32"):
        backend.check_models()
    backend, _ = fake_backend(monkeypatch, FakeClient(ready=False))
    with pytest.raises(ModelNotReady):
        backend.check_models()
    assert not backend.is_ready()


def test_models_without_avatar_input_refuse_avatar_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeClient(metadata(avatar=False))
    backend, _ = fake_backend(monkeypatch, client)
    assert backend.check_models().avatar_models == frozenset()
    with pytest.raises(BadInput, match="does not accept AVATAR_ID"):
        backend.render(np.zeros((1, D_POSE), np.float32), avatar_id="alice")
    assert client.calls == []


def test_to_uint8_gives_video_layout() -> None:
    rgb = np.stack([np.zeros((3, 2, 2)), np.full((3, 2, 2), 0.5), np.ones((3, 2, 2))])
    out = Rendered(rgb.astype(np.float32), np.ones((3, 1, 2, 2), np.float32))
    rgb8, mask8 = out.to_uint8()
    assert rgb8.shape == (3, 2, 2, 3) and rgb8.dtype == np.uint8 and rgb8.flags.c_contiguous
    assert mask8.shape == (3, 2, 2) and (mask8 == 255).all()
    assert rgb8[:, 0, 0, 0].tolist() == [0, 128, 255]


# --- no server at all ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_closed_port_is_unavailable_quickly(protocol: str) -> None:
    config = TritonConfig(
        url=f"127.0.0.1:{closed_port()}",
        protocol=protocol,  # type: ignore[arg-type]
        timeout_s=1.0,
        retries=2,
        backoff_s=0.05,
    )
    with TritonBackend(config) as backend:
        start = time.monotonic()
        assert not backend.is_live()
        assert not backend.is_ready()
        with pytest.raises(InferenceUnavailable, match="after 3 attempt"):
            backend.encode_pose(frames(20))  # two chunks in flight
        with pytest.raises(InferenceUnavailable):
            backend.reenact(frames(2), avatar_id="alice")
        with pytest.raises(InferenceUnavailable):
            backend.check_models()
        assert time.monotonic() - start < 5.0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_silent_server_times_out(protocol: str) -> None:
    """A listener that accepts connections but never answers must not hang the caller."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        config = TritonConfig(
            url=f"127.0.0.1:{listener.getsockname()[1]}",
            protocol=protocol,  # type: ignore[arg-type]
            timeout_s=0.3,
            retries=1,
            backoff_s=0.05,
        )
        with TritonBackend(config) as backend:
            start = time.monotonic()
            assert not backend.is_ready()
            with pytest.raises(InferenceUnavailable):
                backend.embed_identity(frames(2))
            assert time.monotonic() - start < 5.0
