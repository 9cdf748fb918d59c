"""`python -m evaluation` runs end to end on the demo checkpoint at a tiny size."""

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).parents[2]
DEMO = ROOT / "checkpoints" / "demo-tiny-64.safetensors"
TINY = [
    "--identities", "3", "--frames-per-driver", "2", "--probe-identities", "20",
    "--pose-probe-identities", "4", "--threads", "1",
]  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evaluation", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_synthetic_suite_writes_metrics_and_report(tmp_path: Path) -> None:
    start = time.perf_counter()
    args = ["--checkpoint", str(DEMO), "--suite", "synthetic", "--seed", "3", *TINY]
    result = _run(*args, "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - start < 60

    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["seed"] == 3 and len(metrics["checkpoint"]["sha256"]) == 64
    assert metrics["config"]["identities"] == 3
    cross = metrics["cross_person"]
    assert cross["avatars"] == "zero-shot" and cross["frames"] == 3 * 2 * 2
    for key in ("l1", "psnr_db", "ssim"):
        assert set(cross[key]) == {"mean", "std", "median"}
    assert 0 < cross["l1"]["mean"] < 0.5 and 0 < cross["ssim"]["mean"] <= 1
    assert 0 <= cross["pose_error"]["detected_fraction"] <= 1
    assert "TODO" in cross["finetuned"]
    for part in ("output", "ground_truth", "driver_frames"):
        assert set(metrics["identity_leakage"][part] or {"avatar_corr", "driver_corr"}) == {
            "avatar_corr",
            "driver_corr",
        }
    pose = metrics["pose_descriptor"]
    assert pose["identity_from_pose"]["chance"] == pytest.approx(1 / 4)
    assert pose["pose_params_from_pose"]["metric"] == "r2"

    page = (tmp_path / "a" / "report.html").read_text()
    images = page.split('src="data:image/png;base64,')[1:]
    assert len(images) >= 2  # the sample grid and the probe plot
    assert base64.b64decode(images[0].split('"')[0]).startswith(b"\x89PNG")

    # the same seed gives the same numbers
    assert _run(*args, "--out", str(tmp_path / "b"), "--no-pose-error").returncode == 0
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert again["cross_person"]["l1"] == cross["l1"]
    assert again["identity_leakage"] == metrics["identity_leakage"]
    assert again["pose_descriptor"] == metrics["pose_descriptor"]


def test_real_suite_is_not_implemented_yet(tmp_path: Path) -> None:
    result = _run("--checkpoint", str(DEMO), "--suite", "real", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "not implemented yet" in result.stderr
