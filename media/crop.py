"""Face crop as the official recipe makes it, and its inverse: paste-back and backgrounds.

Official recipe: square box x1.8 about the detection centre; parts outside the frame are
filled by REFLECT_101 padding, blurred (sigma = 0.016 x side) and faded to the frame's
median colour; then resized (cubic when enlarging, area when shrinking).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from media.geometry import Box, CropTransform

BLUR_SIGMA = 0.016  # x crop side (official)
FADE_WIDTH = 0.1  # x crop side: distance over which the padding fades to the median colour


@dataclass
class Crop:
    image: np.ndarray  # (size, size, 3) uint8 RGB
    transform: CropTransform


def crop_face(frame: np.ndarray, box: Box, size: int) -> Crop:
    """Cut the square `box` out of `frame` (H, W, 3) uint8 and resize it to `size`."""
    t = CropTransform.from_box(box, size)
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = t.x0, t.y0, t.x0 + t.side, t.y0 + t.side
    left, top = max(0, -x0), max(0, -y0)
    right, bottom = max(0, x1 - w), max(0, y1 - h)
    if left + right >= t.side or top + bottom >= t.side:
        raise ValueError(f"crop box {box} lies outside the {w}x{h} frame")
    window = frame[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
    padded = left or top or right or bottom
    if padded:
        window = cv2.copyMakeBorder(window, top, bottom, left, right, cv2.BORDER_REFLECT_101)
    interp = cv2.INTER_CUBIC if t.side < size else cv2.INTER_AREA
    image = cv2.resize(window, (size, size), interpolation=interp)
    if padded:
        image = _soften_padding(image, frame, (left, top, right, bottom), t)
    return Crop(image=image, transform=t)


def _soften_padding(
    image: np.ndarray, frame: np.ndarray, pads: tuple[int, int, int, int], t: CropTransform
) -> np.ndarray:
    """Blur the reflected border and fade it to the median colour, at output resolution."""
    size = t.size
    left, top, right, bottom = (p / t.scale for p in pads)
    coords = np.arange(size, dtype=np.float32) + 0.5
    dx = np.maximum(np.maximum(left - coords, coords - (size - right)), 0)
    dy = np.maximum(np.maximum(top - coords, coords - (size - bottom)), 0)
    dist = np.maximum(dx[None, :], dy[:, None])  # pixels outside the frame, 0 inside
    fade = np.clip(dist / (FADE_WIDTH * size), 0, 1)[..., None]
    blurred = cv2.GaussianBlur(image, (0, 0), sigmaX=BLUR_SIGMA * size)
    median = np.median(frame.reshape(-1, 3), axis=0)
    soft = (1 - fade) * blurred + fade * median
    outside = (dist > 0)[..., None]
    return np.where(outside, soft, image).round().astype(np.uint8)


def feather_mask(size: int, width: float) -> np.ndarray:
    """(size, size) float32 ramp from 0 at the crop border to 1 `width` pixels inside."""
    ramp = np.clip((np.arange(size, dtype=np.float32) + 0.5) / max(width, 1e-6), 0, 1)
    edge = np.minimum(ramp, ramp[::-1])
    return np.minimum(edge[None, :], edge[:, None])


def warp_to_frame(
    rgb: np.ndarray,
    mask: np.ndarray,
    transform: CropTransform,
    frame_size: tuple[int, int],
    feather: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """A generated crop moved into frame coordinates (inverse of `crop_face`): a premultiplied
    colour layer (H, W, 3) float in [0, 1] and its alpha (H, W) float in [0, 1].

    rgb: (S, S, 3) premultiplied by mask (the generator's black background), float in [0, 1]
    or uint8; mask: (S, S) float in [0, 1]. The crop border is feathered over
    `feather` x S pixels so no seam shows. `frame_size` is (width, height).
    """
    size = transform.size
    if rgb.shape[:2] != (size, size) or mask.shape != (size, size):
        raise ValueError(f"rgb/mask must be {size}x{size}, got {rgb.shape} / {mask.shape}")
    rgb_f = rgb.astype(np.float32) / (255.0 if rgb.dtype == np.uint8 else 1.0)
    edge = feather_mask(size, feather * size)
    # Scaling a premultiplied colour by the feather keeps it premultiplied by alpha.
    layer = np.dstack([rgb_f * edge[..., None], mask.astype(np.float32) * edge])
    warped = cv2.warpAffine(
        layer,
        transform.crop_to_frame_matrix(),
        frame_size,
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0, 0),
    )
    return warped[..., :3], np.clip(warped[..., 3], 0.0, 1.0)


def paste_back(
    frame: np.ndarray,
    rgb: np.ndarray,
    mask: np.ndarray,
    transform: CropTransform,
    feather: float = 0.05,
) -> np.ndarray:
    """Put a generated crop back into the full frame; returns a new (H, W, 3) uint8 frame.

    Arguments as for `warp_to_frame`.
    """
    h, w = frame.shape[:2]
    colour, alpha = warp_to_frame(rgb, mask, transform, (w, h), feather)
    out = colour * 255 + (1 - alpha[..., None]) * frame.astype(np.float32)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def unpremultiply(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight RGBA (H, W, 4) uint8 from a premultiplied colour (H, W, 3) and alpha (H, W)
    in [0, 1], for formats that store alpha separately (WebM VP9)."""
    a = alpha.astype(np.float32)[..., None]
    straight = np.where(a > 1e-3, colour.astype(np.float32) / np.maximum(a, 1e-3), 0.0)
    rgba = np.concatenate([np.clip(straight, 0, 1), a], axis=-1) * 255
    return np.clip(rgba, 0, 255).round().astype(np.uint8)


def composite(
    rgb: np.ndarray, mask: np.ndarray, background: tuple[int, int, int] | np.ndarray
) -> np.ndarray:
    """Replace the background: rgb (premultiplied) + (1 - mask) x background, as uint8.

    `background` is an RGB colour or an image of any size (resized to fit).
    """
    h, w = mask.shape
    rgb_f = rgb.astype(np.float32) / (255.0 if rgb.dtype == np.uint8 else 1.0)
    if isinstance(background, np.ndarray):
        bg = cv2.resize(background, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    else:
        bg = np.broadcast_to(np.asarray(background, dtype=np.float32), (h, w, 3))
    out = rgb_f * 255 + (1 - mask.astype(np.float32)[..., None]) * bg
    return np.clip(out, 0, 255).round().astype(np.uint8)
