"""Few-shot fine-tuning of an avatar (paper Section 3; official fine-tuning recipe).

Official recipe: the identity embedding e = mean EMA identity-encoder output over the
photos becomes a trainable parameter; the discriminator's embedding is replaced by one row
initialised from e; the encoders are frozen; RAdam (lr 5e-4 for G, 8e-4 for D, betas
(0, 0.999), eps 1e-5); EMA 0.972; each photo is both the (augmented) pose input and the
target. The avatar artifact holds only what changed, on top of the shared base checkpoint:
the generator in `full` mode (fp16), or in `light` mode only e, the AdaIN MLP's first layer
and its output bias (about a megabyte for official-256's MLP input layer).

Named differences from the official code: training starts from the checkpoint's EMA
weights when it has them (release checkpoints carry only those; the official code started
from the raw meta weights), and the frozen pose encoder stays in eval mode (the official
code left it in train mode, so its BatchNorm statistics drifted).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from model.checkpoint import (
    Checkpoint,
    instantiate,
    load_checkpoint,
    read_header,
    save_checkpoint,
)
from model.config import ModelConfig
from model.discriminator import Discriminator
from model.generator import GeneratorOutput
from model.layers import spectral_norm
from model.reenactor import Reenactor
from training import losses as L
from training.augment import PoseAugmentConfig, PoseAugmenter

Mode = Literal["full", "light"]
MAX_IMAGES = 32


class FinetuneCancelled(Exception):
    """The caller asked to stop; the last intermediate state is kept for a resume."""


@dataclass(frozen=True)
class FinetuneConfig:
    mode: Mode = "full"
    steps: int | None = None  # None: tied to the number of photos (125 for 1 ... 230 for 32)
    batch_size: int = 8  # capped by the number of photos (official)
    lr_g: float = 5e-4
    lr_d: float = 8e-4
    betas: tuple[float, float] = (0.0, 0.999)
    eps: float = 1e-5
    ema_decay: float = 0.972
    losses: L.LossWeights = field(default_factory=lambda: L.LossWeights(embedding_match=0.0))
    vgg19_weights: str | None = None
    vggface_weights: str | None = None
    augment: PoseAugmentConfig = field(default_factory=PoseAugmentConfig)
    checkpoint_every: int = 25  # intermediate state for crash-resume
    seed: int = 0


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    loss: float
    eta_s: float


@dataclass(frozen=True)
class FinetuneResult:
    avatar: Path  # the per-avatar checkpoint
    preview: Path  # PNG: photos, then reconstructions
    steps: int
    final_l1: float


def default_steps(num_images: int) -> int:
    """The official README's range: 125 steps for one photo up to 230 for 32."""
    return round(125 + (230 - 125) * (min(num_images, MAX_IMAGES) - 1) / (MAX_IMAGES - 1))


class Avatar(nn.Module):
    """The trainable part: a fine-tuned identity embedding plus the generator."""

    def __init__(self, reenactor: Reenactor, identity: torch.Tensor, mode: Mode):
        super().__init__()
        self.reenactor = reenactor
        self.identity = nn.Parameter(identity.clone().reshape(1, -1))
        reenactor.requires_grad_(False)
        tuned = reenactor.generator.parameters() if mode == "full" else light_parameters(reenactor)
        for p in tuned:
            p.requires_grad_(True)

    def forward(self, pose_images: torch.Tensor) -> GeneratorOutput:
        pose = self.reenactor.encode_pose(pose_images)
        return self.reenactor.render(self.identity.expand(pose.shape[0], -1), pose)


def light_parameters(reenactor: Reenactor) -> list[nn.Parameter]:
    mlp = reenactor.generator.mlp
    return [*mlp.fc1.parameters(), cast(nn.Parameter, mlp.fc2.bias)]


