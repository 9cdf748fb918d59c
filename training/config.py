"""Training configuration: nested frozen dataclasses, loaded from YAML plus `a.b=v` overrides.

The resolved config is written to the run directory and into every checkpoint's info.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from model.config import ModelConfig
from training.augment import PoseAugmentConfig
from training.data import DataConfig
from training.losses import LossWeights


@dataclass(frozen=True)
class OptimConfig:
    """Official meta-learning Adam: betas (0, 0.999), eps 1e-5, no weight decay."""

    lr_g: float = 5e-5  # identity encoder, pose encoder, generator
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.0, 0.999)
    eps: float = 1e-5
    grad_clip: float | None = None  # max global norm per network; None = off (official)
    # Named deviation (off = official constant rates): from this fraction of `steps` on, both
    # learning rates fall linearly to zero, which calms the GAN for the final weights.
    decay_from: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig
    preset: str = "tiny-64"
    # ModelConfig fields replaced on the preset: the research variants (pose_source,
    # predict_mask, pose_dim; README, "Baselines and ablations"). Empty = the preset as is.
    model: dict[str, Any] = field(default_factory=dict)
    run_dir: str = "runs/metalearn"
    steps: int = 1000
    batch_size: int = 8  # per process
    losses: LossWeights = field(default_factory=LossWeights)
    # Perceptual networks load local weight files; a weight > 0 without a file is an error,
    # so a run without them must say losses.vgg19=0 / losses.vggface=0 explicitly.
    vgg19_weights: str | None = None
    vggface_weights: str | None = None
    perceptual_official_input_range: bool = False  # reproduce the official (x+1)/2 bug
    optim: OptimConfig = field(default_factory=OptimConfig)
    # combined: one forward, then a G step and a D step every iteration (official code);
    # alternating: even iterations update D only, odd iterations G only.
    update: Literal["combined", "alternating"] = "combined"
    ema_decay: float = 0.999
    amp: Literal["off", "fp16", "bf16"] = "off"  # autocast on CUDA
    device: str = "auto"
    num_workers: int = 0
    seed: int = 0
    log_every: int = 10
    image_every: int = 200
    checkpoint_every: int = 500
    # Warm start (named deviation, used by the demo's polish tail): reenactor and EMA weights
    # from this checkpoint, the discriminator too when it has one; optimisers start fresh. A
    # run directory with saved state resumes instead and ignores it.
    init_from: str | None = None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[Any], data: dict[str, Any]) -> Any:
    """Build a (nested) frozen dataclass from plain data, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {unknown}")
    values = {}
    for key, value in data.items():
        kind = _dataclass_in(hints[key])
        if kind is not None and isinstance(value, dict):
            value = from_dict(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return cls(**values)


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        return next((a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a)), None)
    return None


def apply_override(data: dict[str, Any], override: str) -> None:
    """`a.b=v` sets data['a']['b'] = YAML-parsed v (so 1e-4, true, [1, 2] work)."""
    key, sep, raw = override.partition("=")
    if not sep:
        raise ValueError(f"override must look like key=value, got {override!r}")
    *parents, leaf = key.strip().lstrip("-").split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file; `extends: other.yaml` (relative to it) is read first and overlaid.

    Variant recipes (training/configs/ablations/) name only what differs from their base.
    """
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    parent = data.pop("extends", None)
    return _merge(read_yaml(path.parent / parent), data) if parent else data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def model_config(config: TrainConfig, num_labels: int = 1) -> ModelConfig:
    """The preset with `config.model` fields replaced (unknown fields are an error)."""
    base = ModelConfig.preset(config.preset).to_dict()
    return ModelConfig.from_dict({**base, **config.model, "num_labels": num_labels})


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
    for override in overrides:
        apply_override(data, override)
    if "root" not in data.get("data", {}):
        raise ValueError("data.root is required (a clip store made by training.prepare/synthetic)")
    return from_dict(TrainConfig, data)


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(_plain(to_dict(config)), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


__all__ = [
    "DataConfig",
    "LossWeights",
    "OptimConfig",
    "PoseAugmentConfig",
    "TrainConfig",
    "load_config",
    "model_config",
    "read_yaml",
    "save_config",
]
