"""Triton (embedded server, python flavour) vs direct torch, measured side by side in one run.

Why: the service reaches the model only through Triton, so this prices what the server, the
wire (gRPC or HTTP) and the BLS hop add per real-time frame, what it gains on video chunks
and on several concurrent clients (separate model processes pipeline; dynamic batching merges
concurrent batch-1 streams), and how long a fine-tuned avatar takes on first use.
Torch runs in this process on the same device, dtype and thread count as each server instance,
its concurrent clients as threads sharing one model. Triton and torch calls are interleaved so
background load drifts hit both alike. Server batch statistics are deltas over each phase.

Run from the repo root: `python -m benchmarks.triton_speed --help`. JSON goes to stdout (and --out).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from benchmarks.report import cpu_name, emit
from deploy.triton.export import RepositoryConfig, build_repository
from deploy.triton.serve import ServerConfig, TritonServer, free_port
from model.checkpoint import Checkpoint, read_header, save_checkpoint
from model.config import PRESETS, ModelConfig
from model.inference import InferenceModel
from model.reenactor import Reenactor
from service.triton import GENERATOR, POSE_ENCODER, REENACT, TritonBackend, TritonConfig
from training.finetune import FinetuneConfig, finetune
from training.losses import LossWeights
from training.synthetic import identity_for, poses_for, render

DEMO = Path(__file__).resolve().parents[1] / "checkpoints" / "demo-tiny-64.safetensors"
STATS_MODELS = (POSE_ENCODER, GENERATOR, REENACT)
AVATAR_ID = "bench-light"
NO_VGG = LossWeights(vgg19=0, vggface=0, embedding_match=0, l1=10)  # no VGG weights needed
LATENCY_BLOCK = 10  # frames per side before switching sides (interleaving)
Frames = np.ndarray  # uint8 (N, 3, S, S)
Reenact = Callable[[Frames], object]
Job = Callable[[Reenact], list[float]]  # one client's work -> seconds per request


@dataclass(frozen=True)
class BenchConfig:
    """Everything the CLI sets."""

    checkpoint: Path | None = None  # None: a random checkpoint of `preset`
    preset: str | None = None
    device: Literal["cpu", "gpu"] = "cpu"
    dtype: Literal["fp32", "fp16"] = "fp32"
    instances: int = 1
    threads: int = 0
    max_batch: int = 32
    queue_delay_us: int = 500
    protocol: Literal["grpc", "http"] = "grpc"
    latency_frames: int = 100
    warmup: int = 5
    chunk: int = 64
    clients: int = 4
    repeats: int = 3
    avatar: bool | None = None  # None: only for tiny-64 (finetune on bigger CPU models is slow)
    quick: bool = False
    out: Path | None = None

    @property
    def torch_device(self) -> str:
        return "cuda" if self.device == "gpu" else "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        """fp16 applies on GPU only, as in the served models (deploy.triton.runtime)."""
        return torch.float16 if self.device == "gpu" and self.dtype == "fp16" else torch.float32


def parse_args(argv: list[str] | None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_speed", description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, default=None, help=f"default {DEMO.name}")
    src.add_argument("--preset", choices=sorted(PRESETS), help="random weights of this preset")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="fp16: GPU only")
    p.add_argument("--instances", type=int, default=1, help="instances per model")
    p.add_argument("--threads", type=int, default=0, help="torch threads per side; 0 = default")
    p.add_argument("--max-batch", type=int, default=32, help="server max batch = client chunk")
    p.add_argument("--queue-delay-us", type=int, default=500)
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--latency-frames", type=int, default=100, help="timed batch-1 frames")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per side and phase")
    p.add_argument("--chunk", type=int, default=64, help="frames per throughput call")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--repeats", type=int, default=3, help="timed throughput rounds")
    p.add_argument(
        "--avatar",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fine-tuned avatar cold load (default: only for tiny-64)",
    )
    p.add_argument("--quick", action="store_true", help="smoke-test sizes: few frames, 1 repeat")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    if min(a.instances, a.max_batch, a.latency_frames, a.chunk, a.clients, a.repeats) < 1:
        p.error("--instances, --max-batch, --latency-frames, --chunk, --clients, --repeats >= 1")
    if a.threads < 0 or a.warmup < 0 or a.queue_delay_us < 0:
        p.error("--threads, --warmup and --queue-delay-us must be >= 0")
    if a.device == "gpu" and not torch.cuda.is_available():
        p.error("--device gpu but CUDA is not available")
    sizes: dict[str, int] = {}
    if a.quick:
        sizes = {"latency_frames": 5, "warmup": 1, "chunk": 8, "clients": 2, "repeats": 1}
    fields = ("latency_frames", "warmup", "chunk", "clients", "repeats")
    return BenchConfig(
        checkpoint=None if a.preset else (a.checkpoint or DEMO), preset=a.preset,
        device=a.device, dtype=a.dtype, instances=a.instances, threads=a.threads,
        max_batch=a.max_batch, queue_delay_us=a.queue_delay_us, protocol=a.protocol,
        **{f: sizes.get(f, getattr(a, f)) for f in fields},
        avatar=a.avatar, quick=a.quick, out=a.out,
    )  # fmt: skip


# --- inputs --------------------------------------------------------------------------------
def random_checkpoint(preset: str, out: Path) -> Path:
    """A seeded random checkpoint of `preset` in our format (no weights needed to measure)."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset)
    return save_checkpoint(out, Checkpoint(cfg, Reenactor(cfg).state_dict()))


