"""Meta-learning loop on a tiny synthetic dataset: it learns, resumes exactly, validates config."""

import json
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.reenactor import Reenactor
from model.release import slim
from training.config import OptimConfig, load_config
from training.loop import lr_factor, train
from training.synthetic import SynthConfig, generate
from training.train import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out=root, identities=3, clips=1, frames=6, size=64, seed=1))
    return root


def overrides(root: Path, run_dir: Path, **extra: object) -> list[str]:
    base = {
        "data.root": root,
        "data.k": 2,
        "run_dir": run_dir,
        "batch_size": 2,
        "losses.vgg19": 0,
        "losses.vggface": 0,
        "log_every": 1,
        "image_every": 1000,
    }
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def test_tiny_overfit_run_learns(synthetic: Path, tmp_path: Path) -> None:
    """Every term stays finite and the reconstruction error falls on a 2-video overfit."""
    args = overrides(
        synthetic, tmp_path, steps=40, **{"losses.l1": 10, "optim.lr_g": 1e-3,
                                          "data.augment.enabled": False, "checkpoint_every": 40}
    )  # fmt: skip
    train(load_config(None, args))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    for row in rows:
        assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
    first = sum(r["g/l1"] for r in rows[:10]) / 10
    last = sum(r["g/l1"] for r in rows[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    assert (tmp_path / "samples" / "0000040.png").exists()
    ckpt = load_checkpoint(tmp_path / "last.safetensors")
    assert ckpt.info["step"] == 40 and ckpt.config.num_labels == 3


def test_resume_reproduces_an_uninterrupted_run(synthetic: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(load_config(None, overrides(synthetic, straight, steps=4, checkpoint_every=2)))
    train(load_config(None, overrides(synthetic, resumed, steps=2, checkpoint_every=2)))
    train(load_config(None, overrides(synthetic, resumed, steps=4, checkpoint_every=2)))
    a = load_checkpoint(straight / "last.safetensors")
    b = load_checkpoint(resumed / "last.safetensors")
    for group in ("reenactor", "ema", "discriminator"):
        sa, sb = getattr(a, group), getattr(b, group)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{group}.{key}"


def test_config_errors_are_clear(synthetic: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="vgg19_weights"):
        train(load_config(None, [f"data.root={synthetic}", f"run_dir={tmp_path}"]))
    assert main(["steps=1"]) == 2
    assert "data.root is required" in capsys.readouterr().err
    assert main([f"data.root={synthetic}", "bogus=1"]) == 2
    assert "unknown TrainConfig keys" in capsys.readouterr().err


def test_learning_rate_tail_decay() -> None:
    """Off by default (official constant rates); with decay_from, a linear fall to zero."""
    assert lr_factor(OptimConfig(), 900, 1000) == 1.0
    tail = OptimConfig(decay_from=0.5)
    assert [lr_factor(tail, s, 1000) for s in (0, 499, 500, 750, 1000)] == [1, 1, 1, 0.5, 0]


def test_warm_start_seeds_the_weights(synthetic: Path, tmp_path: Path) -> None:
    """init_from: a release (EMA weights only) seeds reenactor and EMA; steps count from 0."""
    base = tmp_path / "base"
    train(load_config(None, overrides(synthetic, base, steps=2, checkpoint_every=2)))
    release = tmp_path / "release.safetensors"
    save_checkpoint(release, slim(load_checkpoint(base / "last.safetensors"), torch.float32))
    warm = tmp_path / "warm"
    frozen = ["optim.lr_g=0", "optim.lr_d=0", "ema_decay=1.0", f"init_from={release}"]
    train(load_config(None, [*overrides(synthetic, warm, steps=1), *frozen]))
    got, want = load_checkpoint(warm / "last.safetensors"), load_checkpoint(release)
    assert got.info["step"] == 1
    assert got.ema is not None
    # With zero learning rates the parameters stay; buffers (batch-norm statistics, spectral
    # norm's power-iteration vectors) move in any training forward.
    params = [name for name, _ in Reenactor(want.config).named_parameters()]
    assert params
    for key in params:
        assert torch.equal(got.reenactor[key], want.reenactor[key]), key
        assert torch.equal(got.ema[key], want.reenactor[key]), key


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parents[2] / "training" / "configs").rglob("*.yaml")),
    ids=lambda p: p.name,
)
def test_committed_recipes_parse(path: Path) -> None:
    """Every recipe the README points at loads as a TrainConfig (no stale or misspelt keys)."""
    cfg = load_config(path)
    assert cfg.steps > 0 and cfg.data.root.startswith("data/")