def light_keys(reenactor: Reenactor) -> list[str]:
    names = {id(p): n for n, p in reenactor.named_parameters()}
    return [names[id(p)] for p in light_parameters(reenactor)]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def finetune(
    base: Path,
    images: np.ndarray,
    masks: np.ndarray,
    out: Path,
    config: FinetuneConfig | None = None,
    work_dir: Path | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    device: str = "cpu",
) -> FinetuneResult:
    """Fine-tune `base` on 1-32 preprocessed photos ((N, S, S, 3) uint8 crops, (N, S, S)
    uint8 masks); write the avatar checkpoint to `out` and a preview PNG beside it."""
    cfg = config or FinetuneConfig()
    ckpt = load_checkpoint(base)
    model_cfg = ckpt.config
    if model_cfg.pose_source != "latent":
        raise ValueError(f"{base}: a keypoint-driven baseline; fine-tuning drives with images")
    _check_inputs(images, masks, model_cfg)
    for kind, path in (("vgg19", cfg.vgg19_weights), ("vggface", cfg.vggface_weights)):
        if getattr(cfg.losses, kind) and path is None:
            raise ValueError(f"losses.{kind} > 0 needs {kind}_weights (or set it to 0)")
    n = len(images)
    steps = cfg.steps or default_steps(n)
    dev = torch.device(device)
    work_dir = work_dir or out.with_name(out.stem + ".work")
    work_dir.mkdir(parents=True, exist_ok=True)

    # --- models -------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    reenactor = instantiate(Reenactor, model_cfg, ckpt.weights("ema"), str(base)).to(dev)
    photos = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(dev)
    with torch.no_grad():
        identity = reenactor.eval().embed_identity(photos[None])[0]
    avatar = Avatar(reenactor, identity, cfg.mode).to(dev)
    ema = Avatar(instantiate(Reenactor, model_cfg, ckpt.weights("ema"), "ema"), identity, cfg.mode)
    ema.to(dev).requires_grad_(False)
    disc = _finetune_discriminator(model_cfg, ckpt, identity).to(dev)
    trainable = [p for p in avatar.parameters() if p.requires_grad]
    opt_g = torch.optim.RAdam(trainable, cfg.lr_g, betas=cfg.betas, eps=cfg.eps)
    opt_d = torch.optim.RAdam(disc.parameters(), cfg.lr_d, betas=cfg.betas, eps=cfg.eps)
    perceptual = {
        kind: L.PerceptualLoss(kind, path).to(dev)
        for kind, path in (("vgg19", cfg.vgg19_weights), ("vggface", cfg.vggface_weights))
        if getattr(cfg.losses, kind) and path is not None
    }
    augmenter = PoseAugmenter(cfg.augment)

    # --- resume ---------------------------------------------------------------------------
    start = _resume(work_dir, avatar, ema, disc, opt_g, opt_d)
    label = torch.zeros(min(cfg.batch_size, n), dtype=torch.long, device=dev)
    t0, l1 = time.perf_counter(), float("nan")
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="finetune", file=sys.stderr)
    for step in bar:
        if should_cancel is not None and should_cancel():
            raise FinetuneCancelled(f"cancelled at step {step} of {steps}")
        rng = np.random.default_rng((cfg.seed, step))
        idx = rng.choice(n, size=len(label), replace=n < len(label))
        # Each photo is both the pose input (augmented) and the target (official).
        triples = [augmenter(images[i], images[i], masks[i], rng) for i in idx]
        pose_t = _batch([t[0] for t in triples], dev)
        mask_t = _batch_masks([t[2] for t in triples], dev)
        real = _batch([t[1] for t in triples], dev)
        if model_cfg.predict_mask:  # the "no segmentation" ablation learns whole frames
            real = real * mask_t

        avatar.train()
        avatar.reenactor.pose_encoder.eval()  # frozen: no BatchNorm drift
        out_g = avatar(pose_t)
        fake = out_g.masked_rgb
        d_real = disc(real, label)
        disc.requires_grad_(False)
        d_fake = disc(fake, label)
        g_terms = {
            "adversarial": L.hinge_g(d_fake.score),
            "feature_matching": L.feature_matching(d_fake.features, d_real.features),
        }
        if model_cfg.predict_mask:
            g_terms["dice"] = L.dice(out_g.mask, mask_t)
        g_terms["l1"] = (fake - real).abs().mean()
        for kind, net in perceptual.items():
            g_terms[kind] = net(fake, real)
        g_total = sum(getattr(cfg.losses, k) * v for k, v in g_terms.items())
        disc.requires_grad_(True)
        opt_g.zero_grad(set_to_none=True)
        g_total.backward()  # type: ignore[union-attr]
        opt_g.step()
        opt_d.zero_grad(set_to_none=True)
        d_fake = disc(fake.detach(), label, detach_embed=True)
        L.hinge_d(d_real.score, d_fake.score).backward()
        opt_d.step()
        with torch.no_grad():  # EMA: parameters averaged, buffers copied (official)
            for p_ema, p in zip(ema.parameters(), avatar.parameters(), strict=True):
                if p.requires_grad:
                    p_ema.lerp_(p, 1 - cfg.ema_decay)
            for b_ema, b in zip(ema.buffers(), avatar.buffers(), strict=True):
                b_ema.copy_(b)
        l1 = g_terms["l1"].item()
        done = step + 1
        if progress is not None:
            elapsed = time.perf_counter() - t0
            eta = elapsed / (done - start) * (steps - done)
            progress(Progress(done, steps, g_total.item(), eta))  # type: ignore[union-attr]
        if done % cfg.checkpoint_every == 0 and done < steps:
            _save_state(work_dir, done, avatar, ema, disc, opt_g, opt_d)

    # --- artifact -------------------------------------------------------------------------
    result_ckpt = _avatar_checkpoint(ema, model_cfg, cfg, base, steps, n)
    save_checkpoint(out, result_ckpt)
    preview = out.with_suffix(".png")
    _preview(ema, photos, preview)
    for stale in work_dir.glob("*"):
        stale.unlink()
    work_dir.rmdir()
    return FinetuneResult(avatar=out, preview=preview, steps=steps, final_l1=l1)


