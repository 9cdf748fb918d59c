"""Probes of a representation: ridge regression and classification, nearest-neighbour
retrieval (paper, Table 1) and an MLP landmark regressor (the paper's MAFL experiment).

A probe's score is meaningful only next to its chance level, so every result carries both.
The ridge strength is picked on a split of the training rows, never on the test rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5)


@dataclass(frozen=True)
class ProbeResult:
    """Held-out score of a probe and what guessing would score."""

    metric: str  # "accuracy" or "r2"
    score: float
    chance: float
    train_size: int
    test_size: int
    alpha: float
    per_column: tuple[float, ...] = ()  # regression: R² of each target column

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "score": self.score,
            "chance": self.chance,
            "train_size": self.train_size,
            "test_size": self.test_size,
            "alpha": self.alpha,
            **({"per_column_r2": list(self.per_column)} if self.per_column else {}),
        }


@dataclass(frozen=True)
class Ridge:
    """A fitted ridge map on standardised inputs: predict(x) = ((x - mean) / std) @ w + b."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    alpha: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, alpha: float) -> Ridge:
        """Solve in whichever of the primal or dual form is smaller."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        mean, std = x.mean(0), x.std(0)
        std = np.where(std > 1e-8, std, 1.0)
        z = (x - mean) / std
        bias = y.mean(0)
        yc = y - bias
        n, d = z.shape
        if d <= n:
            weights = np.linalg.solve(z.T @ z + alpha * np.eye(d), z.T @ yc)
        else:
            weights = z.T @ np.linalg.solve(z @ z.T + alpha * np.eye(n), yc)
        return cls(mean, std, weights, bias, alpha)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.std) @ self.weights + self.bias


def standardise(reference: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x in units of the reference's per-column mean and spread (constant columns kept as is)."""
    reference = np.asarray(reference, np.float64)
    std = reference.std(0)
    return (np.asarray(x, np.float64) - reference.mean(0)) / np.where(std > 1e-8, std, 1.0)


