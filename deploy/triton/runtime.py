"""What the Python-backend models run: numpy in, numpy out, no Triton imports.

Each `<name>/1/model.py` in the repository is a thin TritonPythonModel that turns requests
into arrays and calls one of these runtimes, so everything here is testable without a
server. Per-avatar (fine-tuned) generators live in `AvatarCache`: loaded on first use from
the avatar directory, least recently used evicted past a byte budget, tensors the
fine-tune left unchanged shared with the base generator.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploy.triton.spec import AVATAR_SUFFIX, is_valid_avatar_id
from model.checkpoint import CheckpointError, instantiate, load_checkpoint
from model.generator import Generator
from model.inference import InferenceModel, RenderOutput
from model.layers import fold_spectral_norm

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class RequestError(ValueError):
    """The request is at fault (shape, unknown avatar): reported to that client only."""


@dataclass(frozen=True)
class RuntimeConfig:
    """Settings a model reads from its config.pbtxt `parameters`."""

    checkpoint: Path
    device: str = "cpu"
    dtype: str = "fp32"  # autocast dtype on GPU; fp32 on CPU
    threads: int = 0  # torch intra-op threads per instance; 0 = torch's default
    avatar_dir: Path | None = None  # fine-tuned avatars: <avatar_dir>/<id>.safetensors
    avatar_cache_mb: float = 512.0  # bound on per-avatar tensors held in memory
    compile: str = ""  # torch.compile mode for GPU, e.g. "reduce-overhead"; "" = eager

    @classmethod
    def from_parameters(
        cls, params: Mapping[str, str], model_dir: Path, device: str
    ) -> RuntimeConfig:
        checkpoint = Path(params.get("checkpoint", "model.safetensors"))
        avatar_dir = params.get("avatar_dir", "")
        return cls(
            checkpoint=checkpoint if checkpoint.is_absolute() else model_dir / checkpoint,
            device=device,
            dtype=params.get("dtype", "fp32"),
            threads=int(params.get("threads", "0") or 0),
            avatar_dir=Path(avatar_dir) if avatar_dir else None,
            avatar_cache_mb=float(params.get("avatar_cache_mb", "512") or 512),
            compile=params.get("compile", ""),
        )


def load_model(cfg: RuntimeConfig) -> InferenceModel:
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dtype = DTYPES[cfg.dtype] if cfg.device.startswith("cuda") else torch.float32
    compile_mode = cfg.compile if cfg.device.startswith("cuda") else ""
    return InferenceModel.from_checkpoint(
        cfg.checkpoint, device=cfg.device, dtype=dtype, compile=compile_mode or False
    )


def _images(array: np.ndarray, size: int, what: str) -> torch.Tensor:
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (3, size, size):
        raise RequestError(f"{what} must be uint8 (N, 3, {size}, {size}), got {array.dtype} "
                           f"{tuple(array.shape)}")  # fmt: skip
    if array.shape[0] == 0:
        raise RequestError(f"{what} must hold at least one image")
    return torch.from_numpy(np.ascontiguousarray(array))


# --- encoders ------------------------------------------------------------------------------
class IdentityEncoderRuntime:
    """K photos of one person -> one identity embedding (no batching across requests)."""

    def __init__(self, cfg: RuntimeConfig):
        self.model = load_model(cfg)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = _images(images, self.model.config.image_size, "IMAGES")
        return self.model.embed_identity(x).cpu().numpy()


class PoseEncoderRuntime:
    """Driver frames of all batched requests -> pose descriptors, in one forward pass."""

    def __init__(self, cfg: RuntimeConfig):
        self.model = load_model(cfg)

    def __call__(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        size = self.model.config.image_size
        frames = torch.cat([_images(b, size, "FRAMES") for b in batches])
        poses = self.model.encode_pose(frames).cpu().numpy()
        bounds = np.cumsum([0, *(len(b) for b in batches)])
        return [poses[a:b] for a, b in itertools.pairwise(bounds)]


# --- per-avatar weights --------------------------------------------------------------------
@dataclass
class Avatar:
    identity: torch.Tensor  # (identity_dim,) on the model's device
    generator: nn.Module
    nbytes: int  # tensors owned by this avatar (the rest are the base generator's)
    load_s: float


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_s_total: float = 0.0
    resident: int = 0
    resident_bytes: int = 0


class AvatarCache:
    """LRU of fine-tuned generators keyed by avatar id, bounded by the bytes they own.

    An avatar checkpoint holds only what its fine-tune changed (the generator for `full`,
    the AdaIN MLP for `light`). It is loaded over the base weights, and every tensor that
    is still equal to the base generator's is replaced by that very tensor, so a `light`
    avatar costs its MLP, not a whole generator.
    """

    def __init__(self, base: InferenceModel, base_state: dict[str, torch.Tensor],
                 avatar_dir: Path, max_bytes: int):  # fmt: skip
        self.base, self.base_state = base, base_state
        self.avatar_dir, self.max_bytes = avatar_dir, max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[str, Avatar] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, avatar_id: str) -> Avatar:
        with self._lock:
            entry = self._entries.get(avatar_id)
            if entry is not None:
                self._entries.move_to_end(avatar_id)
                self.stats.hits += 1
                return entry
            self.stats.misses += 1
            entry = self._load(avatar_id)
            self._entries[avatar_id] = entry
            self.stats.load_s_total += entry.load_s
            while self._owned() > self.max_bytes and len(self._entries) > 1:
                self._entries.popitem(last=False)
                self.stats.evictions += 1
            self.stats.resident, self.stats.resident_bytes = len(self._entries), self._owned()
            return entry

    def evict(self, avatar_id: str) -> bool:
        """Drop an avatar (e.g. re-tuned or deleted); True if it was resident."""
        with self._lock:
            found = self._entries.pop(avatar_id, None) is not None
            self.stats.resident, self.stats.resident_bytes = len(self._entries), self._owned()
            return found

    def _owned(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def _load(self, avatar_id: str) -> Avatar:
        if not is_valid_avatar_id(avatar_id):
            raise RequestError(f"invalid avatar id {avatar_id!r}")
        path = self.avatar_dir / f"{avatar_id}{AVATAR_SUFFIX}"
        if not path.is_file():
            raise RequestError(f"unknown avatar {avatar_id!r}")
        t0 = time.perf_counter()
        cfg = self.base.config
        try:
            ckpt = load_checkpoint(path, expect_preset=cfg.name)
        except CheckpointError as e:
            raise RequestError(f"avatar {avatar_id!r} cannot be loaded: {e}") from e
        identity = ckpt.avatar_identity()
        if identity is None:
            raise RequestError(f"{path.name} is not an avatar checkpoint (no identity)")
        merged = {**self.base_state, **ckpt.weights()}
        prefix = "generator."
        state = {k[len(prefix) :]: v for k, v in merged.items() if k.startswith(prefix)}
        generator = fold_spectral_norm(instantiate(Generator, cfg, state, str(path)).eval())
        nbytes = _share_unchanged(generator, self.base.net.generator)
        generator.to(self.base.device)
        return Avatar(
            identity=identity.float().to(self.base.device),
            generator=generator,
            nbytes=nbytes,
            load_s=time.perf_counter() - t0,
        )


def _share_unchanged(module: nn.Module, base: nn.Module) -> int:
    """Point `module`'s tensors that equal `base`'s at base's; return the bytes left owned."""
    base_tensors = dict(base.named_parameters()) | dict(base.named_buffers())
    owned = 0
    named = list(module.named_parameters()) + list(module.named_buffers())
    for name, tensor in named:
        ref = base_tensors.get(name)
        same = (
            ref is not None
            and ref.shape == tensor.shape
            and ref.dtype == tensor.dtype
            and torch.equal(ref.detach().cpu(), tensor.detach().cpu())
        )
        if not same:
            owned += tensor.numel() * tensor.element_size()
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = ref  # type: ignore[assignment]
        else:
            owner._buffers[leaf] = ref
    return owned


