"""`python -m training.ablations --steps N --out runs/ablations [--variants ...] [key=value ...]`.

Trains the paper's model and its baselines/ablations (training/configs/ablations/) for the same
steps, batch, seed and data, releases each EMA checkpoint and lists them in a manifest that the
evaluation's side-by-side comparison reads (README, "Baselines and ablations").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from model.checkpoint import load_checkpoint, read_header, save_checkpoint
from model.release import slim
from training.config import TrainConfig, load_config, model_config
from training.loop import LAST_CHECKPOINT, train

CONFIG_DIR = Path(__file__).parent / "configs" / "ablations"
BASE = "base"
REFERENCE = "full"  # the paper's model; listed first
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lpd-ablations"
MANIFEST_VERSION = 1
# Fields that must agree across variants (and with an existing manifest) for a fair comparison.
SHARED = ("steps", "batch_size", "seed", "preset", "data_root")


@dataclass(frozen=True)
class Variant:
    """One recipe: its name, file, one-line description and the keys it sets on the base."""

    name: str
    path: Path
    description: str
    changes: dict[str, Any]  # dotted keys -> values, e.g. {"model.pose_source": "keypoints"}


@dataclass(frozen=True)
class VariantRun:
    """A trained and released variant, as the manifest lists it."""

    name: str
    checkpoint: Path  # released (EMA, float32) checkpoint: what evaluation scores
    run_dir: Path  # run_dir/last.safetensors keeps raw, EMA and the meta-learned D (fine-tuning)
    description: str
    changes: dict[str, Any]
    model: dict[str, Any]  # the variant-relevant ModelConfig fields, for reports
    steps: int
    wall_s: float  # this invocation's train() time (setup included; 0 steps if already done)
    s_per_step: float | None  # median over logged windows (None when nothing was logged)

    @property
    def training_checkpoint(self) -> Path:
        """Raw, EMA and discriminator weights: fine-tuning starts from its meta-learned D."""
        return self.run_dir / LAST_CHECKPOINT

    def to_json(self, root: Path) -> dict[str, Any]:
        return {
            "checkpoint": os.path.relpath(self.checkpoint, root),
            "training_checkpoint": os.path.relpath(self.training_checkpoint, root),
            "run_dir": os.path.relpath(self.run_dir, root),
            "description": self.description,
            "changes": self.changes,
            "model": self.model,
            "steps": self.steps,
            "wall_s": round(self.wall_s, 2),
            "s_per_step": None if self.s_per_step is None else round(self.s_per_step, 4),
        }


@dataclass(frozen=True)
class Manifest:
    """What `python -m training.ablations` wrote: shared settings and variant -> checkpoint."""

    path: Path
    shared: dict[str, Any]
    variants: dict[str, VariantRun]


# --- recipes ----------------------------------------------------------------------------------
def list_variants(config_dir: Path = CONFIG_DIR) -> list[Variant]:
    """Every recipe in `config_dir` but the base, the reference model first."""
    paths = sorted(p for p in config_dir.glob("*.yaml") if p.stem != BASE)
    paths.sort(key=lambda p: p.stem != REFERENCE)
    return [_variant(p) for p in paths]


def _variant(path: Path) -> Variant:
    """The recipe's own keys (not what it extends, nor its run_dir) and its leading comment."""
    text = path.read_text()
    own = yaml.safe_load(text) or {}
    for key in ("extends", "run_dir"):
        own.pop(key, None)
    comment = []
    for line in text.splitlines():  # the leading comment block describes the variant
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    return Variant(path.stem, path, " ".join(comment), _flatten(own))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def variant_config(variant: Variant, steps: int, out: Path, overrides: list[str]) -> TrainConfig:
    """The variant's TrainConfig at the shared budget, trained in out/<name>."""
    return load_config(
        variant.path, [*overrides, f"steps={steps}", f"run_dir={out / variant.name}"]
    )


def shared_settings(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "preset": cfg.preset,
        "data_root": str(Path(cfg.data.root).resolve()),
    }


# --- running ----------------------------------------------------------------------------------
def run_variant(variant: Variant, cfg: TrainConfig) -> VariantRun:
    """Train (or finish) one variant and release its EMA weights next to its run dir."""
    run_dir = Path(cfg.run_dir)
    last = run_dir / LAST_CHECKPOINT
    start = int(read_header(last)[1].get("step", 0)) if last.exists() else 0
    t0 = time.perf_counter()
    path = train(cfg)
    wall = time.perf_counter() - t0
    ckpt = load_checkpoint(path)
    step = ckpt.info.get("step")
    if step != cfg.steps:
        raise ValueError(
            f"{run_dir} holds a run at step {step}, not {cfg.steps}: use another --out"
        )
    ckpt.info["ablation"] = {"variant": variant.name, "changes": variant.changes}
    released = save_checkpoint(
        run_dir.parent / f"{variant.name}.safetensors", slim(ckpt, torch.float32)
    )
    mc = ckpt.config
    return VariantRun(
        name=variant.name,
        checkpoint=released,
        run_dir=run_dir,
        description=variant.description,
        changes=variant.changes,
        model={
            "pose_source": mc.pose_source,
            "predict_mask": mc.predict_mask,
            "pose_dim": mc.pose_dim,
        },
        steps=cfg.steps,
        wall_s=wall,
        s_per_step=step_seconds(run_dir / "metrics.jsonl", start, cfg.log_every),
    )


