"""Smoke test: the Triton-vs-torch benchmark starts a real server and emits well-formed JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks.triton_speed import main

pytestmark = pytest.mark.integration


@pytest.fixture
def keep_torch_threads() -> Iterator[None]:
    """The benchmark sets torch's (process-wide) thread count; later tests get it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("keep_torch_threads")
def test_triton_speed_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "triton_speed.json"
    # One thread per server instance and for torch: with the default (one per core) on a
    # small shared host, OpenMP barriers across processes make everything ~30x slower.
    assert main(["--quick", "--threads", "1", "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report  # stdout is the same, valid JSON
    assert report["benchmark"] == "triton_speed"
    assert (report["device"], report["preset"]) == ("cpu", "tiny-64")
    for key in ("torch", "device_name", "threads", "date", "weights", "settings", "server"):
        assert key in report
    assert report["settings"]["quick"] is True

    latency = report["latency"]
    for side in ("torch", "triton"):
        for key in ("median_ms", "p90_ms", "p99_ms"):
            assert latency[side][key] > 0
        assert latency[side]["frames"] == 5
        assert latency["triton_over_torch"]["median_ms"] > 0

    assert set(report["throughput"]) == {"chunk_1_client", "chunk_2_clients", "stream_2_clients"}
    for phase in report["throughput"].values():
        assert phase["torch"]["frames_per_s"] > 0
        assert phase["triton"]["frames_per_s"] > 0
        assert phase["triton_over_torch"] > 0
        for model in ("pose_encoder", "generator"):
            stats = phase["server"][model]
            # every frame of the warm-up and timed rounds; batching merges, never splits
            rounds = 1 + report["settings"]["repeats"]
            assert stats["frames"] == phase["clients"] * phase["frames_per_client"] * rounds
            assert 1 <= stats["mean_batch"] <= report["settings"]["max_batch"]

    avatar = report["avatar"]
    assert avatar["triton"]["first_request_ms"] > 0
    assert avatar["triton"]["warm_request_ms"] > 0
    assert avatar["triton"]["server_cache_load_ms"] > 0
    assert avatar["torch"]["load_plus_first_ms"] > 0
