"""The exported repository on a real tritonserver, called through the service's adapter."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.triton.export import RepositoryConfig, build_repository
from deploy.triton.serve import ServerConfig, TritonServer, free_port
from model.inference import InferenceModel
from service.triton import BadInput, InferenceUnavailable, TritonBackend, TritonConfig
from tests.integration.conftest import DEMO, Triton
from training.finetune import FinetuneConfig, finetune
from training.losses import LossWeights
from training.synthetic import identity_for, poses_for, render

pytestmark = pytest.mark.integration
TOL = 1e-4
NO_VGG = LossWeights(vgg19=0, vggface=0, embedding_match=0, l1=10)  # no VGG weights here


@pytest.fixture(scope="module")
def torch_model() -> InferenceModel:
    return InferenceModel.from_checkpoint(DEMO)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """Driver crops of a synthetic person: (6, 3, 64, 64) uint8."""
    shots = [render(identity_for(3, 1), p, 64).image for p in poses_for(3, 1, 0, 6)]
    return np.stack(shots).transpose(0, 3, 1, 2).copy()


@pytest.fixture(scope="module")
def avatars(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two fine-tuned avatars (light and full), a few steps each: written, not yet served."""
    out = {}
    root = tmp_path_factory.mktemp("finetuned")
    for i, mode in enumerate(("light", "full")):
        shots = [render(identity_for(5, i), p, 64) for p in poses_for(5, i, 0, 2)]
        images, masks = np.stack([s.image for s in shots]), np.stack([s.mask for s in shots])
        result = finetune(
            DEMO,
            images,
            masks,
            root / f"{mode}.safetensors",
            FinetuneConfig(mode=mode, steps=3, losses=NO_VGG),
        )
        out[mode] = result.avatar
    return out


def test_outputs_equal_direct_torch(
    triton: Triton, torch_model: InferenceModel, frames: np.ndarray
) -> None:
    be = triton.backend
    identity = be.embed_identity(frames[:3])
    expected_identity = torch_model.embed_identity(torch.from_numpy(frames[:3])).numpy()
    np.testing.assert_allclose(identity, expected_identity, atol=TOL)

    poses = be.encode_pose(frames)
    expected_poses = torch_model.encode_pose(torch.from_numpy(frames))
    np.testing.assert_allclose(poses, expected_poses.numpy(), atol=TOL)

    expected = torch_model.render(torch.from_numpy(identity.copy()), expected_poses)
    for got in (be.render(poses, identity=identity), be.reenact(frames, identity=identity)):
        np.testing.assert_allclose(got.rgb, expected.rgb.numpy(), atol=TOL)
        np.testing.assert_allclose(got.mask, expected.mask.numpy(), atol=TOL)


def test_concurrent_requests_are_batched(triton: Triton, frames: np.ndarray) -> None:
    def read() -> tuple[int, int]:
        stats = triton.get_json("/v2/models/pose_encoder/stats")["model_stats"][0]
        return stats["inference_count"], stats["execution_count"]

    def counts() -> tuple[int, int]:
        # Triton updates the statistics after it has sent the responses, so a read right
        # after the last reply may miss some of them: read until two reads agree.
        last, deadline = read(), time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = read()
            if now == last:
                return now
            last = now
        return last

    inferences0, executions0 = counts()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: triton.backend.encode_pose(frames[i % 6 : i % 6 + 1]), range(64)))
    inferences, executions = counts()
    # The session's server is shared: a request of another test still in flight (the reenact
    # BLS model calls pose_encoder too) may land in this window, so count at least ours.
    assert inferences - inferences0 >= 64
    # Batching: fewer executions than inferences (some executions served several requests).
    assert executions - executions0 < inferences - inferences0


def test_finetuned_avatar_served_on_demand_and_evicted(
    triton: Triton, avatars: dict[str, Path], frames: np.ndarray
) -> None:
    be = triton.backend
    with pytest.raises(BadInput, match="unknown avatar"):
        be.reenact(frames[:1], avatar_id="light-1")
    for name, path in avatars.items():  # written after the server started
        shutil.copy(path, triton.avatar_dir / f"{name}-1.safetensors")

    def cache() -> dict[str, float]:
        return {
            k.split("{")[0].removeprefix("lpd_avatar_cache_"): v
            for k, v in triton.metrics().items()
            if k.startswith("lpd_avatar_cache_")
        }

    before = cache()
    for name in ("light", "full"):
        expected = InferenceModel.from_checkpoint(avatars[name], base=DEMO)
        want = expected.reenact(expected.avatar_identity, torch.from_numpy(frames))
        got = be.reenact(frames, avatar_id=f"{name}-1")
        np.testing.assert_allclose(got.rgb, want.rgb.numpy(), atol=TOL)
        np.testing.assert_allclose(got.mask, want.mask.numpy(), atol=TOL)
    be.reenact(frames[:1], avatar_id="full-1")  # resident: a hit
    after = cache()
    assert after["misses"] - before["misses"] == 2
    assert after["hits"] - before["hits"] >= 1
    # The 1 MiB bound holds one avatar: loading the second evicted the first.
    assert after["evictions"] - before["evictions"] >= 1
    assert after["resident"] == 1
    assert after["load_s_total"] > 0


def test_zero_shot_and_avatar_rows_in_one_batch(
    triton: Triton, avatars: dict[str, Path], frames: np.ndarray
) -> None:
    """Concurrent requests for different avatars and zero-shot identities all come back right."""
    shutil.copy(avatars["light"], triton.avatar_dir / "light-2.safetensors")
    be = triton.backend
    identity = be.embed_identity(frames[:2])
    alone_avatar = be.reenact(frames, avatar_id="light-2")
    alone_zero = be.reenact(frames, identity=identity)
    with ThreadPoolExecutor(8) as pool:
        jobs = [
            pool.submit(
                be.reenact,
                frames,
                **({"avatar_id": "light-2"} if i % 2 else {"identity": identity}),
            )
            for i in range(8)
        ]
        results = [j.result() for j in jobs]
    for i, got in enumerate(results):
        want = alone_avatar if i % 2 else alone_zero
        np.testing.assert_allclose(got.rgb, want.rgb, atol=TOL)


def test_server_down_is_typed_and_adapter_recovers(tmp_path: Path, frames: np.ndarray) -> None:
    repo = build_repository(DEMO, tmp_path / "repo", RepositoryConfig(threads=1))
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    config = ServerConfig(repo, models=("pose_encoder",), **ports)
    backend = TritonBackend(
        TritonConfig(url=f"127.0.0.1:{ports['grpc_port']}", timeout_s=5, retries=1, backoff_s=0.05)
    )
    with TritonServer(config):
        assert backend.encode_pose(frames[:2]).shape == (2, 256)
    start = time.perf_counter()
    with pytest.raises(InferenceUnavailable):
        backend.encode_pose(frames[:2])
    assert time.perf_counter() - start < 15
    assert not backend.is_ready(["pose_encoder"])
    with TritonServer(config):  # back on the same ports: the same adapter works again
        assert backend.encode_pose(frames[:2]).shape == (2, 256)
        assert backend.is_ready(["pose_encoder"])
    backend.close()
