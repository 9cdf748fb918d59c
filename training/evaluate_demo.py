"""`python -m training.evaluate_demo CKPT --data ROOT --out DIR`: does the demo model reenact?

On identities held out from training, identity A is driven by every frame of other held-out
identities B. The synthetic renderer gives the ground truth (A drawn in B's pose); the model
is compared with baselines: copying A's first identity frame; copying whichever of A's K
identity frames is closest to the ground truth (an oracle no real copier has: the upper bound
of any copy strategy); and the same network untrained.
A control tells whether the output follows the driver's pose at all: the same model driven by
another frame of the same driver (`*_other_frame`). A model that ignores pose and paints A's
average face scores the same either way, and can still beat copying one identity frame.
With `--finetune-steps N` each A is also fine-tuned on its own K identity frames first (the
paper's few-shot recipe, as the service's fine-tune job runs it), and scored as `finetuned`.
Writes metrics.json and a grid PNG of cross-person reenactments.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from evaluation.images import premultiplied
from evaluation.metrics import psnr
from model.checkpoint import read_header
from model.inference import InferenceModel
from model.reenactor import Reenactor
from training.clipstore import Clip, read_clip
from training.data import list_videos
from training.finetune import FinetuneConfig, finetune
from training.losses import LossWeights
from training.synthetic import IdentityParams, PoseParams, render


@dataclass(frozen=True)
class EvalConfig:
    k: int = 4  # identity frames per avatar
    drivers_per_identity: int = 5
    frames_per_driver: int = 4
    val_fraction: float = 0.1  # must match the training split
    seed: int = 0
    finetune_steps: int = 0  # > 0: also score per-identity fine-tuned avatars
    finetune_mode: str = "full"
    max_identities: int | None = None  # score only the first N held-out identities


def _frames(clip: Clip, indices: list[int]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(clip.image(i)).permute(2, 0, 1) for i in indices])


def _by_tercile(change: list[float], errors: dict[str, list[float]]) -> dict[str, dict]:
    """Mean L1 per method within thirds of the driver-vs-identity-frame pose change."""
    edges = np.quantile(change, [0, 1 / 3, 2 / 3, 1])
    bins = np.clip(np.searchsorted(edges[1:-1], change, side="right"), 0, 2)
    names = ("small", "medium", "large")
    return {
        names[t]: {
            "pose_change_range": [float(edges[t]), float(edges[t + 1])],
            # An empty third (tiny evaluations) reports None rather than a NaN mean.
            **{
                m: float(np.mean(np.asarray(v)[bins == t])) if (bins == t).any() else None
                for m, v in errors.items()
            },
        }
        for t in range(3)
    }


def _win_rates(errors: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per model, the share of frames on which its L1 is lower than each other method's.

    Paired per frame, so it says whether a mean difference is a few frames or most of them.
    """
    models = [m for m in ("trained", "finetuned") if m in errors]
    return {
        m: {
            other: float(np.mean(np.asarray(errors[m]) < np.asarray(v)))
            for other, v in errors.items()
            if other != m
        }
        for m in models
    }