# --- helpers -------------------------------------------------------------------------------
def _check_inputs(images: np.ndarray, masks: np.ndarray, cfg: ModelConfig) -> None:
    s = cfg.image_size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
        raise ValueError(
            f"images must be uint8 (N, {s}, {s}, 3), got {images.dtype} {images.shape}"
        )
    if masks.dtype != np.uint8 or masks.shape != images.shape[:3]:
        raise ValueError(f"masks must be uint8 (N, {s}, {s}), got {masks.dtype} {masks.shape}")
    if not 1 <= len(images) <= MAX_IMAGES:
        raise ValueError(f"need 1 to {MAX_IMAGES} photos, got {len(images)}")


def _batch(images: list[np.ndarray], dev: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).to(dev)


def _batch_masks(masks: list[np.ndarray], dev: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(masks)).float().div(255)[:, None].to(dev)


def _finetune_discriminator(
    cfg: ModelConfig, ckpt: Checkpoint, identity: torch.Tensor
) -> Discriminator:
    """Meta D (if the checkpoint has one) with its embedding replaced by one row = e."""
    disc = Discriminator(dataclasses.replace(cfg, num_labels=1, embed_sn_eps=1e-12))
    if ckpt.discriminator is not None:
        state = {k: v for k, v in ckpt.discriminator.items() if not k.startswith("embed.")}
        own = disc.state_dict()
        own.update(state)
        disc.load_state_dict(own)
    embed = nn.Embedding(1, cfg.identity_dim)
    with torch.no_grad():
        embed.weight.copy_(identity.reshape(1, -1))
    disc.embed = spectral_norm(embed, 1e-12)  # type: ignore[assignment]
    return disc


