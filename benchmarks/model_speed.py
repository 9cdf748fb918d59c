"""Inference throughput (frames/s) of the pose encoder, generator and both, per preset/dtype/batch.

Run from the repo root: `python -m benchmarks.model_speed --help`. JSON goes to stdout (and --out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.report import cpu_name, emit
from model.checkpoint import read_header
from model.config import PRESETS, ModelConfig
from model.inference import InferenceModel
from model.reenactor import Reenactor
from model.summary import summarize

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
COMPONENTS = ("pose_encoder", "generator", "end_to_end")
ModelFactory = Callable[[str], InferenceModel]  # dtype name -> model


@dataclass(frozen=True)
class BenchConfig:
    """Everything the CLI sets; one run benchmarks every (preset, dtype, batch size)."""

    presets: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    device: str
    dtypes: tuple[str, ...]
    warmup: int = 2
    iters: int = 5
    min_seconds: float = 1.0
    threads: int | None = None
    compile: bool | str = False
    checkpoint: Path | None = None
    out: Path | None = None


# --- CLI -----------------------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> BenchConfig:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_speed", description=__doc__)
    p.add_argument("--presets", default="tiny-64,small-128,official-256")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--device", default=default_device, choices=("cpu", "cuda"))
    p.add_argument("--dtypes", default="float32", help="comma list of float32,float16,bfloat16")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per component")
    p.add_argument("--iters", type=int, default=5, help="minimum timed calls per component")
    p.add_argument("--min-seconds", type=float, default=1.0, help="minimum timed seconds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        help="torch.compile encoder and generator; optional mode, e.g. reduce-overhead",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="benchmark this checkpoint (its preset replaces --presets)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args(argv)

    presets, dtypes = _csv(a.presets), _csv(a.dtypes)
    if bad := sorted(set(presets) - set(PRESETS)):
        p.error(f"unknown presets {bad}; choose from {sorted(PRESETS)}")
    if bad := sorted(set(dtypes) - set(DTYPES)):
        p.error(f"unknown dtypes {bad}; choose from {sorted(DTYPES)}")
    try:
        batch_sizes = [int(b) for b in _csv(a.batch_sizes)]
    except ValueError:
        p.error(f"--batch-sizes must be integers, got {a.batch_sizes!r}")
    if not batch_sizes or min(batch_sizes) < 1:
        p.error("--batch-sizes must be positive integers")
    if a.iters < 1 or a.warmup < 0 or a.min_seconds < 0:
        p.error("need --iters >= 1, --warmup >= 0, --min-seconds >= 0")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    return BenchConfig(
        presets=tuple(presets), batch_sizes=tuple(batch_sizes), device=a.device,
        dtypes=tuple(dtypes), warmup=a.warmup, iters=a.iters, min_seconds=a.min_seconds,
        threads=a.threads, compile=a.compile, checkpoint=a.checkpoint, out=a.out,
    )  # fmt: skip


# --- environment ---------------------------------------------------------------------------
def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def skip_reason(device: str, dtype: str) -> str | None:
    """Why (device, dtype) is not benchmarked, or None when it is."""
    if device == "cpu" and dtype == "float16":
        return "float16 autocast is not benchmarked on CPU (slow, not a serving target)"
    if device == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        return "this GPU does not support bfloat16"
    return None


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --- models and inputs ---------------------------------------------------------------------
def model_sources(cfg: BenchConfig) -> Iterator[tuple[ModelConfig, ModelFactory]]:
    """Per preset: its config and a factory building an InferenceModel for a dtype name."""
    if cfg.checkpoint is not None:
        path = cfg.checkpoint
        ckpt_cfg, _ = read_header(path)

        def from_ckpt(dtype: str) -> InferenceModel:
            return InferenceModel.from_checkpoint(
                path, cfg.device, DTYPES[dtype], compile=cfg.compile
            )

        yield ckpt_cfg, from_ckpt
        return
    for name in cfg.presets:
        torch.manual_seed(0)
        reenactor = Reenactor(ModelConfig.preset(name))

        def from_random(dtype: str, net: Reenactor = reenactor) -> InferenceModel:
            return InferenceModel(net, cfg.device, DTYPES[dtype], compile=cfg.compile)

        yield reenactor.cfg, from_random


def make_inputs(model: InferenceModel, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed identity (the avatar's if the checkpoint has one) and random frames on device."""
    gen = torch.Generator().manual_seed(batch_size)
    size, device = model.config.image_size, model.device
    frames = torch.rand(batch_size, 3, size, size, generator=gen).to(device)
    identity = model.avatar_identity
    if identity is None:
        identity = torch.randn(model.config.identity_dim, generator=gen).to(device)
    return identity, frames


