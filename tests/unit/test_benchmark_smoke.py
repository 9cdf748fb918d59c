"""Smoke test: the model speed benchmark runs in-process and emits well-formed JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.model_speed import COMPONENTS, main

pytestmark = pytest.mark.unit


def test_model_speed_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.json"
    argv = ["--presets", "tiny-64", "--batch-sizes", "1", "--device", "cpu", "--iters", "1"]
    argv += ["--warmup", "0", "--min-seconds", "0", "--out", str(out)]
    assert main(argv) == 0

    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report  # stdout is the same, valid JSON
    assert report["benchmark"] == "model_speed"
    assert report["device"] == "cpu"
    for key in ("torch", "device_name", "threads", "date"):
        assert key in report
    assert len(report["results"]) == 1
    row = report["results"][0]
    assert (row["preset"], row["dtype"], row["batch_size"]) == ("tiny-64", "float32", 1)
    for name in COMPONENTS:
        assert row[name]["frames_per_s"] > 0
        assert row[name]["ms_per_batch"] > 0
        assert row[name]["iterations"] == 1


def test_float16_on_cpu_is_skipped(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    argv = ["--presets", "tiny-64", "--batch-sizes", "1", "--device", "cpu", "--dtypes"]
    argv += ["float16", "--iters", "1", "--warmup", "0", "--min-seconds", "0", "--out", str(out)]
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["dtype"] == "float16" and "skipped" in row