def r2_score(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination pooled over output columns (0 = predicting the mean).

    Pooling (1 - total residual / total variance) keeps a nearly constant column, such as a
    rare blink, from dominating; pass standardised targets so columns share one unit.
    """
    truth = np.asarray(truth, np.float64).reshape(len(truth), -1)
    predicted = np.asarray(predicted, np.float64).reshape(len(predicted), -1)
    total = float(((truth - truth.mean(0)) ** 2).sum())
    if total <= 1e-12:
        raise ValueError("the targets do not vary: R² is undefined")
    return 1 - float(((truth - predicted) ** 2).sum()) / total


def mean_correlation(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Pearson correlation of each column with its prediction, averaged over varying columns.

    Invariant to a probe's bias and scale, so a weak but informative probe still reads ~0 on
    unrelated targets and > 0 on related ones.
    """
    truth = np.asarray(truth, np.float64).reshape(len(truth), -1)
    predicted = np.asarray(predicted, np.float64).reshape(len(predicted), -1)
    t, p = truth - truth.mean(0), predicted - predicted.mean(0)
    norm = np.sqrt((t**2).sum(0) * (p**2).sum(0))
    varies = norm > 1e-12
    if not varies.any():
        raise ValueError("no column varies: correlation is undefined")
    return float(np.mean((t * p).sum(0)[varies] / norm[varies]))


def _one_hot(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return (labels[:, None] == classes[None, :]).astype(np.float64)


def fit_regressor(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, groups: np.ndarray | None = None
) -> Ridge:
    """Ridge regression with alpha chosen on a fifth of the rows (or groups), refit on all.

    Pass `groups` (e.g. identity labels) when the probe is tested on unseen groups: choosing
    alpha on rows of seen groups would reward memorising them.
    """
    return _select(x, y, rng, lambda t, p: r2_score(t, p), groups)


def fit_classifier(
    x: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[Ridge, np.ndarray]:
    """One-vs-rest ridge on one-hot targets; returns the map and its class order."""
    classes = np.unique(labels)
    ridge = _select(
        x,
        _one_hot(labels, classes),
        rng,
        lambda t, p: float(np.mean(t.argmax(1) == p.argmax(1))),
    )
    return ridge, classes


def _select(
    x: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    score: Callable[[np.ndarray, np.ndarray], float],
    groups: np.ndarray | None = None,
) -> Ridge:
    keys = np.arange(len(x)) if groups is None else np.asarray(groups)
    unique = rng.permutation(np.unique(keys))
    # at least two validation groups where there are enough: one group's targets may not vary
    held = np.isin(keys, unique[: max(min(2, len(unique) - 1), len(unique) // 5, 1)])
    val, fit = np.flatnonzero(held), np.flatnonzero(~held)
    best = ALPHAS[0]
    if len(fit) >= 2:
        scores = [score(y[val], Ridge.fit(x[fit], y[fit], a).predict(x[val])) for a in ALPHAS]
        best = ALPHAS[int(np.argmax(scores))]
    return Ridge.fit(x, y, best)


def regression_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
) -> ProbeResult:
    """R² of a ridge probe on held-out rows, targets standardised on the training rows.

    Chance is 0: predicting the mean scores 0, and unrelated features score at most about 0.
    """
    y_train, y_test = standardise(y_train, y_train), standardise(y_train, y_test)
    ridge = fit_regressor(x_train, y_train, rng, groups)
    predicted = ridge.predict(x_test).reshape(len(x_test), -1)
    y_test = y_test.reshape(len(y_test), -1)
    score = r2_score(y_test, predicted)
    columns = tuple(
        r2_score(y_test[:, c], predicted[:, c]) if y_test[:, c].std() > 1e-8 else float("nan")
        for c in range(y_test.shape[1])
    )
    return ProbeResult("r2", score, 0.0, len(x_train), len(x_test), ridge.alpha, columns)


def classification_probe(
    x_train: np.ndarray,
    labels_train: np.ndarray,
    x_test: np.ndarray,
    labels_test: np.ndarray,
    rng: np.random.Generator,
) -> ProbeResult:
    """Accuracy of a ridge classifier on held-out rows; chance is the majority-class rate."""
    ridge, classes = fit_classifier(x_train, labels_train, rng)
    predicted = classes[ridge.predict(x_test).argmax(1)]
    accuracy = float(np.mean(predicted == labels_test))
    majority = classes[_one_hot(labels_train, classes).sum(0).argmax()]
    chance = float(np.mean(labels_test == majority))
    return ProbeResult("accuracy", accuracy, chance, len(x_train), len(x_test), ridge.alpha)


# --- retrieval ------------------------------------------------------------------------------------
RETRIEVAL_KS = (10, 20, 50, 100)


@dataclass(frozen=True)
class RetrievalResult:
    """Precision at k of nearest-neighbour retrieval, next to a random ranking's."""

    k: int
    precision: float | None  # None: some query's gallery holds fewer than k items
    chance: float
    queries: int

    def as_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "chance": self.chance, "queries": self.queries}


def retrieval_precision(
    descriptors: np.ndarray,
    labels: np.ndarray,
    people: np.ndarray,
    groups: np.ndarray,
    ks: tuple[int, ...] = RETRIEVAL_KS,
) -> list[RetrievalResult]:
    """Share of a query's k most cosine-similar items that carry its label (paper, Table 1).

    Every item is a query once; its gallery is the items of the same group (the paper's camera
    orientation) that show other people, so a descriptor scores only by what it shares across
    identities. Chance is the label's share of the gallery: a random ranking's precision.
    Ties in similarity are broken by item order, so the result is deterministic.
    """
    x = np.asarray(descriptors, np.float64).reshape(len(descriptors), -1)
    labels, people, groups = (np.asarray(a) for a in (labels, people, groups))
    if not len(x) == len(labels) == len(people) == len(groups):
        raise ValueError("descriptors, labels, people and groups differ in length")
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    hits: dict[int, list[float]] = {k: [] for k in ks}
    chance: list[float] = []
    smallest = len(x)
    for q in range(len(x)):
        gallery = np.flatnonzero((groups == groups[q]) & (people != people[q]))
        if len(gallery) == 0:
            continue
        smallest = min(smallest, len(gallery))
        order = gallery[np.argsort(-(unit[gallery] @ unit[q]), kind="stable")]
        same = labels[order] == labels[q]
        chance.append(float(same.mean()))
        for k in ks:
            hits[k].append(float(same[:k].mean()))
    if not chance:
        raise ValueError("no query has a gallery: every group holds a single person")
    return [
        RetrievalResult(
            k,
            float(np.mean(hits[k])) if k <= smallest else None,
            float(np.mean(chance)),
            len(chance),
        )
        for k in ks
    ]


# --- keypoint regression (the paper's MAFL experiment) -------------------------------------------
KEYPOINT_HIDDEN = 768  # paper, Sec. 4.2: "a ReLU MLP with one hidden layer of size 768"


@dataclass(frozen=True)
class KeypointResult:
    """Held-out landmark error of a regressor, in percent of the inter-ocular distance."""

    error_pct: float  # mean over test images of mean point error / inter-ocular distance
    median_pct: float
    train_size: int
    test_size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "error_pct": self.error_pct,
            "median_pct": self.median_pct,
            "train_size": self.train_size,
            "test_size": self.test_size,
        }


def landmark_errors(
    predicted: np.ndarray, truth: np.ndarray, eye_corners: tuple[int, int] = (36, 45)
) -> np.ndarray:
    """Per image: mean point distance over the truth's inter-ocular distance, (N,)."""
    predicted, truth = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
    if predicted.shape != truth.shape or predicted.ndim != 3 or predicted.shape[2] != 2:
        raise ValueError(f"expected two (N, L, 2) arrays, got {predicted.shape} {truth.shape}")
    eyes = np.linalg.norm(truth[:, eye_corners[0]] - truth[:, eye_corners[1]], axis=1)
    if (eyes <= 0).any():
        raise ValueError("some truth's eye corners coincide: no inter-ocular distance")
    return np.linalg.norm(predicted - truth, axis=2).mean(1) / eyes


def _keypoint_result(predicted: np.ndarray, truth: np.ndarray, train_size: int) -> KeypointResult:
    errors = 100 * landmark_errors(predicted, truth)
    return KeypointResult(float(errors.mean()), float(np.median(errors)), train_size, len(truth))


def mean_shape_keypoints(y_train: np.ndarray, y_test: np.ndarray) -> KeypointResult:
    """The baseline that ignores the input: every test image gets the training mean shape."""
    mean = np.asarray(y_train, np.float64).mean(0)
    return _keypoint_result(np.broadcast_to(mean, np.shape(y_test)), y_test, len(y_train))


def keypoint_mlp_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    seed: int,
    steps: int = 300,
    hidden: int = KEYPOINT_HIDDEN,
) -> KeypointResult:
    """A one-hidden-layer ReLU MLP from features to (L, 2) landmarks, scored on held-out rows.

    Full-batch AdamW on standardised inputs and landmarks; a fixed step count (no test-set
    early stopping). Deterministic for a seed and thread count.
    """
    y_train = np.asarray(y_train, np.float64)
    n, points = len(y_train), y_train.shape[1:]
    x_mean, x_std = np.mean(x_train, 0), np.std(x_train, 0)
    x_std = np.where(x_std > 1e-8, x_std, 1.0)
    flat = y_train.reshape(n, -1)
    y_mean, y_std = flat.mean(0), max(float(flat.std()), 1e-8)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, np.float32))

    xt = tensor((np.asarray(x_train) - x_mean) / x_std)
    yt = tensor((flat - y_mean) / y_std)
    generator = torch.Generator().manual_seed(seed)
    first, second = torch.nn.Linear(xt.shape[1], hidden), torch.nn.Linear(hidden, yt.shape[1])
    with torch.no_grad():  # torch's default init, drawn from our generator for reproducibility
        for layer in (first, second):
            bound = 1 / layer.in_features**0.5
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    net = torch.nn.Sequential(first, torch.nn.ReLU(), second)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(net(xt), yt).backward()
            opt.step()
    with torch.no_grad():
        out = net(tensor((np.asarray(x_test) - x_mean) / x_std)).double().numpy()
    predicted = (out * y_std + y_mean).reshape(len(out), *points)
    return _keypoint_result(predicted, y_test, n)