def make_frames(size: int, n: int, seed: int = 0) -> Frames:
    """Synthetic driver crops of one person: uint8 (n, 3, size, size)."""
    shots = [render(identity_for(seed, 0), p, size).image for p in poses_for(seed, 0, 0, n)]
    return np.ascontiguousarray(np.stack(shots).transpose(0, 3, 1, 2))


def torch_reenact(model: InferenceModel, identity: np.ndarray, max_batch: int) -> Reenact:
    """Direct torch, chunked like the adapter so both sides run the same batch sizes; the
    output goes to numpy (and so syncs a GPU) because that is what a Triton client gets."""
    ident = torch.from_numpy(identity).to(model.device)

    def call(frames: Frames) -> object:
        outs = []
        for i in range(0, len(frames), max_batch):
            out = model.reenact(ident, torch.from_numpy(frames[i : i + max_batch]))
            outs.append((out.rgb.cpu().numpy(), out.mask.cpu().numpy()))
        return outs

    return call


# --- server statistics ---------------------------------------------------------------------
def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        body: bytes = r.read()
        return body


def model_stats(server: TritonServer) -> dict[str, dict[str, Any]]:
    """Cumulative /v2/models/<name>/stats of the models whose batching we report."""
    return {
        m: json.loads(_get(f"http://{server.http_url}/v2/models/{m}/stats"))["model_stats"][0]
        for m in STATS_MODELS
    }


def batch_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the server did between two snapshots: frames, requests, executions, mean batch."""
    frames = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])

    def per_request_ms(key: str) -> float | None:
        a, b = after["inference_stats"][key], before["inference_stats"][key]
        count = int(a["count"]) - int(b["count"])
        return (int(a["ns"]) - int(b["ns"])) / count / 1e6 if count else None

    done = {
        s["batch_size"]: int(s["compute_infer"]["count"]) for s in before.get("batch_stats", [])
    }
    histogram = {
        str(s["batch_size"]): n
        for s in after.get("batch_stats", [])
        if (n := int(s["compute_infer"]["count"]) - done.get(s["batch_size"], 0)) > 0
    }
    success = after["inference_stats"]["success"]["count"]
    return {
        "frames": frames,
        "requests": int(success) - int(before["inference_stats"]["success"]["count"]),
        "executions": executions,
        "mean_batch": frames / executions if executions else None,
        "executions_by_batch_size": dict(sorted(histogram.items(), key=lambda kv: int(kv[0]))),
        "mean_queue_ms": per_request_ms("queue"),
        "mean_compute_ms": per_request_ms("compute_infer"),
    }


def stats_delta(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    return {m: batch_delta(before[m], after[m]) for m in STATS_MODELS}


def avatar_load_s_total(server: TritonServer) -> float:
    """`lpd_avatar_cache_load_s_total` from Triton's Prometheus text (0 before any load)."""
    text = _get(f"http://{server.metrics_url}/metrics").decode()
    for line in text.splitlines():
        if line.startswith("lpd_avatar_cache_load_s_total"):
            return float(line.rpartition(" ")[2])
    return 0.0


# --- measurements --------------------------------------------------------------------------
def _timed_call(fn: Reenact, frames: Frames) -> float:
    t0 = time.perf_counter()
    fn(frames)
    return time.perf_counter() - t0


