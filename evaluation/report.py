"""Write an evaluation's results: metrics.json and a self-contained report.html.

Images and plots are embedded as base64 PNGs, so the report is one file to attach or archive.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evaluation.images import grid, png_bytes
from evaluation.synthetic import Sample

GRID_ROWS = ("avatar (identity frame)", "driver", "ground truth", "output")


def write_metrics(out: Path, metrics: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=False) + "\n")
    return path


def _img(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def sample_grid(samples: Sequence[Sample]) -> bytes:
    """One column per sample; rows avatar, driver, ground truth, output (4x enlarged)."""
    rows = [
        [s.avatar for s in samples],
        [s.driver for s in samples],
        [s.truth for s in samples],
        [s.output for s in samples],
    ]
    scale = max(1, 256 // samples[0].truth.shape[0])
    return png_bytes(grid(rows), scale)


def probe_plot(metrics: dict[str, Any]) -> bytes | None:
    """Bar chart of probe scores next to their references; None where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    leak = metrics["identity_leakage"]
    pose = metrics["pose_descriptor"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    groups = ("ground_truth", "output", "driver_frames")
    width = 0.38
    pairs = (("avatar_corr", "avatar identity"), ("driver_corr", "driver identity"))
    for k, (key, label) in enumerate(pairs):
        values = [leak[g][key] if leak[g] else 0.0 for g in groups]
        ax1.bar([g + (k - 0.5) * width for g in range(3)], values, width, label=label)
    ax1.set_xticks(range(3), ["ground truth", "output", "driver frame"])
    ax1.axhline(0, color="k", lw=0.8)
    ax1.set_ylabel("identity probe correlation")
    ax1.set_title("Identity read from images (Ir / Pr analogue)")
    ax1.legend(fontsize=8)
    ref = pose["reference_pixels"]
    ours = [pose["identity_from_pose"], pose["pose_params_from_pose"]]
    pixels = [ref["identity_from_pixels"], ref["pose_params_from_pixels"]]
    ax2.bar([x - width / 2 for x in range(2)], [p["score"] for p in ours], width,
            label="pose descriptor")  # fmt: skip
    ax2.bar([x + width / 2 for x in range(2)], [p["score"] for p in pixels], width,
            label="pixels (reference)")  # fmt: skip
    ax2.scatter(range(2), [p["chance"] for p in ours], color="k", marker="_", s=900,
                label="chance", zorder=3)  # fmt: skip
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xticks(range(2), ["identity class (accuracy)", "pose parameters (R²)"])
    ax2.set_title("Pose-descriptor probes (held out)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return html.escape(json.dumps(v) if isinstance(v, dict | list) else str(v))

    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{cell(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def write_html(out: Path, metrics: dict[str, Any], samples: Sequence[Sample]) -> Path:
    """report.html: headline numbers, the sample grid and the probe plot, all inline."""
    cross, leak, pose = (
        metrics["cross_person"],
        metrics["identity_leakage"],
        metrics["pose_descriptor"],
    )
    pose_error = cross["pose_error"] or {}
    identity = pose["identity_from_pose"]
    headline = [
        ("checkpoint", metrics["checkpoint"]["path"]),
        ("sha256", metrics["checkpoint"]["sha256"]),
        ("seed", metrics["seed"]),
        (
            "avatars",
            f"{cross['avatars']}, {cross['identities']} identities, {cross['frames']} frames",
        ),
        ("L1 ↓", cross["l1"]["mean"]),
        ("PSNR dB ↑", cross["psnr_db"]["mean"]),
        ("SSIM ↑", cross["ssim"]["mean"]),
        ("pose error ↓ (mesh, / inter-ocular)", pose_error.get("mean", "not measured")),
        ("faces found in outputs", pose_error.get("detected_fraction", "not measured")),
        (
            "identity probe corr., output vs avatar ↑",
            leak["output"]["avatar_corr"] if leak["output"] else "no readable parameter",
        ),
        (
            "identity probe corr., output vs driver ↓ (leakage)",
            leak["output"]["driver_corr"] if leak["output"] else "no readable parameter",
        ),
        (
            "identity from pose descriptor (acc., chance)",
            f"{identity['score']:.3f} ({identity['chance']:.3f})",
        ),
        ("pose params from pose descriptor (R²)", pose["pose_params_from_pose"]["score"]),
    ]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Evaluation report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 8px;"
        "text-align:left}img{max-width:100%;image-rendering:pixelated}</style></head><body>",
        f"<h1>Evaluation: {html.escape(metrics['suite'])} suite</h1>",
        _table(headline),
        "<h2>Cross-person reenactment samples</h2>",
        f"<p>Rows: {html.escape(', '.join(GRID_ROWS))}. One column per avatar/driver pair.</p>",
    ]
    if samples:
        parts.append(_img(sample_grid(samples), "cross-person samples"))
    plot = probe_plot(metrics)
    parts.append("<h2>Probes</h2>")
    parts.append(
        _img(plot, "probe scores") if plot else "<p>matplotlib is not installed: no plot.</p>"
    )
    parts.append("<h2>Not done yet</h2><ul>")
    parts += [f"<li>{html.escape(t)}</li>" for t in metrics["not_done"]]
    parts.append("</ul><h2>All metrics</h2><pre>")
    parts.append(html.escape(json.dumps(metrics, indent=2)))
    parts.append("</pre></body></html>\n")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text("".join(parts), encoding="utf-8")
    return path
