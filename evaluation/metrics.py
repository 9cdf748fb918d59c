"""Image and landmark metrics for reenactment: L1, PSNR, SSIM, normalised landmark error,
and the summaries both suites report them with.

Images are (N, C, H, W) tensors in [0, 1]; every image metric returns one float64 value per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # identical images: a finite "perfect" value keeps metrics.json valid JSON
IBUG68_OUTER_EYE_CORNERS = (36, 45)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(
            f"expected two (N, C, H, W) tensors, got {tuple(a.shape)} {tuple(b.shape)}"
        )
    return a.double(), b.double()


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per image."""
    a, b = _check_pair(a, b)
    return (a - b).abs().mean(dim=(1, 2, 3))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB for a peak of 1, capped at PSNR_CAP_DB."""
    a, b = _check_pair(a, b)
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
    floor = 10 ** (-PSNR_CAP_DB / 10)
    return 10 * torch.log10(1 / mse.clamp_min(floor))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised (size, size) Gaussian, the window of Wang et al. (2004)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (mean over channels and valid window positions).

    Wang et al. (2004) with a Gaussian window, K1 = 0.01, K2 = 0.03 and data range 1; equal to
    scikit-image's `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`.
    """
    a, b = _check_pair(a, b)
    if min(a.shape[-2:]) < window:
        raise ValueError(f"images must be at least {window} px, got {tuple(a.shape[-2:])}")
    channels = a.shape[1]
    w = gaussian_window(window, sigma).to(a.device)[None, None].repeat(channels, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    )
    return s.mean(dim=(1, 2, 3))


def normalised_landmark_error(
    predicted: np.ndarray,
    truth: np.ndarray,
    eye_corners: tuple[int, int] = IBUG68_OUTER_EYE_CORNERS,
) -> float:
    """Mean point-to-point distance over the truth's inter-ocular distance (outer corners).

    Dividing by the eye distance makes the error independent of image and face size.
    """
    predicted, truth = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
    if predicted.shape != truth.shape or predicted.ndim != 2 or predicted.shape[1] != 2:
        raise ValueError(f"expected two (L, 2) arrays, got {predicted.shape} {truth.shape}")
    interocular = float(np.linalg.norm(truth[eye_corners[0]] - truth[eye_corners[1]]))
    if not math.isfinite(interocular) or interocular <= 0:
        raise ValueError("the truth's eye corners coincide: no inter-ocular distance")
    return float(np.linalg.norm(predicted - truth, axis=1).mean() / interocular)


def summary(values: Sequence[float]) -> dict[str, float] | None:
    """Mean, std and median of per-frame values; None when nothing was measured."""
    if not values:
        return None
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}


def detection_summary(values: Sequence[float | None]) -> dict[str, Any]:
    """`summary` of the values an estimator measured (None: it found no face), and their share."""
    found = [v for v in values if v is not None]
    return {**(summary(found) or {}), "detected_fraction": len(found) / max(1, len(values))}
