"""`python -m evaluation --checkpoint CKPT --suite synthetic|real --out DIR`: metrics.json + report.

Several checkpoints (`--checkpoint A --checkpoint B`, `--compare NAME=CKPT`, or `--manifest` of a
`python -m training.ablations` run) are scored on the same identities, frames and seed, and
reported side by side in one metrics.json and report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from evaluation.compare import comparison
from evaluation.landmarks import PoseError
from evaluation.lpips import LPIPS, LPIPSError, load_lpips
from evaluation.models import ScoredModel, can_finetune, from_manifest, load, pose_source
from evaluation.real import (
    RealData,
    RealDataError,
    RealSuiteConfig,
    describe_data,
    prepare_real,
    reference_errors,
    run_real,
)
from evaluation.recognition import ArcFace, DlibFaces, FaceEmbedder, RecognitionError
from evaluation.report import (
    ModelReport,
    write_comparison_html,
    write_html,
    write_metrics,
    write_real_html,
)
from evaluation.synthetic import SyntheticSuiteConfig, run_synthetic
from model.checkpoint import CheckpointError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    syn, real = SyntheticSuiteConfig(), RealSuiteConfig()
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        default=[],
        help="a checkpoint to score; repeat it to compare several",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=CKPT",
        help="a named checkpoint to score side by side; repeatable",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        help="score every variant of a `python -m training.ablations` run side by side",
    )
    parser.add_argument("--suite", choices=("synthetic", "real"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=syn.seed)
    parser.add_argument("--device", default="cpu")
    # Float reductions depend on the thread count, so results are bit-reproducible only at a
    # fixed one; 1 also leaves the other cores to whatever else runs.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-pose-error", action="store_true", help="skip the face-mesh metric")
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="also fine-tune each avatar this many steps and score it (0: off)",
    )
    parser.add_argument("--finetune-mode", choices=("full", "light"), default="full")
    parser.add_argument(
        "--lpips-weights",
        type=Path,
        help="full LPIPS state dict, or its linear heads with --lpips-backbone",
    )
    parser.add_argument(
        "--lpips-backbone",
        type=Path,
        help="torchvision alexnet/vgg16 state dict for LPIPS heads-only weights",
    )

    s = parser.add_argument_group("synthetic suite")
    s.add_argument("--identities", type=int, default=syn.identities)
    s.add_argument("--k", type=int, default=syn.k, help="identity frames per avatar")
    s.add_argument("--frames-per-driver", type=int, default=syn.frames_per_driver)
    s.add_argument(
        "--probe-identities",
        type=int,
        default=syn.leakage_probe_identities,
        help="identities whose renders train the identity-leakage probe",
    )
    s.add_argument("--pose-probe-identities", type=int, default=syn.pose_probe_identities)
    s.add_argument("--retrieval-identities", type=int, default=syn.retrieval_identities)
    s.add_argument(
        "--keypoint-steps",
        type=int,
        default=syn.keypoint_steps,
        help="training steps of each keypoint MLP (0: skip keypoint regression)",
    )

    r = parser.add_argument_group("real-face suite")
    r.add_argument("--data", type=Path, help="videos as DATA/<identity>/<video>/<clip>.mp4")
    r.add_argument("--finetune-frames", type=int, default=real.finetune_frames)
    r.add_argument("--holdout-frames", type=int, default=real.holdout_frames)
    r.add_argument(
        "--cross-frames",
        type=int,
        default=real.cross_frames,
        help="hold-out frames of each other identity that drive an avatar",
    )
    r.add_argument("--max-identities", type=int)
    r.add_argument("--arcface", type=Path, help="ArcFace ONNX model (default: dlib's ResNet)")
    r.add_argument(
        "--dlib-models",
        type=Path,
        help="folder of dlib .dat files (default: the face-recognition-models package)",
    )
    args = parser.parse_args(argv)

    named: list[tuple[str, Path, Path | None]] = []  # name, checkpoint, fine-tuning base

    def add(name: str, path: Path, base: Path | None = None) -> None:
        if name in {x for x, _, _ in named}:
            parser.error(f"model name {name!r} is given twice")
        named.append((name, path, base))

    for path in args.checkpoint:
        name, n = path.stem, 2
        while name in {x for x, _, _ in named}:
            name, n = f"{path.stem}-{n}", n + 1
        add(name, path)
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--compare takes NAME=CKPT, got {item!r}")
        add(name, Path(path))
    if args.manifest is not None:
        try:
            for name, path, base in from_manifest(args.manifest):
                add(name, path, base)
        except (OSError, ValueError, KeyError) as exc:
            parser.error(f"cannot read manifest {args.manifest}: {exc}")
    if not named:
        parser.error("give a checkpoint: --checkpoint CKPT, --compare NAME=CKPT or --manifest")
    for _, path, _ in named:
        if not path.is_file():
            parser.error(f"checkpoint not found: {path}")
    if args.suite == "real" and args.data is None:
        parser.error("--suite real needs --data DIR (videos as <identity>/<video>/<clip>.mp4)")
    if args.finetune_steps < 0 or args.keypoint_steps < 0:
        parser.error("step counts must be >= 0")
    args.named = named
    return args


def _synthetic(
    args: argparse.Namespace, models: list[ScoredModel], lpips: LPIPS | None
) -> tuple[dict[str, Any], list[ModelReport]]:
    cfg = SyntheticSuiteConfig(
        identities=args.identities,
        k=args.k,
        frames_per_driver=args.frames_per_driver,
        leakage_probe_identities=args.probe_identities,
        pose_probe_identities=args.pose_probe_identities,
        retrieval_identities=args.retrieval_identities,
        keypoint_steps=args.keypoint_steps,
        finetune_steps=args.finetune_steps,
        finetune_mode=args.finetune_mode,
        pose_error=not args.no_pose_error,
        seed=args.seed,
    )
    reports = []
    for scored in models:
        start = time.perf_counter()
        result = run_synthetic(scored, cfg, lpips)
        metrics = {"seed": cfg.seed, "checkpoint": scored.header(), **result.metrics}
        metrics["timings_s"]["total"] = round(time.perf_counter() - start, 2)
        reports.append(ModelReport(scored.name, metrics, samples=result.samples))
    return {}, reports


def _real(
    args: argparse.Namespace, models: list[ScoredModel], lpips: LPIPS | None
) -> tuple[dict[str, Any], list[ModelReport]]:
    cfg = RealSuiteConfig(
        finetune_frames=args.finetune_frames,
        holdout_frames=args.holdout_frames,
        cross_frames=args.cross_frames,
        max_identities=args.max_identities,
        finetune_steps=args.finetune_steps,
        finetune_mode=args.finetune_mode,
        pose_error=not args.no_pose_error,
        seed=args.seed,
    )
    faces = DlibFaces(args.dlib_models)
    embedder: FaceEmbedder = ArcFace(args.arcface, faces) if args.arcface else faces
    estimator = PoseError() if cfg.pose_error else None
    keypoints = any(pose_source(m.model) == "keypoints" for m in models)
    prepared: dict[int, RealData] = {}
    reports = []
    try:
        for scored in models:
            start = time.perf_counter()
            size = scored.model.config.image_size
            if size not in prepared:
                prepared[size] = prepare_real(
                    args.data, size, cfg, embedder, estimator, faces if keypoints else None
                )
            result = run_real(scored, prepared[size], cfg, embedder, estimator, lpips)
            metrics = {"seed": cfg.seed, "checkpoint": scored.header(), **result.metrics}
            metrics["timings_s"]["total"] = round(time.perf_counter() - start, 2)
            reports.append(
                ModelReport(scored.name, metrics, (), result.self_columns, result.cross_columns)
            )
    finally:
        if estimator is not None:
            estimator.close()
    data = next(iter(prepared.values()))
    shared = {
        "data_dir": str(args.data),
        "data": describe_data(data, cfg),
        "reference_identity_errors": reference_errors(data, embedder),
        "timings_s": {k: round(v, 2) for k, v in data.timings_s.items()},
    }
    return shared, reports


def _notes(args: argparse.Namespace, models: list[ScoredModel]) -> list[str]:
    notes = []
    if args.lpips_weights is None:
        notes.append("LPIPS off: no --lpips-weights (pretrained weights are never downloaded)")
    if args.finetune_steps <= 0:
        notes.append("fine-tuned avatars off: pass --finetune-steps N")
    for m in models:
        why = can_finetune(m.model)
        if args.finetune_steps > 0 and why is not None:
            notes.append(f"{m.name}: fine-tuned avatars skipped: {why}")
    if args.suite == "real":
        notes.append(
            "identity model: "
            + (
                f"ArcFace ONNX {args.arcface}"
                if args.arcface
                else "dlib ResNet (face-recognition-models)"
            )
        )
    return notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        lpips = (
            load_lpips(args.lpips_weights, args.lpips_backbone, args.device)
            if args.lpips_weights
            else None
        )
        models = [load(name, path, args.device, base) for name, path, base in args.named]
        run = _synthetic if args.suite == "synthetic" else _real
        shared, reports = run(args, models, lpips)
    except (CheckpointError, LPIPSError, RecognitionError, RealDataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    head: dict[str, Any] = {
        "suite": args.suite,
        "seed": args.seed,
        "device": args.device,
        "threads": args.threads,
    }
    if len(reports) == 1:
        report = reports[0]
        metrics = {**head, **shared, **report.metrics, "suite": args.suite}
        metrics["notes"] = sorted(set(_notes(args, models)) | set(report.metrics.get("notes", [])))
        metrics["timings_s"] = {**shared.get("timings_s", {}), **report.metrics["timings_s"]}
        metrics["timings_s"]["total"] = round(time.perf_counter() - start, 2)
        write_metrics(args.out, metrics)
        if args.suite == "synthetic":
            page = write_html(args.out, metrics, report.samples)
        else:
            page = write_real_html(args.out, report, metrics)
    else:
        metrics = {
            **head,
            **shared,
            "notes": _notes(args, models),
            "comparison": comparison(args.suite, {r.name: r.metrics for r in reports}),
            "models": {r.name: r.metrics for r in reports},
        }
        metrics["timings_s"] = {
            **shared.get("timings_s", {}),
            "total": round(time.perf_counter() - start, 2),
        }
        write_metrics(args.out, metrics)
        page = write_comparison_html(args.out, metrics, reports)
    print(f"{args.suite} suite, {len(reports)} model(s) -> {args.out / 'metrics.json'}, {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