def _best_copy(copies: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per ground-truth frame, the identity frame (of K) with the lowest L1 to it."""
    errors = (copies[None] - gt[:, None]).abs().mean(dim=(2, 3, 4))  # (frames, K)
    return copies[errors.argmin(dim=1)]


def finetuned_model(ckpt: Path, clip: Clip, indices: list[int], cfg: EvalConfig) -> InferenceModel:
    """Fine-tune on the identity frames (no VGG weights here, so pixel L1 stands in)."""
    images = np.stack([clip.image(i) for i in indices])
    masks = np.stack([clip.mask(i) for i in indices])
    ft = FinetuneConfig(
        mode=cfg.finetune_mode,  # type: ignore[arg-type]
        steps=cfg.finetune_steps,
        losses=LossWeights(vgg19=0, vggface=0, embedding_match=0, l1=10),
        seed=cfg.seed,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = finetune(ckpt, images, masks, Path(tmp) / "avatar.safetensors", ft)
        return InferenceModel.from_checkpoint(result.avatar, base=ckpt)


def evaluate(ckpt: Path, data: Path, out: Path, cfg: EvalConfig) -> dict:
    model_cfg, info = read_header(ckpt)
    trained = InferenceModel.from_checkpoint(ckpt)
    torch.manual_seed(cfg.seed)
    untrained = InferenceModel(Reenactor(model_cfg))
    videos = list_videos(data, "val", cfg.val_fraction, cfg.seed)
    clips = [read_clip(v.clips[0].path) for v in videos]
    scored = clips[: cfg.max_identities] if cfg.max_identities else clips
    rng = np.random.default_rng(cfg.seed)
    copy_methods = ("copy_identity_frame", "copy_best_identity_frame")
    tuned_methods = ("finetuned",) if cfg.finetune_steps > 0 else ()
    methods: tuple[str, ...] = ("trained", *tuned_methods, *copy_methods, "untrained")
    # Controls, scored but not drawn: each ground-truth frame against the model driven by
    # another of the driver's frames (the pose-following check).
    controls = tuple(f"{m}_other_frame" for m in methods if m in ("trained", "finetuned"))
    errors: dict[str, list[float]] = {m: [] for m in methods + controls}
    psnrs: dict[str, list[float]] = {m: [] for m in methods + controls}
    pose_change: list[float] = []  # |driver pose - identity frame 0 pose| (yaw, pitch, roll, mouth)
    grid_rows: list[torch.Tensor] = []
    for a, clip_a in enumerate(scored):
        identity_a = IdentityParams.from_vector(clip_a.extras["identity_params"])
        ref = list(range(cfg.k))
        id_frames = _frames(clip_a, ref)
        embeddings = {
            "trained": trained.embed_identity(id_frames),
            "untrained": untrained.embed_identity(id_frames),
        }
        copies_a = torch.stack([premultiplied(clip_a.image(i), clip_a.mask(i)) for i in ref])
        tuned = finetuned_model(ckpt, clip_a, ref, cfg) if cfg.finetune_steps > 0 else None
        pose_a = clip_a.extras["pose_params"][0][:4]
        others = [b for b in range(len(clips)) if b != a]
        for b in rng.choice(others, size=min(cfg.drivers_per_identity, len(others)), replace=False):
            clip_b = clips[int(b)]
            js = sorted(rng.choice(len(clip_b), size=cfg.frames_per_driver, replace=False).tolist())
            drivers = _frames(clip_b, js)
            gts = []
            for j in js:
                pose = PoseParams.from_vector(clip_b.extras["pose_params"][j])
                frame = render(identity_a, pose, model_cfg.image_size)
                gts.append(premultiplied(frame.image, frame.mask))
            gt = torch.stack(gts)
            outputs = {
                "trained": trained.reenact(embeddings["trained"], drivers).rgb,
                "untrained": untrained.reenact(embeddings["untrained"], drivers).rgb,
                "copy_identity_frame": copies_a[0].expand_as(gt),
                "copy_best_identity_frame": _best_copy(copies_a, gt),
            }
            other = drivers.roll(1, dims=0)  # frame j is driven by the driver's frame j - 1
            outputs["trained_other_frame"] = trained.reenact(embeddings["trained"], other).rgb
            if tuned is not None:
                assert tuned.avatar_identity is not None
                outputs["finetuned"] = tuned.reenact(tuned.avatar_identity, drivers).rgb
                outputs["finetuned_other_frame"] = tuned.reenact(tuned.avatar_identity, other).rgb
            pose_change += [
                float(np.abs(clip_b.extras["pose_params"][j][:4] - pose_a).sum()) for j in js
            ]
            for m in methods + controls:
                errors[m] += (outputs[m] - gt).abs().mean(dim=(1, 2, 3)).tolist()
                psnrs[m] += psnr(outputs[m], gt).tolist()
            if len(grid_rows) < 8:
                row = [drivers[0].float() / 255, id_frames[0].float() / 255, gt[0]]
                row += [outputs[m][0] for m in methods]
                grid_rows.append(torch.stack(row))
    out.mkdir(parents=True, exist_ok=True)
    save_image(
        make_grid(torch.cat(grid_rows), nrow=3 + len(methods), padding=2, pad_value=1.0),
        out / "cross_reenactment.png",
    )
    metrics = {
        "checkpoint": str(ckpt),
        "step": info.get("step"),
        "finetune": {"steps": cfg.finetune_steps, "mode": cfg.finetune_mode}
        if cfg.finetune_steps
        else None,
        "held_out_identities": len(scored),
        "pairs_frames": len(errors["trained"]),
        "grid_columns": ["driver B", "identity A", "ground truth A<-B", *methods],
        "l1": {m: float(np.mean(v)) for m, v in errors.items()},
        "l1_by_pose_change_tercile": _by_tercile(pose_change, errors),
        "psnr_db": {m: float(np.mean(v)) for m, v in psnrs.items()},
        "win_rate": _win_rates(errors),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="synthetic clip store")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--finetune-steps", type=int, default=0, help="also score fine-tuned")
    parser.add_argument("--finetune-mode", choices=("full", "light"), default="full")
    parser.add_argument("--identities", type=int, default=None, help="score the first N only")
    args = parser.parse_args(argv)
    cfg = EvalConfig(
        k=args.k,
        val_fraction=args.val_fraction,
        finetune_steps=args.finetune_steps,
        finetune_mode=args.finetune_mode,
        max_identities=args.identities,
    )
    metrics = evaluate(args.checkpoint, args.data, args.out, cfg)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
