"""`python -m model.convert_official latent-pose-release.pth OUT`: official checkpoint -> ours.

Maps the official nested state dicts (embedder / generator / discriminator /
running_averages) and legacy spectral-norm tensors (`weight_orig`, `weight_u`, `weight_v`)
onto our modules without changing a value. Optimiser moments are dropped: fine-tuning
rebuilds its optimisers, as the official code does.
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import (
    Checkpoint,
    CheckpointMismatchError,
    StateDict,
    instantiate,
    save_checkpoint,
)
from model.config import ModelConfig
from model.discriminator import Discriminator
from model.reenactor import Reenactor


class ConversionError(Exception):
    """The file is not an official checkpoint we can map losslessly."""


# The release pickles its argparse namespace, which holds pathlib paths.
SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    pathlib.PosixPath,
    pathlib.PurePosixPath,
    pathlib.WindowsPath,
    pathlib.PureWindowsPath,
]
SN_SUFFIXES = {
    "weight_orig": "parametrizations.weight.original",
    "weight_u": "parametrizations.weight.0.u",
    "weight_v": "parametrizations.weight.0.v",
}


def generator_layers(cfg: ModelConfig) -> dict[str, str]:
    """Official generator layer prefix -> ours (its Sequential indices include placeholders)."""
    layers = {"affine_params_projector.0": "mlp.fc1", "affine_params_projector.2": "mlp.fc2"}
    num_blocks = cfg.num_res_blocks + cfg.num_up_blocks
    for i in range(num_blocks):
        up = i >= cfg.num_res_blocks
        conv1, conv2 = (4, 8) if up else (3, 7)
        layers[f"decoder_blocks.{i}.block.{conv1}"] = f"blocks.{i}.conv1"
        layers[f"decoder_blocks.{i}.block.{conv2}"] = f"blocks.{i}.conv2"
        if up:
            layers[f"decoder_blocks.{i}.skip.1"] = f"blocks.{i}.skip"
    # Head: AdaIN at index num_blocks, ReLU, then the conv.
    layers[f"decoder_blocks.{num_blocks + 2}"] = "head"
    return layers


def discriminator_layers(num_blocks: int) -> dict[str, str]:
    layers = {
        "down_block.0": "stem.conv1",
        "down_block.2": "stem.conv2",
        "skip.0": "stem.skip",
        "linear": "linear",
        "embed": "embed",
    }
    for i in range(num_blocks):
        layers[f"blocks.{i}.block.2"] = f"blocks.{i}.conv1"
        layers[f"blocks.{i}.block.5"] = f"blocks.{i}.conv2"
        layers[f"blocks.{i}.skip.0"] = f"blocks.{i}.skip"
    return layers


def rename_layers(state: StateDict, layers: dict[str, str], what: str) -> StateDict:
    """Rename `<layer>.<tensor>` keys through `layers`; unknown keys raise."""
    out: StateDict = {}
    unknown = []
    for key, value in state.items():
        layer, _, tensor = key.rpartition(".")
        if layer not in layers:
            unknown.append(key)
            continue
        out[f"{layers[layer]}.{SN_SUFFIXES.get(tensor, tensor)}"] = value
    if unknown:
        raise ConversionError(f"unknown keys in official {what}: {sorted(unknown)}")
    return out


def convert_embedder(state: StateDict) -> StateDict:
    """`identity_encoder.X` / `pose_encoder.X` -> our `<encoder>.backbone.X`."""
    out: StateDict = {}
    for key, value in state.items():
        encoder, _, rest = key.partition(".")
        if encoder not in ("identity_encoder", "pose_encoder"):
            raise ConversionError(f"unknown key in official embedder: {key!r}")
        out[f"{encoder}.backbone.{rest}"] = value
    return out


def convert_reenactor(embedder: StateDict, generator: StateDict, cfg: ModelConfig) -> StateDict:
    """Official embedder + generator (without identity_embedding) -> Reenactor state dict."""
    generator = dict(generator)
    constant = generator.pop("constant.constant", None)
    gen = rename_layers(generator, generator_layers(cfg), "generator")
    if constant is not None:  # a missing constant is reported by the fit check
        gen["constant"] = constant
    state = convert_embedder(embedder)
    state.update({f"generator.{k}": v for k, v in gen.items()})
    return state


def load_official(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True, allowing only argparse/pathlib globals."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"official checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise ConversionError(
            f"{path}: cannot load safely as an official checkpoint: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a dict at top level, got {type(data).__name__}")
    missing = [k for k in ("embedder", "generator", "discriminator") if k not in data]
    if missing:
        raise ConversionError(f"{path}: missing top-level keys {missing}; has {sorted(data)}")
    return data


def convert(data: dict[str, Any], source: str = "") -> Checkpoint:
    """Official checkpoint dict -> our `Checkpoint` (values untouched)."""
    generator = dict(data["generator"])
    identity = generator.pop("identity_embedding", None)
    finetuned = identity is not None
    d_state: StateDict = dict(data["discriminator"])
    if "embed.weight_orig" not in d_state:
        raise ConversionError("official discriminator has no embed.weight_orig")
    cfg = ModelConfig.preset(
        "official-256",
        num_labels=d_state["embed.weight_orig"].shape[0],
        # Fine-tuning re-creates the embedding with torch's default eps.
        embed_sn_eps=1e-12 if finetuned else 1e-4,
    )
    reenactor = convert_reenactor(data["embedder"], generator, cfg)
    num_d_blocks = len({k.split(".")[1] for k in d_state if k.startswith("blocks.")})
    discriminator = rename_layers(d_state, discriminator_layers(num_d_blocks), "discriminator")

    ema = None
    avatar: StateDict = {}
    if identity is not None:
        avatar["identity"] = identity
    averages = data.get("running_averages")
    if averages:
        ema_generator = dict(averages["generator"])
        ema_identity = ema_generator.pop("identity_embedding", None)
        if ema_identity is not None:
            avatar["ema_identity"] = ema_identity
        ema = convert_reenactor(averages["embedder"], ema_generator, cfg)

    _check_fits(Reenactor, cfg, reenactor, "embedder + generator")
    if ema is not None:
        _check_fits(Reenactor, cfg, ema, "running_averages")
    _check_fits(Discriminator, cfg, discriminator, "discriminator")
    args = data.get("args")
    info = {
        "source": "official latent-pose-reenactment checkpoint",
        "source_file": source,
        "finetuned": finetuned,
        "dropped": sorted(k for k in data if k.startswith("optimizer")),
        "official_args": {k: str(v) for k, v in vars(args).items()} if args is not None else {},
    }
    return Checkpoint(cfg, reenactor, ema, discriminator, avatar or None, info)


def _check_fits(cls: Any, cfg: ModelConfig, state: StateDict, what: str) -> None:
    try:
        instantiate(cls, cfg, state, f"official {what}")
    except CheckpointMismatchError as exc:
        raise ConversionError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("official", type=Path, help="official .pth (e.g. latent-pose-release.pth)")
    parser.add_argument("out", type=Path, help="output .safetensors checkpoint")
    args = parser.parse_args(argv)
    try:
        ckpt = convert(load_official(args.official), source=args.official.name)
        save_checkpoint(args.out, ckpt)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kind = "fine-tuned avatar" if ckpt.info["finetuned"] else "meta-learned"
    print(
        f"wrote {args.out}: {kind}, {ckpt.config.num_labels} discriminator rows, "
        f"EMA {'yes' if ckpt.ema else 'no'}, dropped {ckpt.info['dropped']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
