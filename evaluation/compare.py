"""Side-by-side numbers for several checkpoints scored by the same suite, seed and data.

Each row of the table is one model, each column one headline metric picked out of that model's
metrics by a key path; the direction says which way is better, so the report can mark the best.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Better = Literal["lower", "higher"]


@dataclass(frozen=True)
class Column:
    """One headline metric: its label and where it sits in a model's metrics."""

    label: str
    path: tuple[str, ...]
    better: Better


SYNTHETIC_COLUMNS = (
    Column("L1", ("cross_person", "l1", "mean"), "lower"),
    Column("PSNR dB", ("cross_person", "psnr_db", "mean"), "higher"),
    Column("SSIM", ("cross_person", "ssim", "mean"), "higher"),
    Column("LPIPS", ("cross_person", "lpips", "mean"), "lower"),
    Column("pose error", ("cross_person", "pose_error", "mean"), "lower"),
    Column("avatar identity corr.", ("identity_leakage", "output", "avatar_corr"), "higher"),
    Column("driver identity corr.", ("identity_leakage", "output", "driver_corr"), "lower"),
    Column("fine-tuned L1", ("cross_person_finetuned", "l1", "mean"), "lower"),
    Column("fine-tuned pose error", ("cross_person_finetuned", "pose_error", "mean"), "lower"),
    Column(
        "fine-tuned driver corr.", ("identity_leakage", "output_finetuned", "driver_corr"), "lower"
    ),
    Column(
        "identity from pose (acc.)", ("pose_descriptor", "identity_from_pose", "score"), "lower"
    ),
    Column("pose from pose (R²)", ("pose_descriptor", "pose_params_from_pose", "score"), "higher"),
    *(
        Column(
            f"retrieval top-{k}",
            ("expression_retrieval", "pose_descriptor", str(k), "precision"),
            "higher",
        )
        for k in (10, 20, 50, 100)
    ),
    Column("keypoint error %", ("keypoint_regression", "pose_and_identity", "error_pct"), "lower"),
)

_REAL: tuple[tuple[str, tuple[str, ...], Better], ...] = (
    ("self L1", ("self_reenactment", "l1", "mean"), "lower"),
    ("self PSNR dB", ("self_reenactment", "psnr_db", "mean"), "higher"),
    ("self SSIM", ("self_reenactment", "ssim", "mean"), "higher"),
    ("self LPIPS", ("self_reenactment", "lpips", "mean"), "lower"),
    ("self identity error", ("self_reenactment", "identity_error", "mean"), "lower"),
    ("Pr (self pose error)", ("self_reenactment", "pose_error", "mean"), "lower"),
    ("Ir (cross identity error)", ("cross_driving", "identity_error", "mean"), "lower"),
    ("cross pose error", ("cross_driving", "pose_error", "mean"), "lower"),
)
REAL_COLUMNS = tuple(
    Column(f"{prefix}{label}", (kind, *path), better)
    for kind, prefix in (("zero_shot", ""), ("finetuned", "fine-tuned "))
    for label, path, better in _REAL
)


def lookup(metrics: dict[str, Any], path: tuple[str, ...]) -> float | None:
    """The number at `path`, or None where a part is missing or off."""
    value: Any = metrics
    for key in path:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def comparison(suite: str, models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The comparison table for metrics.json: columns, one row per model, and the best of each.

    Columns no model measured (LPIPS without weights, fine-tuning when off) are left out.
    """
    columns = SYNTHETIC_COLUMNS if suite == "synthetic" else REAL_COLUMNS
    kept = [c for c in columns if any(lookup(m, c.path) is not None for m in models.values())]
    rows = [
        {"model": name, **{c.label: lookup(m, c.path) for c in kept}} for name, m in models.items()
    ]
    best: dict[str, str | None] = {}
    for c in kept:
        scored = [(v, name) for name, m in models.items() if (v := lookup(m, c.path)) is not None]
        pick = min if c.better == "lower" else max
        best[c.label] = pick(scored)[1] if scored else None
    return {
        "columns": [{"label": c.label, "path": list(c.path), "better": c.better} for c in kept],
        "rows": rows,
        "best": best,
    }
