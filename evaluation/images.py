"""Image plumbing shared by the evaluations: premultiplied tensors, grids and PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def premultiplied(image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """uint8 image (S, S, 3) and mask (S, S) -> (3, S, S) float image x mask in [0, 1].

    The model renders on black (rgb x mask), so ground truth is compared the same way.
    """
    rgb = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    return rgb * torch.from_numpy(mask).float()[None] / 255


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] or uint8 -> (H, W, 3) uint8."""
    if image.dtype != torch.uint8:
        image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.permute(1, 2, 0).cpu().numpy()


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Equal-sized (H, W, 3) uint8 tiles in rows -> one image, white gaps between tiles."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = tile
    return out


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """(H, W, 3) uint8 -> PNG, optionally enlarged by pixel repetition (small renders)."""
    pil = Image.fromarray(image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