def _ratio(triton: float | None, torch_: float | None) -> float | None:
    return triton / torch_ if triton is not None and torch_ else None


def latency_stats(seconds: list[float]) -> dict[str, float | int]:
    ms = np.asarray(seconds) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"median_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(ms.mean()), "frames": len(ms)}  # fmt: skip


def bench_latency(sides: dict[str, Reenact], frames: Frames, cfg: BenchConfig) -> dict[str, Any]:
    """Batch-1 `reenact` per frame, the real-time path; sides alternate every few frames."""
    one = [frames[i % len(frames)][None] for i in range(cfg.warmup + cfg.latency_frames)]
    times: dict[str, list[float]] = {name: [] for name in sides}
    for fn in sides.values():
        for frame in one[: cfg.warmup]:
            fn(frame)
    timed = one[cfg.warmup :]
    for start in range(0, len(timed), LATENCY_BLOCK):
        for name, fn in sides.items():
            times[name] += [_timed_call(fn, f) for f in timed[start : start + LATENCY_BLOCK]]
    result: dict[str, Any] = {name: latency_stats(t) for name, t in times.items()}
    result["triton_over_torch"] = {
        key: _ratio(result["triton"][key], result["torch"][key])
        for key in ("median_ms", "p90_ms", "p99_ms")
    }
    return result


def _round(fns: list[Reenact], job: Job) -> tuple[float, list[float]]:
    """Every client does `job` at the same time: (wall seconds, seconds per request)."""
    if len(fns) == 1:
        t0 = time.perf_counter()
        requests = job(fns[0])
        return time.perf_counter() - t0, requests
    with ThreadPoolExecutor(len(fns)) as pool:
        t0 = time.perf_counter()
        per_client = list(pool.map(job, fns))
        return time.perf_counter() - t0, [t for ts in per_client for t in ts]


def bench_throughput(
    sides: dict[str, list[Reenact]], job: Job, frames_per_client: int, cfg: BenchConfig
) -> dict[str, Any]:
    """Frames/s with one client per entry of each side's list, all doing `job` at once."""
    clients = len(sides["triton"])
    frames = frames_per_client * clients
    for fns in sides.values():
        _round(fns, job)  # warm-up: first use of the batch shapes and threads
    walls: dict[str, list[float]] = {name: [] for name in sides}
    requests: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(cfg.repeats):
        for name, fns in sides.items():
            wall, times = _round(fns, job)
            walls[name].append(wall)
            requests[name] += times
    result: dict[str, Any] = {"clients": clients, "frames_per_client": frames_per_client}
    for name, t in walls.items():
        ms = np.asarray(requests[name]) * 1e3
        result[name] = {
            "frames_per_s": frames / statistics.median(t),
            "frames_per_s_best": frames / min(t),
            "s_per_round": statistics.median(t),
            "rounds": len(t),
            "request_median_ms": float(np.median(ms)),
            "request_p90_ms": float(np.percentile(ms, 90)),
        }
    result["triton_over_torch"] = _ratio(
        result["triton"]["frames_per_s"], result["torch"]["frames_per_s"]
    )
    return result