def _avatar_checkpoint(
    ema: Avatar, cfg: ModelConfig, ft: FinetuneConfig, base: Path, steps: int, n: int
) -> Checkpoint:
    state = {k: v.detach().cpu() for k, v in ema.reenactor.state_dict().items()}
    settings = json.loads(json.dumps(dataclasses.asdict(ft), default=str))
    info = {
        "avatar": {
            "mode": ft.mode,
            "steps": steps,
            "images": n,
            "base": str(base),
            "base_sha256": file_sha256(base),
            "finetune": settings,
        }
    }
    # Only what fine-tuning changed: the base checkpoint supplies the rest at load time.
    keys = set(light_keys(ema.reenactor)) if ft.mode == "light" else None
    state = {
        k: v
        for k, v in state.items()
        if (k in keys if keys is not None else k.startswith("generator."))
    }
    # fp16 storage halves the artifact; loading casts back to float32.
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    identity = ema.identity.detach().cpu()
    return Checkpoint(cfg, reenactor=state, avatar={"identity": identity}, info=info)


def _preview(ema: Avatar, photos: torch.Tensor, path: Path) -> None:
    ema.eval()
    with torch.no_grad():
        out = ema(photos[:8])
    rows = torch.cat([photos[:8], (out.rgb * out.mask).clamp(0, 1)])
    save_image(make_grid(rows.cpu(), nrow=min(8, len(photos))), path)


def _state_paths(work_dir: Path) -> tuple[Path, Path]:
    return work_dir / "state.safetensors", work_dir / "optim.pt"


def _save_state(
    work_dir: Path,
    step: int,
    avatar: Avatar,
    ema: Avatar,
    disc: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
) -> None:
    weights, optim = _state_paths(work_dir)
    cfg: ModelConfig = avatar.reenactor.cfg
    ckpt = Checkpoint(
        cfg,
        reenactor=avatar.state_dict(),
        ema=ema.state_dict(),
        discriminator=disc.state_dict(),
        info={"step": step},
    )
    save_checkpoint(weights, ckpt)
    tmp = optim.with_suffix(".tmp")
    torch.save({"step": step, "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict()}, tmp)
    tmp.replace(optim)


def _resume(
    work_dir: Path,
    avatar: Avatar,
    ema: Avatar,
    disc: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
) -> int:
    weights, optim = _state_paths(work_dir)
    if not (weights.exists() and optim.exists()):
        return 0
    state = load_checkpoint(weights)
    avatar.load_state_dict(state.reenactor)
    ema.load_state_dict(state.ema or {})
    disc.load_state_dict(state.discriminator or {})
    saved = torch.load(optim, weights_only=True)
    opt_g.load_state_dict(saved["opt_g"])
    opt_d.load_state_dict(saved["opt_d"])
    return int(saved["step"])


def load_photos(folder: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops (`*.png`/`*.jpg`) and masks (`<name>.mask.png`) from a folder, resized to size."""
    images, masks = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg") or ".mask" in path.stem:
            continue
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        mask_path = path.with_name(path.stem + ".mask.png")
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) if mask_path.exists() else None
        if bgr is None:
            raise ValueError(f"{path}: not an image")
        images.append(cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (size, size)))
        masks.append(
            cv2.resize(mask, (size, size))
            if mask is not None
            else np.full((size, size), 255, np.uint8)
        )
    return np.stack(images), np.stack(masks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fine-tune an avatar on 1-32 face crops.")
    parser.add_argument("base", type=Path, help="base checkpoint (.safetensors)")
    parser.add_argument("photos", type=Path, help="folder of crops, optional <name>.mask.png")
    parser.add_argument("out", type=Path, help="avatar checkpoint to write")
    parser.add_argument("--mode", choices=["full", "light"], default="full")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--l1", type=float, default=10.0, help="pixel L1 weight (no VGG here)")
    args = parser.parse_args(argv)
    size = read_header(args.base)[0].image_size
    images, masks = load_photos(args.photos, size)
    weights = L.LossWeights(vgg19=0, vggface=0, embedding_match=0, l1=args.l1)
    cfg = FinetuneConfig(mode=args.mode, steps=args.steps, seed=args.seed, losses=weights)
    result = finetune(args.base, images, masks, args.out, cfg)
    print(f"wrote {result.avatar} ({result.steps} steps, final L1 {result.final_l1:.4f})")
    print(f"preview: {result.preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
