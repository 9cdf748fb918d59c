"""`python -m model.release IN OUT [--dtype float16]`: a small inference-only checkpoint.

Keeps the EMA reenactor (what inference loads) and any avatar identity; drops the raw
weights and the discriminator, which only training needs. fp16 storage halves the size;
loading casts back to the modules' float32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def slim(ckpt: Checkpoint, dtype: torch.dtype = torch.float16) -> Checkpoint:
    """Inference weights only, floating tensors cast to `dtype`."""

    def cast(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    weights = ckpt.weights("ema")
    info = {**ckpt.info, "release": {"dtype": str(dtype).removeprefix("torch."), "weights": "ema"}}
    avatar = {k: v.float() for k, v in ckpt.avatar.items()} if ckpt.avatar else None
    return Checkpoint(ckpt.config, reenactor=cast(weights), avatar=avatar, info=info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    args = parser.parse_args(argv)
    try:
        path = save_checkpoint(args.out, slim(load_checkpoint(args.src), DTYPES[args.dtype]))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
