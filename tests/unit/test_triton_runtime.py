"""The Python-backend runtime and the repository builder, without a server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.triton import spec
from deploy.triton.export import RepositoryConfig, build_repository, model_config
from deploy.triton.runtime import (
    AvatarCache,
    GeneratorRuntime,
    RenderRequest,
    RequestError,
    RuntimeConfig,
)
from model.checkpoint import Checkpoint, CheckpointNotFoundError, load_checkpoint, save_checkpoint
from model.inference import InferenceModel

DEMO = Path(__file__).parents[2] / "checkpoints" / "demo-tiny-64.safetensors"
MLP = "generator.mlp."


def write_avatar(path: Path, scale: float, keys_prefix: str = MLP) -> Path:
    """A `light`-style avatar: the AdaIN MLP perturbed, plus its own identity."""
    base = load_checkpoint(DEMO).weights()
    state = {k: v * scale for k, v in base.items() if k.startswith(keys_prefix) and "original" in k}
    torch.manual_seed(int(scale * 100))
    identity = torch.randn(1, 512)
    return save_checkpoint(
        path, Checkpoint(load_checkpoint(DEMO).config, state, avatar={"identity": identity})
    )


@pytest.fixture(scope="module")
def avatar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("avatars")
    write_avatar(root / "ann.safetensors", 1.5)
    write_avatar(root / "bob.safetensors", 0.5)
    return root


@pytest.fixture(scope="module")
def runtime(avatar_dir: Path) -> GeneratorRuntime:
    return GeneratorRuntime(RuntimeConfig(DEMO, avatar_dir=avatar_dir, avatar_cache_mb=1e-3))


def test_parameters_resolve_relative_to_model_dir(tmp_path: Path) -> None:
    cfg = RuntimeConfig.from_parameters(
        {"checkpoint": "w.safetensors", "avatar_dir": ""}, tmp_path, "cpu"
    )
    assert cfg.checkpoint == tmp_path / "w.safetensors"
    assert cfg.avatar_dir is None


def test_requests_grouped_by_avatar_and_errors_isolated(
    runtime: GeneratorRuntime, avatar_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(0)
    poses = [torch.randn(n, 256, generator=g).numpy() for n in (2, 1, 3, 2)]
    ids = [torch.randn(n, 512, generator=g).numpy() for n in (2, 1, 3, 2)]
    requests = [
        RenderRequest(poses[0], ids[0], None),  # zero-shot
        RenderRequest(poses[1], None, ["ann"]),  # fine-tuned
        RenderRequest(poses[2], ids[2], ["", "ann", ""]),  # mixed rows
        RenderRequest(poses[3], None, ["nobody", "nobody"]),  # unknown avatar
        RenderRequest(np.zeros((1, 7), np.float32), None, None),  # malformed
    ]
    calls = []
    render = runtime.model.render
    monkeypatch.setattr(runtime.model, "render", lambda *a, **k: calls.append(1) or render(*a, **k))
    results = runtime(requests)
    assert len(calls) == 2  # all zero-shot rows in one forward, all `ann` rows in another
    assert isinstance(results[3], RequestError) and "unknown avatar" in str(results[3])
    assert isinstance(results[4], RequestError) and "POSE" in str(results[4])

    ann = InferenceModel.from_checkpoint(avatar_dir / "ann.safetensors", base=DEMO)
    plain = InferenceModel.from_checkpoint(DEMO)
    expected = [
        plain.render(torch.from_numpy(ids[0]), torch.from_numpy(poses[0])).rgb,
        ann.render(ann.avatar_identity, torch.from_numpy(poses[1])).rgb,
    ]
    for got, want in zip(results[:2], expected, strict=True):
        assert not isinstance(got, RequestError)
        np.testing.assert_allclose(got[0], want.numpy(), atol=1e-5)
    mixed = results[2]
    assert not isinstance(mixed, RequestError)
    row1 = ann.render(ann.avatar_identity, torch.from_numpy(poses[2][1:2])).rgb
    np.testing.assert_allclose(mixed[0][1:2], row1.numpy(), atol=1e-5)
    row0 = plain.render(torch.from_numpy(ids[2][:1]), torch.from_numpy(poses[2][:1])).rgb
    np.testing.assert_allclose(mixed[0][:1], row0.numpy(), atol=1e-5)


def test_zero_shot_rows_need_identity(runtime: GeneratorRuntime) -> None:
    (result,) = runtime([RenderRequest(np.zeros((2, 256), np.float32), None, ["ann", ""])])
    assert isinstance(result, RequestError) and "IDENTITY" in str(result)


def test_cache_is_lru_bounded_and_shares_unchanged_tensors(
    runtime: GeneratorRuntime, avatar_dir: Path
) -> None:
    cache = runtime.cache
    assert isinstance(cache, AvatarCache)
    ann = cache.get("ann")
    changed = [p for n, p in ann.generator.mlp.named_parameters() if n.endswith("weight")]
    # Only the perturbed MLP weights are owned; biases and blocks are the base's tensors.
    assert ann.nbytes == sum(p.numel() * p.element_size() for p in changed)
    blocks = ann.generator.blocks[0]
    base_blocks = runtime.model.net.generator.blocks[0]
    assert all(a is b for a, b in zip(blocks.parameters(), base_blocks.parameters(), strict=True))

    misses, evictions = cache.stats.misses, cache.stats.evictions
    cache.get("bob")  # over the (tiny) bound: ann goes
    assert cache.stats.evictions == evictions + 1 and cache.stats.resident == 1
    cache.get("ann")
    assert cache.stats.misses == misses + 2
    assert cache.evict("ann") and not cache.evict("ann")
    with pytest.raises(RequestError, match="invalid avatar id"):
        cache.get("../etc/passwd")


def test_python_repository_layout(tmp_path: Path) -> None:
    repo = build_repository(DEMO, tmp_path / "repo", RepositoryConfig(avatar_dir=tmp_path))
    for name in spec.MODELS:
        assert (repo / name / "config.pbtxt").is_file()
        assert (repo / name / "1" / "model.py").is_file()
    weights = repo / "generator" / "1" / "model.safetensors"
    assert weights.stat().st_size == DEMO.stat().st_size
    config = (repo / "generator" / "config.pbtxt").read_text()
    assert 'name: "AVATAR_ID"' in config and "optional: true" in config
    assert "dynamic_batching" in config and 'key: "avatar_dir"' in config
    assert "max_batch_size: 0" in (repo / "identity_encoder" / "config.pbtxt").read_text()


def test_onnx_repository_for_gpu_fp16(tmp_path: Path) -> None:
    cfg = RepositoryConfig(flavour="onnx", device="gpu", dtype="fp16", instances=2, max_batch=64)
    repo = build_repository(DEMO, tmp_path / "repo", cfg)
    for name in (spec.IDENTITY_ENCODER, spec.POSE_ENCODER, spec.GENERATOR):
        assert (repo / name / "1" / "model.onnx").is_file()
        text = (repo / name / "config.pbtxt").read_text()
        assert 'backend: "onnxruntime"' in text and "KIND_GPU" in text and "tensorrt" in text
        assert "AVATAR_ID" not in text
    assert (repo / spec.REENACT / "1" / "model.py").is_file()  # the BLS model is shared
    assert (
        "preferred_batch_size: [ 16, 32, 64 ]" in (repo / "generator" / "config.pbtxt").read_text()
    )
    assert not list(tmp_path.glob(".repo.*"))  # no temp folder left


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        build_repository(tmp_path / "missing.safetensors", tmp_path / "repo", RepositoryConfig())
    assert list(tmp_path.iterdir()) == []


def test_model_config_instances_and_cpu_kind() -> None:
    cfg = load_checkpoint(DEMO).config
    text = model_config(spec.POSE_ENCODER, cfg, RepositoryConfig(instances=3), {})
    assert "kind: KIND_CPU" in text and "count: 3" in text and "dims: [ 3, 64, 64 ]" in text
