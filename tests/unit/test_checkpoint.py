"""Checkpoint format: round trip and a typed error for every way a file can be wrong."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import (
    Checkpoint,
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointPresetError,
    CheckpointVersionError,
    load_checkpoint,
    read_header,
    save_checkpoint,
)
from model.config import ModelConfig
from model.discriminator import Discriminator
from model.inference import InferenceModel
from model.reenactor import Reenactor
from model.release import main as release


@pytest.fixture
def saved(tmp_path: Path, tiny: ModelConfig) -> tuple[Path, Reenactor]:
    torch.manual_seed(0)
    net = Reenactor(tiny)
    ema = Reenactor(tiny)
    ckpt = Checkpoint(
        config=tiny,
        reenactor=net.state_dict(),
        ema=ema.state_dict(),
        discriminator=Discriminator(tiny).state_dict(),
        avatar={"identity": torch.randn(1, 512)},
        info={"step": 42},
    )
    return save_checkpoint(tmp_path / "tiny.safetensors", ckpt), ema


def test_round_trip_keeps_every_tensor(saved: tuple[Path, Reenactor], tiny: ModelConfig) -> None:
    path, ema = saved
    ckpt = load_checkpoint(path, expect_preset="tiny-64")
    assert ckpt.config == tiny
    assert ckpt.info == {"step": 42}
    assert ckpt.ema is not None and ckpt.discriminator is not None
    for key, value in ema.state_dict().items():
        assert torch.equal(ckpt.ema[key], value), key
    assert ckpt.avatar_identity() is not None
    assert ckpt.avatar_identity().shape == (512,)
    assert read_header(path) == (tiny, {"step": 42})


def test_inference_loads_the_ema_weights(saved: tuple[Path, Reenactor]) -> None:
    path, ema = saved
    model = InferenceModel.from_checkpoint(path)
    frames = torch.rand(2, 3, 64, 64)
    ema.eval()
    with torch.no_grad():
        expected = ema.encode_pose(frames)
    torch.testing.assert_close(model.encode_pose(frames), expected)
    assert model.avatar_identity is not None


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file(saved: tuple[Path, Reenactor], tmp_path: Path) -> None:
    path, _ = saved
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointCorruptError):
            load_checkpoint(bad)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not safetensors")
    with pytest.raises(CheckpointCorruptError):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointCorruptError, match="no format header"):
        load_checkpoint(foreign)


def test_wrong_version(tmp_path: Path, tiny: ModelConfig) -> None:
    path = tmp_path / "future.safetensors"
    meta = {
        "format": "lpd-checkpoint",
        "format_version": "99",
        "config": json.dumps(tiny.to_dict()),
    }
    save_file({"reenactor.x": torch.zeros(1)}, str(path), metadata=meta)
    with pytest.raises(CheckpointVersionError, match="version 99"):
        load_checkpoint(path)


def test_wrong_preset(saved: tuple[Path, Reenactor]) -> None:
    path, _ = saved
    with pytest.raises(CheckpointPresetError, match="tiny-64"):
        load_checkpoint(path, expect_preset="official-256")
    with pytest.raises(CheckpointPresetError):
        InferenceModel.from_checkpoint(path, expect_preset="small-128")


def test_weights_that_do_not_fit_the_config(tmp_path: Path, tiny: ModelConfig) -> None:
    small = ModelConfig.preset("small-128")
    state = Reenactor(tiny).state_dict()
    path = save_checkpoint(tmp_path / "lying.safetensors", Checkpoint(small, state))
    with pytest.raises(CheckpointMismatchError, match="wrong_shape"):
        InferenceModel.from_checkpoint(path)


def test_save_is_atomic(tmp_path: Path, tiny: ModelConfig) -> None:
    path = save_checkpoint(
        tmp_path / "a.safetensors", Checkpoint(tiny, Reenactor(tiny).state_dict())
    )
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_release_checkpoint_is_small_and_equivalent(
    saved: tuple[Path, Reenactor], tmp_path: Path
) -> None:
    path, _ = saved
    out = tmp_path / "release.safetensors"
    assert release([str(path), str(out)]) == 0
    slim = load_checkpoint(out)
    assert slim.ema is None and slim.discriminator is None
    assert next(iter(slim.reenactor.values())).dtype in (torch.float16, torch.int64)
    assert out.stat().st_size < path.stat().st_size / 4
    frames = torch.rand(2, 3, 64, 64)
    full, small = InferenceModel.from_checkpoint(path), InferenceModel.from_checkpoint(out)
    assert next(small.net.parameters()).dtype == torch.float32
    identity = full.embed_identity(frames)
    assert (
        full.reenact(identity, frames).rgb - small.reenact(identity, frames).rgb
    ).abs().max() < 0.02
    assert small.avatar_identity is not None
