"""Meta-learning iterations/s and peak memory per preset and batch size (JSON on stdout).

Runs `training.loop.Trainer.step`, the loop's own iteration, on random batches, so data
loading is excluded. Perceptual losses are off (no VGG weights on these machines).
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import cpu_name, emit
from model.config import PRESETS, ModelConfig
from training.config import DataConfig, TrainConfig
from training.data import Sample
from training.distributed import DistInfo
from training.loop import Trainer
from training.losses import LossWeights


def random_batch(cfg: ModelConfig, batch: int, k: int, device: torch.device) -> Sample:
    s = cfg.image_size
    return Sample(
        identity_images=torch.rand(batch, k, 3, s, s, device=device),
        pose_image=torch.rand(batch, 3, s, s, device=device),
        target=torch.rand(batch, 3, s, s, device=device),
        mask=torch.rand(batch, 1, s, s, device=device),
        label=torch.zeros(batch, dtype=torch.long, device=device),  # type: ignore[arg-type]
    )


def bench(
    preset: str, batch: int, k: int, iters: int, device: torch.device, amp: str
) -> dict[str, Any]:
    model_cfg = ModelConfig.preset(preset, num_labels=16)
    cfg = TrainConfig(
        data=DataConfig(root="unused", k=k),
        preset=preset,
        batch_size=batch,
        losses=LossWeights(vgg19=0, vggface=0, l1=1.0),
        amp=amp,  # type: ignore[arg-type]
        device=device.type,
    )
    trainer = Trainer(cfg, model_cfg, DistInfo(), device)
    sample = random_batch(model_cfg, batch, k, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(iters + 1):  # the first iteration is warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.step(sample, i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    row: dict[str, Any] = {
        "preset": preset,
        "batch_size": batch,
        "k": k,
        "amp": amp,
        "it_per_s": 1 / median,
        "samples_per_s": batch / median,
        "ms_per_it": median * 1e3,
    }
    if device.type == "cuda":
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:  # process-wide high-water mark (includes earlier presets)
        row["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny-64,small-128")
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--k", type=int, default=4, help="identity frames per sample")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["off", "fp16", "bf16"], default="off")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    if bad := sorted(set(presets) - set(PRESETS)):
        parser.error(f"unknown presets {bad}")
    device = torch.device(args.device)
    rows = [
        bench(p, int(b), args.k, args.iters, device, args.amp)
        for p in presets
        for b in args.batch_sizes.split(",")
    ]
    report = {
        "benchmark": "train_speed",
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "results": rows,
    }
    table = "\n".join(
        f"{r['preset']:<14} batch {r['batch_size']:>3}  {r['it_per_s']:7.2f} it/s" for r in rows
    )
    emit(report, args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
