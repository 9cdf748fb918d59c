"""The demo evaluation runs end to end and reports every method against ground truth."""

import json
from pathlib import Path

import pytest

from training.evaluate_demo import EvalConfig, evaluate
from training.synthetic import SynthConfig, generate

pytestmark = pytest.mark.slow
DEMO = Path(__file__).parents[2] / "checkpoints" / "demo-tiny-64.safetensors"


def test_demo_evaluation_report(tmp_path: Path) -> None:
    data = tmp_path / "synth"
    generate(SynthConfig(out=data, identities=6, clips=1, frames=6, size=64, seed=4))
    cfg = EvalConfig(drivers_per_identity=2, frames_per_driver=2, val_fraction=0.5)
    metrics = evaluate(DEMO, data, tmp_path / "eval", cfg)
    assert metrics["held_out_identities"] == 3 and metrics["pairs_frames"] == 12
    methods = {
        "trained",
        "trained_other_frame",
        "copy_identity_frame",
        "copy_best_identity_frame",
        "untrained",
    }
    assert set(metrics["l1"]) == set(metrics["psnr_db"]) == methods
    assert metrics["l1"]["trained"] < metrics["l1"]["untrained"]
    # The oracle picks the best of the K frames, so it never loses to always taking the first.
    l1 = metrics["l1"]
    assert l1["copy_best_identity_frame"] <= l1["copy_identity_frame"]
    assert set(metrics["l1_by_pose_change_tercile"]) == {"small", "medium", "large"}
    wins = metrics["win_rate"]["trained"]
    assert set(wins) == methods - {"trained"} and wins["untrained"] == 1.0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics
    assert (tmp_path / "eval" / "cross_reenactment.png").stat().st_size > 1000


def test_finetuned_method_is_scored(tmp_path: Path) -> None:
    data = tmp_path / "synth"
    generate(SynthConfig(out=data, identities=4, clips=1, frames=6, size=64, seed=5))
    cfg = EvalConfig(
        k=2, drivers_per_identity=1, frames_per_driver=1, val_fraction=0.5, finetune_steps=2
    )
    metrics = evaluate(DEMO, data, tmp_path / "eval", cfg)
    assert metrics["finetune"] == {"steps": 2, "mode": "full"}
    assert 0 < metrics["l1"]["finetuned"] < metrics["l1"]["untrained"]
    # One driver frame: the other-frame control is driven by that same frame.
    assert metrics["l1"]["finetuned_other_frame"] == metrics["l1"]["finetuned"]