def bench_avatar(
    cfg: BenchConfig,
    checkpoint: Path,
    server: TritonServer,
    backend: TritonBackend,
    avatar_dir: Path,
    frames: Frames,
    work: Path,
) -> dict[str, Any]:
    """Cold (first request loads the avatar into the server's cache) vs warm `reenact`, and
    the same for direct torch (load the avatar over its base, then reenact)."""
    size = frames.shape[-1]
    shots = [render(identity_for(5, 0), p, size) for p in poses_for(5, 0, 0, 2)]
    images, masks = np.stack([s.image for s in shots]), np.stack([s.mask for s in shots])
    t0 = time.perf_counter()
    tuned = finetune(
        checkpoint, images, masks, work / "light.safetensors",
        FinetuneConfig(mode="light", steps=2, losses=NO_VGG), device=cfg.torch_device,
    ).avatar  # fmt: skip
    finetune_s = time.perf_counter() - t0
    one = frames[:1]
    load_before = avatar_load_s_total(server)
    shutil.copy(tuned, avatar_dir / f"{AVATAR_ID}.safetensors")  # after the server started
    served: Reenact = functools.partial(backend.reenact, avatar_id=AVATAR_ID)
    cold = _timed_call(served, one)
    warm = [_timed_call(served, one) for _ in range(5)]
    server_load = avatar_load_s_total(server) - load_before

    t0 = time.perf_counter()
    model = InferenceModel.from_checkpoint(
        tuned, cfg.torch_device, cfg.torch_dtype, base=checkpoint
    )
    torch_load = time.perf_counter() - t0
    assert model.avatar_identity is not None  # an avatar checkpoint always has one
    fn = torch_reenact(model, model.avatar_identity.cpu().numpy(), cfg.max_batch)
    torch_first = _timed_call(fn, one)
    torch_warm = [_timed_call(fn, one) for _ in range(5)]
    triton = {
        "first_request_ms": cold * 1e3,
        "warm_request_ms": statistics.median(warm) * 1e3,
        "server_cache_load_ms": server_load * 1e3,
    }
    direct = {
        "load_ms": torch_load * 1e3,
        "first_request_ms": torch_first * 1e3,
        "warm_request_ms": statistics.median(torch_warm) * 1e3,
        "load_plus_first_ms": (torch_load + torch_first) * 1e3,
    }
    return {
        "mode": "light",
        "finetune_steps": 2,
        "finetune_s": finetune_s,
        "avatar_bytes": tuned.stat().st_size,
        "triton": triton,
        "torch": direct,
        "triton_over_torch": {
            "cold": _ratio(triton["first_request_ms"], direct["load_plus_first_ms"]),
            "warm": _ratio(triton["warm_request_ms"], direct["warm_request_ms"]),
        },
    }


# --- driver --------------------------------------------------------------------------------
def avatar_skip_reason(cfg: BenchConfig, model_cfg: ModelConfig) -> str | None:
    if cfg.avatar is False:
        return "--no-avatar"
    if cfg.avatar is None and model_cfg.name != "tiny-64":
        return f"fine-tuning {model_cfg.name} takes too long for a benchmark (force: --avatar)"
    return None


@dataclass
class Served:
    """A started server on a fresh repository, and how long getting there took."""

    server: TritonServer
    repo: RepositoryConfig
    avatar_dir: Path
    build_s: float
    startup_s: float