# --- generator -----------------------------------------------------------------------------
@dataclass
class RenderRequest:
    poses: np.ndarray  # (B, pose_dim) float32
    identity: np.ndarray | None  # (B, identity_dim) float32; rows used where avatar_ids[i] == ""
    avatar_ids: list[str] | None  # B ids; "" = zero-shot row (needs identity)


class GeneratorRuntime:
    """Renders batched requests: one forward for all zero-shot rows, one per avatar."""

    def __init__(self, cfg: RuntimeConfig):
        self.model = load_model(cfg)
        self.cache: AvatarCache | None = None
        if cfg.avatar_dir is not None:
            base_state = load_checkpoint(cfg.checkpoint).weights()
            self.cache = AvatarCache(
                self.model, base_state, cfg.avatar_dir, int(cfg.avatar_cache_mb * 2**20)
            )

    def __call__(
        self, requests: Sequence[RenderRequest]
    ) -> list[tuple[np.ndarray, np.ndarray] | RequestError]:
        """Per request (rgb, mask) arrays, or the RequestError that request alone caused."""
        cfg = self.model.config
        errors: dict[int, RequestError] = {}
        poses, identities, keys, owner = [], [], [], []  # flat over the valid requests' rows
        for i, req in enumerate(requests):
            try:
                req_keys = self._keys(req)
            except RequestError as e:
                errors[i] = e
                continue
            n = len(req.poses)
            poses.append(np.asarray(req.poses, np.float32))
            zero_shot = not all(req_keys)  # then _keys checked IDENTITY's shape
            blank = np.zeros((n, cfg.identity_dim), np.float32)
            identities.append(req.identity if zero_shot and req.identity is not None else blank)
            keys += req_keys
            owner += [i] * n
        size = cfg.image_size
        rgb = np.zeros((len(keys), 3, size, size), np.float32)
        mask = np.zeros((len(keys), 1, size, size), np.float32)
        if keys:
            all_poses = torch.from_numpy(np.concatenate(poses))
            all_identities = torch.from_numpy(np.concatenate(identities).astype(np.float32))
            key_array, owner_array = np.asarray(keys), np.asarray(owner)
            for key in dict.fromkeys(keys):  # one forward per avatar, in first-seen order
                rows = np.flatnonzero(key_array == key)
                try:
                    out = self._render_group(key, all_poses[rows], all_identities[rows])
                except RequestError as e:
                    errors.update({int(i): e for i in np.unique(owner_array[rows])})
                    continue
                rgb[rows], mask[rows] = out.rgb.cpu().numpy(), out.mask.cpu().numpy()
        results: list[tuple[np.ndarray, np.ndarray] | RequestError] = []
        has_rows, offset = set(owner), 0
        for i, req in enumerate(requests):
            n = len(req.poses) if i in has_rows else 0
            results.append(errors.get(i) or (rgb[offset : offset + n], mask[offset : offset + n]))
            offset += n
        return results

    def _render_group(
        self, key: str, poses: torch.Tensor, identities: torch.Tensor
    ) -> RenderOutput:
        if not key:
            return self.model.render(identities, poses)
        assert self.cache is not None
        avatar = self.cache.get(key)
        return self.model.render(avatar.identity, poses, generator=avatar.generator)

    def _keys(self, req: RenderRequest) -> list[str]:
        cfg = self.model.config
        n = len(req.poses)
        if req.poses.ndim != 2 or req.poses.shape[1] != cfg.pose_dim or n == 0:
            raise RequestError(f"POSE must be (N, {cfg.pose_dim}), got {req.poses.shape}")
        keys = list(req.avatar_ids) if req.avatar_ids is not None else [""] * n
        if len(keys) != n:
            raise RequestError(f"AVATAR_ID has {len(keys)} rows for {n} poses")
        if any(keys) and self.cache is None:
            raise RequestError("this server has no avatar directory: fine-tuned avatars are off")
        if not all(keys):
            ident = req.identity
            if ident is None or ident.shape != (n, cfg.identity_dim):
                shape = None if ident is None else ident.shape
                raise RequestError(
                    f"zero-shot rows need IDENTITY (N, {cfg.identity_dim}), got {shape}"
                )
        for key in keys:
            if key and not is_valid_avatar_id(key):
                raise RequestError(f"invalid avatar id {key!r}")
        return keys