def step_seconds(metrics: Path, after: int, log_every: int) -> float | None:
    """Median seconds per step over the logged windows of steps after `after`.

    The loop logs speed/it_per_s = log_every / (time since the last log), which is right
    only for whole windows, so a last partial window counts only when it is all there is.
    """
    if not metrics.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fresh = [r for r in rows if r["step"] > after and r.get("speed/it_per_s")]
    whole = [r for r in fresh if r["step"] % log_every == 0] or fresh
    if not whole:
        return None
    return statistics.median(1 / r["speed/it_per_s"] for r in whole)


def run_ablations(
    steps: int,
    out: Path,
    names: list[str] | None = None,
    overrides: list[str] | None = None,
    config_dir: Path = CONFIG_DIR,
) -> Manifest:
    """Train the chosen variants (default all) at one budget; write and return the manifest."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    overrides = list(overrides or [])
    every = {v.name: v for v in list_variants(config_dir)}
    unknown = sorted(set(names or []) - set(every))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(every)}")
    chosen = [v for v in every.values() if names is None or v.name in names]
    configs = {v.name: variant_config(v, steps, out, overrides) for v in chosen}
    shared = {name: shared_settings(cfg) for name, cfg in configs.items()}
    reference = next(iter(shared.values()))
    for name, settings in shared.items():
        if settings != reference:
            raise ValueError(f"variant {name} changes shared settings: {settings} != {reference}")
    for cfg in configs.values():
        model_config(cfg)  # a bad model key fails here, before any variant trains
    manifest = _existing(out, reference)
    for variant in chosen:
        logging.getLogger("training").info("ablation variant %s: %s", variant.name, variant.changes)
        manifest.variants[variant.name] = run_variant(variant, configs[variant.name])
        write_manifest(manifest)  # after each variant, so a long run's finished ones are usable
    return manifest


def _existing(out: Path, shared: dict[str, Any]) -> Manifest:
    path = out / MANIFEST
    if not path.exists():
        return Manifest(path, shared, {})
    manifest = read_manifest(path)
    if manifest.shared != shared:
        raise ValueError(
            f"{path} lists runs with other settings ({manifest.shared}, now {shared}): "
            "use another --out"
        )
    return manifest


def write_manifest(manifest: Manifest) -> Path:
    root = manifest.path.parent
    data = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        **manifest.shared,
        "variants": {name: run.to_json(root) for name, run in manifest.variants.items()},
    }
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{MANIFEST}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; runs are shared read-only
    os.replace(tmp, manifest.path)
    return manifest.path


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Load a manifest; checkpoint and run paths come back resolved against its folder."""
    path = Path(path)
    data = json.loads(path.read_text())
    if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: not an {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest")
    root = path.parent
    variants = {
        name: VariantRun(
            name=name,
            checkpoint=root / v["checkpoint"],
            run_dir=root / v["run_dir"],
            description=v["description"],
            changes=v["changes"],
            model=v["model"],
            steps=v["steps"],
            wall_s=v["wall_s"],
            s_per_step=v["s_per_step"],
        )
        for name, v in data["variants"].items()
    }
    return Manifest(path, {k: data[k] for k in SHARED}, variants)


# --- CLI ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="training steps per variant (required)")
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--variants", nargs="+", default=None, help="default: all")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("overrides", nargs="*", help="for every variant, e.g. data.root=DIR")
    args = parser.parse_args(argv)
    if args.list:
        for v in list_variants():
            print(f"{v.name:12s} {v.changes or '(the paper model)'}  {v.description}")
        return 0
    if args.steps is None:
        parser.error("--steps is required")
    # `--variants a b key=value` would swallow the overrides: they are told apart by their "=".
    overrides = [*args.overrides, *(x for x in args.variants or [] if "=" in x)]
    names = [x for x in args.variants if "=" not in x] if args.variants else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        manifest = run_ablations(args.steps, args.out, names, overrides)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for run in manifest.variants.values():
        per_step = "-" if run.s_per_step is None else f"{run.s_per_step:.3f} s/step"
        print(f"{run.name:12s} {run.checkpoint}  {run.wall_s:.1f} s  {per_step}")
    print(manifest.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