def serve(cfg: BenchConfig, checkpoint: Path, work: Path, stack: contextlib.ExitStack) -> Served:
    """Build the python-flavour repository and start the embedded server on free ports."""
    avatar_dir = work / "avatars"
    avatar_dir.mkdir()
    repo = RepositoryConfig(
        device=cfg.device, dtype=cfg.dtype, instances=cfg.instances, max_batch=cfg.max_batch,
        queue_delay_us=cfg.queue_delay_us, threads=cfg.threads, avatar_dir=avatar_dir,
    )  # fmt: skip
    t0 = time.perf_counter()
    repository = build_repository(checkpoint, work / "repository", repo)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    config = ServerConfig(
        repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        startup_timeout_s=600,
    )  # fmt: skip
    server = stack.enter_context(TritonServer(config))
    return Served(server, repo, avatar_dir, build_s, time.perf_counter() - t0)


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)  # the same budget each server instance gets
    with (
        tempfile.TemporaryDirectory(prefix="triton_speed-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        if cfg.checkpoint is not None:
            checkpoint, weights = cfg.checkpoint, str(cfg.checkpoint)
        else:
            assert cfg.preset is not None
            checkpoint = random_checkpoint(cfg.preset, work / "random.safetensors")
            weights = f"random {cfg.preset}"
        model_cfg, _ = read_header(checkpoint)
        served = serve(cfg, checkpoint, work, stack)
        server = served.server
        url = server.grpc_url if cfg.protocol == "grpc" else server.http_url
        # One adapter per client, like separate service workers. No retries: a failed request
        # should fail the benchmark, not hide in its timings.
        tc = TritonConfig(url, cfg.protocol, timeout_s=600, retries=0, max_batch=cfg.max_batch)
        backends = [stack.enter_context(TritonBackend(tc)) for _ in range(cfg.clients)]
        backends[0].check_models()

        model = InferenceModel.from_checkpoint(checkpoint, cfg.torch_device, cfg.torch_dtype)
        frames = make_frames(model_cfg.image_size, max(cfg.chunk, 8))
        identity = model.embed_identity(torch.from_numpy(frames[:4])).cpu().numpy()
        direct = torch_reenact(model, identity, cfg.max_batch)

        def via(be: TritonBackend) -> Reenact:
            return lambda f: be.reenact(f, identity=identity)

        report: dict[str, Any] = {
            "benchmark": "triton_speed",
            "torch": torch.__version__,
            "device": cfg.device,
            "device_name": torch.cuda.get_device_name() if cfg.device == "gpu" else cpu_name(),
            "threads": torch.get_num_threads(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "weights": weights,
            "preset": model_cfg.name,
            "image_size": model_cfg.image_size,
            "settings": {
                **{k: v for k, v in asdict(cfg).items() if k not in ("checkpoint", "out")},
                "effective_dtype": str(cfg.torch_dtype).removeprefix("torch."),
                "preferred_batches": served.repo.preferred_batches(),
                "client_chunk_concurrency": tc.concurrency,
            },
            "server": {"build_s": served.build_s, "startup_s": served.startup_s},
        }
        # Server statistics are deltas over each phase, its warm-up included.
        before = model_stats(server)
        report["latency"] = bench_latency(
            {"torch": direct, "triton": via(backends[0])}, frames, cfg
        )
        report["latency"]["server"] = stats_delta(before, before := model_stats(server))
        chunk = frames[: cfg.chunk]

        def whole(fn: Reenact) -> list[float]:  # a video chunk, split by max_batch
            return [_timed_call(fn, chunk)]

        def stream(fn: Reenact) -> list[float]:  # a real-time stream, one frame per request
            return [_timed_call(fn, frame[None]) for frame in chunk]

        phases = [
            ("chunk_1_client", 1, whole),
            (f"stream_{cfg.clients}_clients", cfg.clients, stream),
        ]
        if cfg.clients > 1:
            phases.insert(1, (f"chunk_{cfg.clients}_clients", cfg.clients, whole))
        report["throughput"] = {}
        for label, n, job in phases:
            runs = {"torch": [direct] * n, "triton": [via(be) for be in backends[:n]]}
            result = bench_throughput(runs, job, len(chunk), cfg)
            result["server"] = stats_delta(before, before := model_stats(server))
            report["throughput"][label] = result
        reason = avatar_skip_reason(cfg, model_cfg)
        report["avatar"] = {"skipped": reason} if reason else bench_avatar(
            cfg, checkpoint, server, backends[0], served.avatar_dir, frames, work
        )  # fmt: skip
    return report


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def summary_table(report: dict[str, Any]) -> str:
    lat = report["latency"]
    rows: list[tuple[str, float | None, float | None, float | None]] = [
        (f"latency {q} (ms)", lat["torch"][f"{q}_ms"], lat["triton"][f"{q}_ms"],
         lat["triton_over_torch"][f"{q}_ms"])
        for q in ("median", "p90", "p99")
    ]  # fmt: skip
    batches = []
    for label, r in report["throughput"].items():
        name = f"{label} (f/s)"
        rows.append((name, r["torch"]["frames_per_s"], r["triton"]["frames_per_s"],
                     r["triton_over_torch"]))  # fmt: skip
        mean = [_num(r["server"][m]["mean_batch"]) for m in (POSE_ENCODER, GENERATOR)]
        batches.append(f"{label}: {'/'.join(mean)}")
    av = report["avatar"]
    if "skipped" not in av:
        rows.append(
            (
                "avatar cold (ms)",
                av["torch"]["load_plus_first_ms"],
                av["triton"]["first_request_ms"],
                av["triton_over_torch"]["cold"],
            )
        )
        rows.append(("avatar warm (ms)", av["torch"]["warm_request_ms"],
                     av["triton"]["warm_request_ms"], av["triton_over_torch"]["warm"]))  # fmt: skip
    lines = [f"{'':<24}{'torch':>10}{'triton':>10}{'triton/torch':>14}"]
    lines += [f"{n:<24}{_num(a):>10}{_num(b):>10}{_num(c, '.2f'):>14}" for n, a, b, c in rows]
    lines.append("server mean batch pose_encoder/generator: " + ", ".join(batches))
    if "skipped" in av:
        lines.append(f"avatar: skipped ({av['skipped']})")
    else:
        lines.append(f"avatar: server cache load {av['triton']['server_cache_load_ms']:.1f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    report = run_benchmark(cfg)
    emit(report, cfg.out, summary_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
