"""Meta-learning (paper Section 3): `train(config)`, one function top to bottom.

Per iteration, as the official code does: one forward of the reenactor; G loss backward
and step; discriminator gradients zeroed; D loss (fake detached, embedding detached on the
fake pass, then real) backward and step; EMA update of the reenactor.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from model.checkpoint import Checkpoint, instantiate, load_checkpoint, load_state, save_checkpoint
from model.config import ModelConfig
from model.discriminator import Discriminator, DiscriminatorOutput
from model.reenactor import Reenactor
from training import losses as L
from training.config import OptimConfig, TrainConfig, model_config, save_config, to_dict
from training.data import Sample, VideoDataset
from training.distributed import DistInfo, average_gradients, init_from_env, shutdown

log = logging.getLogger("training")
STATE_FILE = "train_state.pt"
LAST_CHECKPOINT = "last.safetensors"


class EpochSampler(Sampler[int]):
    """Seeded permutation per epoch, split across ranks, resumable mid-epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, info: DistInfo):
        self.n, self.batch_size, self.seed, self.info = n, batch_size, seed, info
        self.epoch, self.start_batch = 0, 0

    def batches_per_epoch(self) -> int:
        return max(1, self.n // (self.batch_size * self.info.world_size))

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        # Repeat the permutation so tiny datasets still fill whole batches.
        reps = math.ceil(self.batch_size * self.info.world_size / self.n)
        order = order.repeat(reps)[
            : self.batches_per_epoch() * self.batch_size * self.info.world_size
        ]
        mine = order[self.info.rank :: self.info.world_size]
        return iter(mine[self.start_batch * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size


class EMA:
    """Running average of the reenactor: parameters averaged, buffers copied (official)."""

    def __init__(self, model: Reenactor, decay: float):
        self.decay = decay
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.model = instantiate(Reenactor, model.cfg, state, "ema")
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: Reenactor) -> None:
        for p_ema, p in zip(self.model.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)


def pick_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


def build_perceptual(cfg: TrainConfig) -> dict[str, L.PerceptualLoss]:
    """Perceptual networks for the active terms; a weight without a weights file is an error."""
    nets = {}
    for kind, path in (("vgg19", cfg.vgg19_weights), ("vggface", cfg.vggface_weights)):
        if getattr(cfg.losses, kind) == 0:
            continue
        if path is None:
            raise ValueError(
                f"losses.{kind} > 0 needs {kind}_weights (a local file); "
                f"set losses.{kind}=0 to train without it"
            )
        nets[kind] = L.PerceptualLoss(kind, path, cfg.perceptual_official_input_range)
    return nets


def generator_losses(
    cfg: TrainConfig,
    out: Any,
    batch: Sample,
    real: torch.Tensor,
    disc: Discriminator,
    d_real: DiscriminatorOutput,
    perceptual: dict[str, L.PerceptualLoss],
) -> dict[str, torch.Tensor]:
    """Every active G term, unweighted; `total` is the weighted sum. `real`: `real_images`."""
    w = cfg.losses
    fake = out.masked_rgb
    d_fake = disc(fake, batch.label)
    terms: dict[str, torch.Tensor] = {}
    if w.adversarial:
        terms["adversarial"] = L.hinge_g(d_fake.score)
    if w.feature_matching:
        terms["feature_matching"] = L.feature_matching(d_fake.features, d_real.features)
    for kind, net in perceptual.items():
        terms[kind] = net(fake, real)
    if w.dice:
        terms["dice"] = L.dice(out.mask, batch.mask)
    if w.embedding_match:
        rows = disc.embed(batch.label)
        terms["embedding_match"] = L.embedding_match(out.identity.per_frame[:, 0], rows)
    if w.l1:
        terms["l1"] = (fake - real).abs().mean()
    terms["total"] = sum(getattr(w, k) * v for k, v in terms.items())  # type: ignore[assignment]
    return terms


def real_images(batch: Sample, model_cfg: ModelConfig) -> torch.Tensor:
    """What D and the losses compare with: the segmented target, or the whole frame when the
    model predicts no mask (the "no segmentation" ablation learns the background too)."""
    return batch.target * batch.mask if model_cfg.predict_mask else batch.target


def driver_input(batch: Sample, model_cfg: ModelConfig) -> torch.Tensor:
    """The pose encoder's input: the augmented driver frame, or its landmarks (FSTH+)."""
    if model_cfg.pose_source != "keypoints":
        return batch.pose_image
    if batch.keypoints is None or batch.keypoints.shape[-2] != model_cfg.num_keypoints:
        got = None if batch.keypoints is None else tuple(batch.keypoints.shape)
        raise ValueError(
            f"the keypoints model needs {model_cfg.num_keypoints} driver landmarks per sample "
            f"(VideoDataset(keypoints=True)), got {got}"
        )
    return batch.keypoints


@dataclass
class StepResult:
    out: Any  # ReenactmentOutput
    g_terms: dict[str, torch.Tensor]
    d_loss: torch.Tensor


class Trainer:
    """Networks, optimisers and the official training iteration (`step`)."""

    def __init__(
        self, cfg: TrainConfig, model_cfg: ModelConfig, info: DistInfo, device: torch.device
    ):
        self.cfg, self.info, self.device = cfg, info, device
        if not model_cfg.predict_mask and cfg.losses.dice:
            raise ValueError("a model without a mask has no dice term: set losses.dice=0")
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.reenactor = Reenactor(model_cfg).to(device)
        self.model: nn.Module = self.reenactor  # DDP wrapper after `distribute`
        self.disc = Discriminator(model_cfg).to(device)
        self.ema = EMA(self.reenactor, cfg.ema_decay)
        self.perceptual = {k: v.to(device) for k, v in build_perceptual(cfg).items()}
        o = cfg.optim
        self.opt_g = torch.optim.Adam(self.reenactor.parameters(), o.lr_g, betas=o.betas, eps=o.eps)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), o.lr_d, betas=o.betas, eps=o.eps)
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.amp)
        self.use_amp = self.amp_dtype is not None and device.type == "cuda"
        fp16 = self.use_amp and self.amp_dtype == torch.float16
        self.scaler_g = torch.amp.GradScaler(enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(enabled=fp16)

    def distribute(self) -> None:
        """Wrap the reenactor in DDP when running under torchrun."""
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.reenactor, device_ids=ids)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def step(self, batch: Sample, index: int) -> StepResult:
        """One official iteration: forward, G step, D step, EMA update."""
        cfg, disc, model_cfg = self.cfg, self.disc, self.reenactor.cfg
        factor = lr_factor(cfg.optim, index, cfg.steps)  # a pure function of the step: resumable
        for opt, lr in ((self.opt_g, cfg.optim.lr_g), (self.opt_d, cfg.optim.lr_d)):
            for group in opt.param_groups:
                group["lr"] = lr * factor
        self.model.train(), disc.train()
        update_g = cfg.update == "combined" or index % 2 == 1
        update_d = cfg.update == "combined" or index % 2 == 0
        # Three discriminator passes per step, as official: real (D loss and the feature-
        # matching targets), fake for G (D frozen), fake detached for D.
        with self._autocast():
            out = self.model(batch.identity_images, driver_input(batch, model_cfg))
            real = real_images(batch, model_cfg)
            with torch.set_grad_enabled(update_d):
                d_real = disc(real, batch.label)
        disc.requires_grad_(False)
        with self._autocast():
            g_terms = generator_losses(cfg, out, batch, real, disc, d_real, self.perceptual)
        disc.requires_grad_(True)
        if update_g:
            self.opt_g.zero_grad(set_to_none=True)
            self.scaler_g.scale(g_terms["total"]).backward()
            _optimizer_step(self.scaler_g, self.opt_g, self.reenactor, cfg.optim.grad_clip)
        d_loss = torch.zeros((), device=self.device)
        if update_d:
            self.opt_d.zero_grad(set_to_none=True)
            with self._autocast():
                d_fake = disc(out.masked_rgb.detach(), batch.label, detach_embed=True)
                d_loss = L.hinge_d(d_real.score, d_fake.score)
            self.scaler_d.scale(d_loss).backward()
            average_gradients(disc, self.info)
            _optimizer_step(self.scaler_d, self.opt_d, disc, cfg.optim.grad_clip)
        self.ema.update(self.reenactor)
        return StepResult(out, g_terms, d_loss)


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) meta-learning; returns the path of the last checkpoint."""
    # --- setup ------------------------------------------------------------------------
    device_type = "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    info = init_from_env(device_type)
    device = pick_device(cfg.device, info)
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    keypoints = model_config(cfg).pose_source == "keypoints"
    dataset = VideoDataset(cfg.data, keypoints=keypoints)
    model_cfg = model_config(cfg, num_labels=dataset.num_labels)
    size = dataset[0].pose_image.shape[-1]
    if size != model_cfg.image_size:
        raise ValueError(
            f"data crops are {size}px but {cfg.preset} needs {model_cfg.image_size}px; "
            f"set data.image_size={model_cfg.image_size}"
        )
    trainer = Trainer(cfg, model_cfg, info, device)
    if info.is_main:
        active = [k for k, v in to_dict(cfg.losses).items() if v]
        log.info("active losses: %s (weights %s)", active, to_dict(cfg.losses))

    # --- resume -------------------------------------------------------------------------
    step = 0
    sampler = EpochSampler(len(dataset), cfg.batch_size, cfg.seed, info)
    if (run_dir / STATE_FILE).exists():
        step = _resume(run_dir, trainer, sampler)
        if info.is_main:
            log.info("resumed from step %d", step)
    elif cfg.init_from is not None:
        _warm_start(Path(cfg.init_from), trainer)
        if info.is_main:
            log.info("warm start from %s", cfg.init_from)
    trainer.distribute()
    writer = SummaryWriter(str(run_dir / "tb")) if info.is_main else None

    # --- loop ---------------------------------------------------------------------------
    batches = _batches(dataset, sampler, cfg, device)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not info.is_main)
    t0 = time.perf_counter()
    while step < cfg.steps:
        batch = next(batches)
        result = trainer.step(batch, step)
        step += 1
        bar.update()

        # --- logging and checkpoints ------------------------------------------------------
        if writer is not None and (step % cfg.log_every == 0 or step == cfg.steps):
            scalars = {f"g/{k}": v.item() for k, v in result.g_terms.items()}
            scalars["d/hinge"] = result.d_loss.item()
            scalars["optim/lr_factor"] = lr_factor(cfg.optim, step - 1, cfg.steps)
            scalars["speed/it_per_s"] = cfg.log_every / max(time.perf_counter() - t0, 1e-9)
            t0 = time.perf_counter()
            for k, v in scalars.items():
                writer.add_scalar(k, v, step)
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
            bar.set_postfix(g=f"{scalars['g/total']:.3f}", d=f"{scalars['d/hinge']:.3f}")
        if writer is not None and (step % cfg.image_every == 0 or step == cfg.steps):
            grid = _image_grid(batch, result.out, real_images(batch, trainer.reenactor.cfg))
            writer.add_image("samples", grid, step)
            (run_dir / "samples").mkdir(exist_ok=True)
            save_image(grid, run_dir / "samples" / f"{step:07d}.png")
        if (step % cfg.checkpoint_every == 0 or step == cfg.steps) and info.is_main:
            _save(run_dir, cfg, step, trainer, sampler)
    bar.close()
    if writer is not None:
        writer.close()
    shutdown(info)
    return run_dir / LAST_CHECKPOINT


# --- helpers -------------------------------------------------------------------------------
def _batches(
    dataset: VideoDataset, sampler: EpochSampler, cfg: TrainConfig, device: torch.device
) -> Iterator[Sample]:
    """Endless batches; advances the epoch (and the dataset's draws) at each pass."""
    while True:
        dataset.set_epoch(sampler.epoch)
        # Its own generator: a loader seeding workers from the global RNG would shift the
        # dropout stream whenever a resumed run creates its loader at a different point.
        loader = DataLoader(
            dataset,
            cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.num_workers,
            drop_last=True,
            generator=torch.Generator().manual_seed(cfg.seed + sampler.epoch),
        )
        for batch in loader:
            sampler.start_batch += 1
            yield Sample(*(t.to(device) for t in batch))  # type: ignore[arg-type]
        sampler.epoch, sampler.start_batch = sampler.epoch + 1, 0


def lr_factor(optim: OptimConfig, step: int, total: int) -> float:
    """Learning-rate multiplier at `step`: 1, or a linear tail to 0 from `decay_from`."""
    if optim.decay_from is None:
        return 1.0
    start = optim.decay_from * total
    return 1.0 if step < start else max(0.0, (total - step) / max(total - start, 1.0))


def _optimizer_step(
    scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer, module: nn.Module, clip: float | None
) -> None:
    if clip is not None:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(module.parameters(), clip)
    scaler.step(opt)
    scaler.update()


def _image_grid(batch: Sample, out: Any, real: torch.Tensor, n: int = 4) -> torch.Tensor:
    """Rows: identity frame 0, augmented driver, output, predicted mask, target."""
    n = min(n, batch.pose_image.shape[0])
    rows = [
        batch.identity_images[:n, 0],
        batch.pose_image[:n],
        out.masked_rgb[:n].detach().clamp(0, 1),
        out.mask[:n].detach().expand(-1, 3, -1, -1),
        real[:n],
    ]
    return make_grid(torch.cat(rows).float().cpu(), nrow=n, padding=2)


def _save(run_dir: Path, cfg: TrainConfig, step: int, t: Trainer, sampler: EpochSampler) -> None:
    """Model checkpoint (our format) plus optimiser/RNG/data state, each written atomically."""
    ckpt = Checkpoint(
        config=t.reenactor.cfg,
        reenactor=t.reenactor.state_dict(),
        ema=t.ema.model.state_dict(),
        discriminator=t.disc.state_dict(),
        info={"step": step, "train_config": to_dict(cfg)},
    )
    save_checkpoint(run_dir / LAST_CHECKPOINT, ckpt)
    state = {
        "step": step,
        "opt_g": t.opt_g.state_dict(),
        "opt_d": t.opt_d.state_dict(),
        "epoch": sampler.epoch,
        "start_batch": sampler.start_batch,
        "torch_rng": torch.get_rng_state(),
    }
    tmp = run_dir / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    tmp.replace(run_dir / STATE_FILE)


def _warm_start(path: Path, t: Trainer) -> None:
    """Start from a trained checkpoint's weights (EMA preferred: a release keeps only those)."""
    ckpt = load_checkpoint(path)
    # The label count only sizes the discriminator's embedding, which a release leaves out.
    if replace(ckpt.config, num_labels=t.reenactor.cfg.num_labels) != t.reenactor.cfg:
        raise ValueError(f"{path} holds another model configuration than this run's")
    weights = ckpt.weights("ema")
    load_state(t.reenactor, weights, "reenactor")
    load_state(t.ema.model, weights, "ema")
    if ckpt.discriminator is not None:
        load_state(t.disc, ckpt.discriminator, "discriminator")


def _resume(run_dir: Path, t: Trainer, sampler: EpochSampler) -> int:
    ckpt = load_checkpoint(run_dir / LAST_CHECKPOINT)
    if ckpt.ema is None or ckpt.discriminator is None:
        raise ValueError(f"{run_dir / LAST_CHECKPOINT} lacks EMA or discriminator weights")
    load_state(t.reenactor, ckpt.reenactor, "reenactor")
    load_state(t.ema.model, ckpt.ema, "ema")
    load_state(t.disc, ckpt.discriminator, "discriminator")
    state = torch.load(run_dir / STATE_FILE, map_location=t.device, weights_only=True)
    t.opt_g.load_state_dict(state["opt_g"])
    t.opt_d.load_state_dict(state["opt_d"])
    sampler.epoch, sampler.start_batch = state["epoch"], state["start_batch"]
    torch.set_rng_state(state["torch_rng"].cpu())
    return int(state["step"])
