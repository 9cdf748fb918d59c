"""Linear probes: closed-form ridge regression and one-vs-rest ridge classification.

A probe's score is meaningful only next to its chance level, so every result carries both.
The ridge strength is picked on a split of the training rows, never on the test rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

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
    held = np.isin(keys, unique[: max(1, len(unique) // 5)])
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
