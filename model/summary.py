"""`python -m model.summary --preset NAME`: per-module parameter counts and FLOPs as JSON.

Networks are built on the meta device, so even official-256 costs no memory or init time;
FLOPs count convolutions and matmuls at batch 1 (1 multiply-add = 2 FLOPs).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model.config import PRESETS, ModelConfig
from model.discriminator import Discriminator
from model.reenactor import Reenactor


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def summarize(cfg: ModelConfig) -> dict[str, Any]:
    """Parameter counts and per-frame FLOPs of every network of `cfg`."""
    with torch.device("meta"):
        net = Reenactor(cfg).eval()
        disc = Discriminator(cfg).eval()
        frame = torch.empty(1, 3, cfg.image_size, cfg.image_size)
        identity = torch.empty(1, cfg.identity_dim)
        pose = torch.empty(1, cfg.pose_dim)
        label = torch.zeros(1, dtype=torch.long)
    g = net.generator
    params = {
        "identity_encoder": count_params(net.identity_encoder),
        "pose_encoder": count_params(net.pose_encoder),
        "adain_mlp": count_params(g.mlp),
        "generator": count_params(g),  # includes the AdaIN MLP, as the official module does
        "generator_without_mlp": count_params(g) - count_params(g.mlp),
        "discriminator": count_params(disc),
        "discriminator_without_embed": count_params(disc) - count_params(disc.embed),
    }
    flops = {
        "identity_encoder": _flops(lambda: net.identity_encoder(frame[None])),
        "pose_encoder": _flops(lambda: net.pose_encoder(frame)),
        "adain_mlp": _flops(lambda: g.mlp(identity, pose)),
        "generator": _flops(lambda: g(identity, pose)),
        "discriminator": _flops(lambda: disc(frame, label)),
    }
    flops["inference_per_frame"] = flops["pose_encoder"] + flops["generator"]
    return {
        "preset": cfg.name,
        "config": cfg.to_dict(),
        "adain_params": sum(2 * n.channels for n in g.adain_layers()),
        "params": params,
        "gflops_per_frame": {k: round(v / 1e9, 4) for k, v in flops.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="official-256")
    parser.add_argument("--num-labels", type=int, default=None, help="discriminator rows")
    args = parser.parse_args(argv)
    overrides = {} if args.num_labels is None else {"num_labels": args.num_labels}
    print(json.dumps(summarize(ModelConfig.preset(args.preset, **overrides)), indent=2))


if __name__ == "__main__":
    main()