def gflops_per_frame(model_cfg: ModelConfig) -> dict[str, float]:
    """Per-frame GFLOPs of each component, counted by `model.summary` on the meta device."""
    gflops = summarize(model_cfg)["gflops_per_frame"]
    return {
        "pose_encoder": gflops["pose_encoder"],
        "generator": gflops["generator"],
        "end_to_end": gflops["inference_per_frame"],
    }


# --- timing --------------------------------------------------------------------------------
def time_calls(fn: Callable[[], Any], cfg: BenchConfig) -> list[float]:
    """Seconds per call: warmup calls, then at least `iters` calls and `min_seconds` total."""
    for _ in range(cfg.warmup):
        fn()
    synchronize(cfg.device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < cfg.iters or time.perf_counter() - start < cfg.min_seconds:
        synchronize(cfg.device)
        t0 = time.perf_counter()
        fn()
        synchronize(cfg.device)
        times.append(time.perf_counter() - t0)
    return times


def measure(fn: Callable[[], Any], batch_size: int, cfg: BenchConfig) -> dict[str, Any]:
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = time_calls(fn, cfg)
    median = statistics.median(times)
    stats: dict[str, Any] = {
        "frames_per_s": batch_size / median,
        "ms_per_batch": median * 1e3,
        "ms_per_batch_min": min(times) * 1e3,
        "iterations": len(times),
    }
    if cfg.device == "cuda":
        stats["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return stats


def bench_batch(model: InferenceModel, batch_size: int, cfg: BenchConfig) -> dict[str, Any]:
    """Time the three components of one model at one batch size."""
    identity, frames = make_inputs(model, batch_size)
    poses = model.encode_pose(frames)
    calls: dict[str, Callable[[], Any]] = {
        "pose_encoder": lambda: model.encode_pose(frames),
        "generator": lambda: model.render(identity, poses),
        "end_to_end": lambda: model.reenact(identity, frames),
    }
    return {name: measure(calls[name], batch_size, cfg) for name in COMPONENTS}


# --- driver --------------------------------------------------------------------------------
def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    report: dict[str, Any] = {
        "benchmark": "model_speed",
        "torch": torch.__version__,
        "device": cfg.device,
        "device_name": device_name(cfg.device),
        "threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "weights": str(cfg.checkpoint) if cfg.checkpoint else "random",
        "compile": cfg.compile,
        "settings": {"warmup": cfg.warmup, "iters": cfg.iters, "min_seconds": cfg.min_seconds},
        "results": [],
    }
    num_presets = 1 if cfg.checkpoint else len(cfg.presets)
    total = num_presets * len(cfg.dtypes) * len(cfg.batch_sizes)
    with tqdm(total=total, desc="model_speed", file=sys.stderr) as bar:
        for model_cfg, build in model_sources(cfg):
            for dtype in cfg.dtypes:
                report["results"] += bench_dtype(model_cfg, dtype, build, cfg, bar)
    return report


def bench_dtype(
    model_cfg: ModelConfig,
    dtype: str,
    build: ModelFactory,
    cfg: BenchConfig,
    bar: tqdm,
) -> list[dict[str, Any]]:
    """Result rows for one (preset, dtype): one per batch size, or `skipped` with a reason."""
    rows: list[dict[str, Any]] = []
    reason = skip_reason(cfg.device, dtype)
    model = None if reason else build(dtype)
    flops = gflops_per_frame(model_cfg)
    for batch_size in cfg.batch_sizes:
        bar.set_postfix_str(f"{model_cfg.name} {dtype} bs={batch_size}")
        row: dict[str, Any] = {"preset": model_cfg.name, "dtype": dtype, "batch_size": batch_size}
        if model is not None:
            try:
                row |= bench_batch(model, batch_size, cfg)
                for name in COMPONENTS:
                    row[name]["gflops_per_frame"] = flops[name]
            except torch.OutOfMemoryError:
                row["skipped"] = "out of memory"
        else:
            row["skipped"] = reason
        rows.append(row)
        bar.update()
    return rows


def summary_table(report: dict[str, Any]) -> str:
    lines = [f"{'preset':<14}{'dtype':<10}{'batch':>6}  {'component':<14}{'frames/s':>10}"]
    for row in report["results"]:
        head = f"{row['preset']:<14}{row['dtype']:<10}{row['batch_size']:>6}  "
        if "skipped" in row:
            lines.append(f"{head}skipped: {row['skipped']}")
            continue
        for name in COMPONENTS:
            lines.append(f"{head}{name:<14}{row[name]['frames_per_s']:>10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    report = run_benchmark(cfg)
    emit(report, cfg.out, summary_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
