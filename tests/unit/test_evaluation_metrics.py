"""Evaluation metrics and probes on cases whose answer is known exactly."""

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from evaluation.metrics import PSNR_CAP_DB, l1, normalised_landmark_error, psnr, ssim
from evaluation.probes import classification_probe, r2_score, regression_probe


def _images(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_identical_images_score_perfectly() -> None:
    a = _images(0)
    assert l1(a, a).tolist() == [0.0, 0.0]
    assert psnr(a, a).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def test_image_metrics_on_a_constant_offset() -> None:
    a = torch.full((1, 3, 16, 16), 0.25)
    b = a + 0.1
    assert l1(a, b).item() == pytest.approx(0.1)
    assert psnr(a, b).item() == pytest.approx(20.0)  # mse 0.01 -> 10 log10(1 / 0.01)
    assert ssim(a, b).item() < 1.0


def test_ssim_matches_scikit_image() -> None:
    a, b = _images(1, 1), _images(2, 1)
    b = 0.7 * a + 0.3 * b  # correlated, so SSIM is far from 0 and 1
    ours = ssim(a, b).item()
    reference = structural_similarity(
        a[0].permute(1, 2, 0).numpy().astype(np.float64),
        b[0].permute(1, 2, 0).numpy().astype(np.float64),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=2,
    )
    assert ours == pytest.approx(reference, abs=1e-6)


def test_shifted_landmarks_give_their_exact_normalised_error() -> None:
    truth = np.random.default_rng(0).uniform(0, 64, (68, 2))
    truth[36], truth[45] = (10.0, 20.0), (50.0, 20.0)  # inter-ocular distance 40
    shifted = truth + np.array([3.0, 4.0])  # every point moves by 5
    assert normalised_landmark_error(shifted, truth) == pytest.approx(5 / 40)
    assert normalised_landmark_error(truth, truth) == 0.0


def test_landmark_error_rejects_degenerate_eyes() -> None:
    truth = np.zeros((68, 2))
    with pytest.raises(ValueError, match="inter-ocular"):
        normalised_landmark_error(truth, truth)


def test_classification_probe_on_random_features_is_at_chance() -> None:
    rng = np.random.default_rng(0)
    classes, n = 10, 2000
    x, labels = rng.normal(size=(n, 32)), np.tile(np.arange(classes), n // classes)
    result = classification_probe(x[:1000], labels[:1000], x[1000:], labels[1000:], rng)
    assert result.chance == pytest.approx(1 / classes)
    assert abs(result.score - result.chance) < 0.04


def test_regression_probe_on_random_features_is_at_chance() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(1000, 32)), rng.normal(size=(1000, 3))
    result = regression_probe(x[:500], y[:500], x[500:], y[500:], rng)
    assert result.chance == 0.0
    assert -0.1 < result.score < 0.02


def test_probes_read_what_is_linearly_there() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 16))
    y = x[:, :2] @ np.array([[1.0, -2.0], [0.5, 1.0]])
    labels = x[:, :4].argmax(1)  # linearly separable classes
    assert regression_probe(x[:200], y[:200], x[200:], y[200:], rng).score > 0.99
    assert classification_probe(x[:200], labels[:200], x[200:], labels[200:], rng).score > 0.8


def test_r2_of_the_mean_is_zero() -> None:
    y = np.random.default_rng(3).normal(size=(50, 4))
    assert r2_score(y, np.broadcast_to(y.mean(0), y.shape)) == pytest.approx(0.0, abs=1e-12)
    assert r2_score(y, y) == 1.0
