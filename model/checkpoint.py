"""Our checkpoint format: one safetensors file, config and format version in its header.

Tensor keys are grouped by prefix: `reenactor.` (raw weights), `ema.` (the running
average used for inference), `discriminator.`, `avatar.` (a fine-tuned identity).
No pickle is involved, so loading an untrusted file cannot run code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from model.config import ModelConfig

FORMAT_NAME = "lpd-checkpoint"
FORMAT_VERSION = 1
GROUPS = ("reenactor", "ema", "discriminator", "avatar")

StateDict = dict[str, torch.Tensor]
M = TypeVar("M", bound=nn.Module)


class CheckpointError(Exception):
    """Base class: the file cannot be used as a checkpoint."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    pass


class CheckpointCorruptError(CheckpointError):
    """Truncated, not safetensors, or missing our header."""


class CheckpointVersionError(CheckpointError):
    """Written by a format version this code cannot read."""


class CheckpointPresetError(CheckpointError):
    """The checkpoint is for another preset than the caller asked for."""


class CheckpointMismatchError(CheckpointError):
    """Tensor names or shapes disagree with the networks its config builds."""


@dataclass
class Checkpoint:
    config: ModelConfig
    reenactor: StateDict
    ema: StateDict | None = None
    discriminator: StateDict | None = None
    avatar: StateDict | None = None  # {"identity": (1, D)[, "ema_identity": (1, D)]}
    info: dict[str, Any] = field(default_factory=dict)  # provenance: step, source, ...

    def weights(self, which: Literal["ema", "raw"] = "ema") -> StateDict:
        """Reenactor weights: EMA when present and asked for (official inference), else raw."""
        return self.ema if which == "ema" and self.ema is not None else self.reenactor

    def avatar_identity(self, which: Literal["ema", "raw"] = "ema") -> torch.Tensor | None:
        """The fine-tuned identity embedding (identity_dim,), if this is an avatar checkpoint."""
        if not self.avatar:
            return None
        key = "ema_identity" if which == "ema" and "ema_identity" in self.avatar else "identity"
        return self.avatar[key].reshape(-1)


def save_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves half a checkpoint."""
    path = Path(path)
    tensors: StateDict = {}
    for group in GROUPS:
        state = getattr(ckpt, group)
        for key, value in (state or {}).items():
            tensors[f"{group}.{key}"] = value.detach().to("cpu").contiguous().clone()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(ckpt.config.to_dict()),
        "info": json.dumps(ckpt.info),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_header(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """Config and info without loading tensors (cheap; validates format and version)."""
    metadata = _open(path, lambda f: f.metadata())
    return _parse_metadata(path, metadata)


def load_checkpoint(
    path: str | os.PathLike[str], expect_preset: str | None = None, device: str = "cpu"
) -> Checkpoint:
    """Read a checkpoint; raise a `CheckpointError` subclass saying what is wrong."""

    def read(f: Any) -> tuple[dict[str, str], StateDict]:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    metadata, tensors = _open(path, read, device)
    config, info = _parse_metadata(path, metadata)
    if expect_preset is not None and config.name != expect_preset:
        raise CheckpointPresetError(
            f"{path}: checkpoint is for preset {config.name!r}, expected {expect_preset!r}"
        )
    groups: dict[str, StateDict] = {g: {} for g in GROUPS}
    for key, value in tensors.items():
        group, _, name = key.partition(".")
        if group not in groups:
            raise CheckpointCorruptError(f"{path}: unknown tensor group in key {key!r}")
        groups[group][name] = value
    if not groups["reenactor"]:
        raise CheckpointCorruptError(f"{path}: no reenactor weights")
    return Checkpoint(
        config=config,
        reenactor=groups["reenactor"],
        ema=groups["ema"] or None,
        discriminator=groups["discriminator"] or None,
        avatar=groups["avatar"] or None,
        info=info,
    )


def instantiate(
    cls: Callable[[ModelConfig], M], cfg: ModelConfig, state: StateDict, what: str
) -> M:
    """Build `cls(cfg)` with `state` as its weights, skipping random init (meta device)."""
    with torch.device("meta"):
        module = cls(cfg)
    load_state(module, state, what, assign=True)
    return module


def load_state(module: nn.Module, state: StateDict, what: str, assign: bool = False) -> None:
    """`load_state_dict(strict=True)` with a typed error naming missing/unexpected keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(
        f"{k}: {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    if missing or unexpected or wrong_shape:
        raise CheckpointMismatchError(
            f"{what} does not fit its config: missing={_head(missing)} "
            f"unexpected={_head(unexpected)} wrong_shape={_head(wrong_shape)}"
        )
    # Release checkpoints may store fp16; the module keeps its own dtypes.
    state = {
        k: v.to(own[k].dtype) if v.is_floating_point() and v.dtype != own[k].dtype else v
        for k, v in state.items()
    }
    module.load_state_dict(state, strict=True, assign=assign)


def _head(items: list[str], n: int = 8) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return f"{items[:n]}{more}"


def _open(path: str | os.PathLike[str], read: Any, device: str = "cpu") -> Any:
    if not Path(path).is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return read(f)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointCorruptError(f"{path}: unreadable or truncated checkpoint ({exc})") from exc


def _parse_metadata(
    path: str | os.PathLike[str], metadata: dict[str, str] | None
) -> tuple[ModelConfig, dict[str, Any]]:
    metadata = metadata or {}
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointCorruptError(f"{path}: not a {FORMAT_NAME} file (no format header)")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError as exc:
        raise CheckpointVersionError(f"{path}: bad format_version") from exc
    if version != FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{path}: format version {version}, this code reads version {FORMAT_VERSION}"
        )
    try:
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
        info = json.loads(metadata.get("info", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointCorruptError(f"{path}: bad config header ({exc})") from exc
    return config, info
