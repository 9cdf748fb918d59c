"""Write an evaluation's results: metrics.json and a self-contained report.html.

Images and plots are embedded as base64 PNGs, so the report is one file to attach or archive.
Plots need matplotlib; without it the report says so and keeps the tables and image grids.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.compare import lookup
from evaluation.images import grid, png_bytes
from evaluation.synthetic import Sample

GRID_ROWS = ("avatar (identity frame)", "driver", "ground truth", "output (zero-shot)")
STYLE = (
    "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
    "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 8px;"
    "text-align:left}td.best{font-weight:bold;background:#e8f5e9}"
    "img{max-width:100%;image-rendering:pixelated}</style>"
)


@dataclass
class ModelReport:
    """What the report shows of one scored model besides its metrics: image grids."""

    name: str
    metrics: dict[str, Any]
    samples: Sequence[Sample] = ()  # synthetic cross-person samples
    self_columns: Sequence[Sequence[np.ndarray]] = ()  # real suite: photo, driver, target, outputs
    cross_columns: Sequence[Sequence[np.ndarray]] = ()  # real suite: photo, driver, outputs


def write_metrics(out: Path, metrics: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=False) + "\n")
    return path


# --- html pieces ---------------------------------------------------------------------------------
def _img(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(json.dumps(v) if isinstance(v, dict | list) else str(v))


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_cell(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _grid_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _plot_or_note(data: bytes | None, alt: str) -> str:
    return _img(data, alt) if data else "<p>matplotlib is not installed: no plot.</p>"


def _mean(metrics: dict[str, Any], *path: str) -> float | None:
    return lookup(metrics, (*path, "mean"))


# --- image grids ---------------------------------------------------------------------------------
def sample_grid(samples: Sequence[Sample]) -> bytes:
    """One column per sample; rows avatar, driver, ground truth, outputs (enlarged to ~256 px)."""
    rows = [
        [s.avatar for s in samples],
        [s.driver for s in samples],
        [s.truth for s in samples],
        [s.output for s in samples],
    ]
    if all(s.finetuned is not None for s in samples):
        rows.append([s.finetuned for s in samples if s.finetuned is not None])
    scale = max(1, 256 // samples[0].truth.shape[0])
    return png_bytes(grid(rows), scale)


def columns_grid(columns: Sequence[Sequence[np.ndarray]]) -> bytes:
    """Tiles given column by column (each column one identity) -> one PNG."""
    rows = [[c[r] for c in columns] for r in range(len(columns[0]))]
    scale = max(1, 256 // columns[0][0].shape[0])
    return png_bytes(grid(rows), scale)


# --- plots ---------------------------------------------------------------------------------------
@contextmanager
def _figure(
    width: float, height: float, panels: int = 1
) -> Iterator[tuple[Any, list[Any], list[bytes]]]:
    """A matplotlib figure whose PNG lands in the yielded list when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width, height))
    png: list[bytes] = []
    try:
        yield fig, list(np.atleast_1d(axes)), png
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        png.append(buf.getvalue())
    finally:
        plt.close(fig)


def _plot(draw: Callable[[], bytes | None]) -> bytes | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    return draw()


def probe_plot(metrics: dict[str, Any]) -> bytes | None:
    """Identity leakage (Ir/Pr analogue) and pose-descriptor probes next to their references."""

    def draw() -> bytes:
        leak, pose = metrics["identity_leakage"], metrics["pose_descriptor"]
        with _figure(10, 3.6, 2) as (_, (ax1, ax2), png):
            groups = ["ground_truth", "output", "driver_frames"]
            names = ["ground truth", "output", "driver frame"]
            if leak.get("output_finetuned"):
                groups.insert(2, "output_finetuned")
                names.insert(2, "output (fine-tuned)")
            width = 0.38
            pairs = (("avatar_corr", "avatar identity"), ("driver_corr", "driver identity"))
            for k, (key, label) in enumerate(pairs):
                values = [leak[g][key] if leak.get(g) else 0.0 for g in groups]
                xs = [g + (k - 0.5) * width for g in range(len(groups))]
                ax1.bar(xs, values, width, label=label)
            ax1.set_xticks(range(len(groups)), names, fontsize=8)
            ax1.axhline(0, color="k", lw=0.8)
            ax1.set_ylabel("identity probe correlation")
            ax1.set_title("Identity read from images (Ir / Pr analogue)")
            ax1.legend(fontsize=8)
            ref = pose["reference_pixels"]
            ours = [pose["identity_from_pose"], pose["pose_params_from_pose"]]
            pixels = [ref["identity_from_pixels"], ref["pose_params_from_pixels"]]
            ax2.bar(
                [x - width / 2 for x in range(2)],
                [p["score"] for p in ours],
                width,
                label="pose descriptor",
            )
            ax2.bar(
                [x + width / 2 for x in range(2)],
                [p["score"] for p in pixels],
                width,
                label="pixels (reference)",
            )
            ax2.scatter(
                range(2),
                [p["chance"] for p in ours],
                color="k",
                marker="_",
                s=900,
                label="chance",
                zorder=3,
            )
            ax2.axhline(0, color="k", lw=0.8)
            ax2.set_xticks(range(2), ["identity class (accuracy)", "pose parameters (R²)"])
            ax2.set_title("Pose-descriptor probes (held out)")
            ax2.legend(fontsize=8)
        return png[0]

    return _plot(draw)


def retrieval_plot(series: dict[str, dict[str, Any]]) -> bytes | None:
    """Precision at k per descriptor (Table 1's analogue), with a random ranking's."""

    def draw() -> bytes:
        with _figure(6, 3.8) as (_, (ax,), png):
            chance: list[tuple[int, float]] = []
            for label, table in series.items():
                ks = [int(k) for k, r in table.items() if r["precision"] is not None]
                ax.plot(ks, [table[str(k)]["precision"] for k in ks], "o-", label=label)
                chance = [(int(k), r["chance"]) for k, r in table.items()]
            ax.plot([k for k, _ in chance], [c for _, c in chance], "k--", label="chance")
            ax.set_xscale("log")
            ax.set_xticks([10, 20, 50, 100], ["10", "20", "50", "100"])
            ax.set_xlabel("top-k")
            ax.set_ylabel("same-class precision")
            ax.set_ylim(0, 1)
            ax.set_title("Expression retrieval across identities")
            ax.legend(fontsize=8)
        return png[0]

    return _plot(draw)


def avatar_plot(m: dict[str, Any]) -> bytes | None:
    """Zero-shot vs fine-tuned avatars on the errors both are scored by (lower is better)."""
    names = ("L1", "1 - SSIM", "pose error", "driver identity corr.")

    def values(key: str, part: str) -> list[float]:
        ssim = _mean(m, key, "ssim")
        found = [
            _mean(m, key, "l1"),
            None if ssim is None else 1 - ssim,
            _mean(m, key, "pose_error"),
            lookup(m, ("identity_leakage", part, "driver_corr")),
        ]
        return [v or 0.0 for v in found]

    def draw() -> bytes:
        with _figure(7, 3.4) as (_, (ax,), png):
            width = 0.38
            kinds = (
                ("cross_person", "output", "zero-shot"),
                ("cross_person_finetuned", "output_finetuned", "fine-tuned"),
            )
            for k, (key, part, label) in enumerate(kinds):
                xs = [x + (k - 0.5) * width for x in range(len(names))]
                ax.bar(xs, values(key, part), width, label=label)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xticks(range(len(names)), names, fontsize=8)
            ax.set_title("Zero-shot vs fine-tuned avatars (lower is better)")
            ax.legend(fontsize=8)
        return png[0]

    return _plot(draw)


def keypoint_plot(keypoints: dict[str, Any]) -> bytes | None:
    """Held-out landmark error per regressor input, against the mean-shape baseline."""
    names = ("mean_shape", "identity_only", "pose_only", "pose_and_identity", "pixels")

    def draw() -> bytes:
        with _figure(6, 3.4) as (_, (ax,), png):
            values = [keypoints[n]["error_pct"] for n in names]
            colors = ["0.6", "C1", "C2", "C0", "C7"]
            ax.bar(range(len(names)), values, color=colors)
            ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], fontsize=8)
            ax.set_ylabel("error, % of inter-ocular distance")
            ax.set_title("Keypoint regression (768-hidden MLP, unseen identities)")
        return png[0]

    return _plot(draw)


def ir_pr_plot(
    points: Sequence[tuple[str, float, float]],
    x_label: str,
    y_label: str,
    x_marks: Sequence[tuple[str, float]] = (),
) -> bytes | None:
    """Figure 3's layout: one point per system, lower-left is better; `x_marks` are vertical
    reference lines (e.g. the identity error of real frames of the same and of other people)."""

    def draw() -> bytes:
        with _figure(5.5, 4.2) as (_, (ax,), png):
            for k, (label, x, y) in enumerate(points):
                ax.scatter([x], [y], s=60, color=f"C{k % 10}", label=label)
            for k, (label, x) in enumerate(x_marks):
                ax.axvline(x, color="0.5", ls=("--", ":")[k % 2], lw=1, label=label)
            ax.ticklabel_format(useOffset=False, style="plain")
            ax.set_xlabel(f"{x_label} ↓")
            ax.set_ylabel(f"{y_label} ↓")
            ax.set_title("Identity vs pose (paper, Figure 3)")
            ax.legend(fontsize=8)
        return png[0]

    return _plot(draw)


# --- synthetic suite -----------------------------------------------------------------------------
def _synthetic_headline(m: dict[str, Any]) -> list[tuple[str, Any]]:
    cross, pose = m["cross_person"], m["pose_descriptor"]
    tuned = m.get("cross_person_finetuned")
    identity = pose["identity_from_pose"]
    rows: list[tuple[str, Any]] = [
        ("checkpoint", m["checkpoint"]["path"]),
        ("sha256", m["checkpoint"]["sha256"]),
        ("seed", m["seed"]),
        ("avatars", f"{cross['identities']} identities, {cross['frames']} frames per kind"),
        ("L1 ↓", cross["l1"]["mean"]),
        ("PSNR dB ↑", cross["psnr_db"]["mean"]),
        ("SSIM ↑", cross["ssim"]["mean"]),
        ("LPIPS ↓", _mean(m, "cross_person", "lpips") or "off (no --lpips-weights)"),
        ("pose error ↓ (mesh, / inter-ocular)", _mean(m, "cross_person", "pose_error")),
        ("faces found in outputs", lookup(m, ("cross_person", "pose_error", "detected_fraction"))),
        (
            "identity probe corr., output vs avatar ↑",
            lookup(m, ("identity_leakage", "output", "avatar_corr")),
        ),
        (
            "identity probe corr., output vs driver ↓ (leakage)",
            lookup(m, ("identity_leakage", "output", "driver_corr")),
        ),
    ]
    if tuned:
        rows += [
            ("fine-tuned L1 ↓", tuned["l1"]["mean"]),
            ("fine-tuned SSIM ↑", tuned["ssim"]["mean"]),
            ("fine-tuned pose error ↓", _mean(m, "cross_person_finetuned", "pose_error")),
            (
                "fine-tuned output vs driver ↓",
                lookup(m, ("identity_leakage", "output_finetuned", "driver_corr")),
            ),
        ]
    rows += [
        (
            "identity from pose descriptor (acc., chance)",
            f"{identity['score']:.3f} ({identity['chance']:.3f})",
        ),
        ("pose params from pose descriptor (R²)", pose["pose_params_from_pose"]["score"]),
    ]
    retrieval = m.get("expression_retrieval")
    if retrieval:
        top = retrieval["pose_descriptor"]
        rows += [
            (f"expression retrieval top-{k} ↑", top[str(k)]["precision"]) for k in (10, 20, 50, 100)
        ]
        rows.append(("retrieval chance", top["10"]["chance"]))
    kp = m.get("keypoint_regression")
    if kp:
        rows += [
            ("keypoint error % ↓ (pose + identity)", kp["pose_and_identity"]["error_pct"]),
            ("keypoint error % (mean shape)", kp["mean_shape"]["error_pct"]),
        ]
    return rows


def _synthetic_sections(m: dict[str, Any], samples: Sequence[Sample], level: int = 2) -> list[str]:
    h = f"h{level}"
    parts = [_table(_synthetic_headline(m)), f"<{h}>Cross-person reenactment samples</{h}>"]
    rows = list(GRID_ROWS) + (["output (fine-tuned)"] if m.get("cross_person_finetuned") else [])
    parts.append(f"<p>Rows: {html.escape(', '.join(rows))}. One column per avatar/driver pair.</p>")
    if samples:
        parts.append(_img(sample_grid(samples), "cross-person samples"))
    tuned = m.get("cross_person_finetuned")
    if tuned:
        parts.append(f"<{h}>Zero-shot vs fine-tuned avatars</{h}>")
        header = ["avatars", "L1 ↓", "PSNR ↑", "SSIM ↑", "pose error ↓", "driver corr. ↓"]
        body = [
            [
                kind["avatars"],
                kind["l1"]["mean"],
                kind["psnr_db"]["mean"],
                kind["ssim"]["mean"],
                lookup(kind, ("pose_error", "mean")),
                lookup(m, ("identity_leakage", part, "driver_corr")),
            ]
            for kind, part in ((m["cross_person"], "output"), (tuned, "output_finetuned"))
        ]
        parts.append(_grid_table(header, body))
        parts.append(f"<p>Fine-tuning: {html.escape(json.dumps(tuned['finetune']))}</p>")
        parts.append(_plot_or_note(avatar_plot(m), "zero-shot vs fine-tuned"))
    parts.append(f"<{h}>Probes</{h}>")
    parts.append(_plot_or_note(probe_plot(m), "probe scores"))
    retrieval = m.get("expression_retrieval")
    if retrieval:
        parts.append(f"<{h}>Expression retrieval (Table 1 analogue)</{h}>")
        parts.append(
            f"<p>{retrieval['faces']} faces: {retrieval['identities']} identities x 6 expression "
            f"classes x 3 views. {html.escape(retrieval['gallery'])}.</p>"
        )
        series = {
            "pose descriptor": retrieval["pose_descriptor"],
            "landmarks (renderer, reference)": retrieval["reference_landmarks"],
            "pixels (reference)": retrieval["reference_pixels"],
        }
        body = [
            [
                k,
                *(t[k]["precision"] for t in series.values()),
                retrieval["pose_descriptor"][k]["chance"],
            ]
            for k in retrieval["pose_descriptor"]
        ]
        parts.append(_grid_table(["top-k", *series, "chance"], body))
        parts.append(_plot_or_note(retrieval_plot(series), "retrieval precision"))
    kp = m.get("keypoint_regression")
    if kp:
        parts.append(f"<{h}>Keypoint regression (MAFL analogue)</{h}>")
        names = ("mean_shape", "identity_only", "pose_only", "pose_and_identity", "pixels")
        parts.append(
            _grid_table(
                ["input", "error % ↓", "median %"],
                [[n, kp[n]["error_pct"], kp[n]["median_pct"]] for n in names],
            )
        )
        parts.append(_plot_or_note(keypoint_plot(kp), "keypoint error"))
    return parts


# --- real suite ----------------------------------------------------------------------------------
def _real_rows(m: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for kind in ("zero_shot", "finetuned"):
        if not m.get(kind):
            continue
        rows.append(
            [
                "zero-shot" if kind == "zero_shot" else "fine-tuned",
                _mean(m, kind, "self_reenactment", "l1"),
                _mean(m, kind, "self_reenactment", "psnr_db"),
                _mean(m, kind, "self_reenactment", "ssim"),
                _mean(m, kind, "self_reenactment", "lpips"),
                _mean(m, kind, "self_reenactment", "identity_error"),
                _mean(m, kind, "self_reenactment", "pose_error"),
                _mean(m, kind, "cross_driving", "identity_error"),
                _mean(m, kind, "cross_driving", "pose_error"),
            ]
        )
    return rows


REAL_HEADER = (
    "avatars",
    "self L1 ↓",
    "self PSNR ↑",
    "self SSIM ↑",
    "self LPIPS ↓",
    "self identity err. ↓",
    "Pr: self pose err. ↓",
    "Ir: cross identity err. ↓",
    "cross pose err. ↓",
)


def _real_points(name: str, m: dict[str, Any]) -> list[tuple[str, float, float]]:
    points = []
    for kind in ("zero_shot", "finetuned"):
        x = _mean(m, kind, "cross_driving", "identity_error")
        y = _mean(m, kind, "self_reenactment", "pose_error")
        if x is not None and y is not None:
            label = "zero-shot" if kind == "zero_shot" else "fine-tuned"
            points.append((f"{name} {label}".strip(), x, y))
    return points


def _real_sections(report: ModelReport, level: int = 2) -> list[str]:
    h, m = f"h{level}", report.metrics
    parts = [
        _table([("checkpoint", m["checkpoint"]["path"]), ("sha256", m["checkpoint"]["sha256"])]),
        _grid_table(REAL_HEADER, _real_rows(m)),
    ]
    if report.self_columns:
        parts.append(f"<{h}>Self-reenactment on hold-out frames</{h}>")
        parts.append(
            "<p>Rows: avatar photo, hold-out driver, target (driver on black), "
            "zero-shot output, fine-tuned output (when run).</p>"
        )
        parts.append(_img(columns_grid(report.self_columns), "self-reenactment"))
    if report.cross_columns:
        parts.append(f"<{h}>Cross-driving</{h}>")
        parts.append(
            "<p>Rows: avatar photo, another identity's frame, zero-shot output, "
            "fine-tuned output (when run).</p>"
        )
        parts.append(_img(columns_grid(report.cross_columns), "cross-driving"))
    return parts


# --- pages ---------------------------------------------------------------------------------------
def _page(out: Path, title: str, metrics: dict[str, Any], parts: list[str]) -> Path:
    notes = metrics.get("notes") or []
    body = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        STYLE,
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *parts,
    ]
    if notes:
        body.append("<h2>Notes</h2><ul>")
        body += [f"<li>{html.escape(t)}</li>" for t in notes]
        body.append("</ul>")
    body += ["<h2>All metrics</h2><pre>", html.escape(json.dumps(metrics, indent=2)), "</pre>"]
    body.append("</body></html>\n")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text("".join(body), encoding="utf-8")
    return path


def write_html(out: Path, metrics: dict[str, Any], samples: Sequence[Sample]) -> Path:
    """report.html of one model on the synthetic suite."""
    return _page(out, "Evaluation: synthetic suite", metrics, _synthetic_sections(metrics, samples))


def write_real_html(out: Path, report: ModelReport, metrics: dict[str, Any]) -> Path:
    """report.html of one model on the real-face suite."""
    parts = [_table(_real_data_rows(metrics)), *_real_sections(report)]
    plot = ir_pr_plot(
        _real_points("", report.metrics), "identity error Ir", "pose error Pr", _floors(metrics)
    )
    parts += ["<h2>Identity vs pose</h2>", _plot_or_note(plot, "Ir / Pr")]
    return _page(out, "Evaluation: real-face suite", metrics, parts)


def _floors(metrics: dict[str, Any]) -> list[tuple[str, float]]:
    ref = metrics["reference_identity_errors"]
    marks = [
        ("same person's real frames", _mean(ref, "same_person_holdout")),
        ("other people's real frames", _mean(ref, "other_people_holdout")),
    ]
    return [(label, x) for label, x in marks if x is not None]


def _real_data_rows(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    data, ref = metrics["data"], metrics["reference_identity_errors"]
    return [
        ("data", metrics["data_dir"]),
        ("identities", len(data["identities"])),
        ("skipped", len(data["skipped"])),
        ("identity model", data["identity_model"]),
        (
            "identity error, same person's hold-out frames (floor)",
            _mean(ref, "same_person_holdout"),
        ),
        ("identity error, other people's frames (ceiling)", _mean(ref, "other_people_holdout")),
        ("seed", metrics["seed"]),
    ]


def write_comparison_html(
    out: Path, metrics: dict[str, Any], reports: Sequence[ModelReport]
) -> Path:
    """report.html of several models on one suite: the comparison first, then each model."""
    table = metrics["comparison"]
    models = [row["model"] for row in table["rows"]]
    head = "".join(f"<th>{html.escape(name)}</th>" for name in models)
    body = ""
    for column in table["columns"]:  # one row per metric: a table of many metrics stays narrow
        label = column["label"]
        cells = "".join(
            f"<td class='best'>{_cell(row[label])}</td>"
            if table["best"][label] == row["model"] and len(models) > 1
            else f"<td>{_cell(row[label])}</td>"
            for row in table["rows"]
        )
        mark = "↓" if column["better"] == "lower" else "↑"
        body += f"<tr><th>{html.escape(f'{label} {mark}')}</th>{cells}</tr>"
    parts = [f"<h2>Comparison</h2><table><tr><th>metric</th>{head}</tr>{body}</table>"]
    if metrics["suite"] == "real":
        parts.insert(0, _table(_real_data_rows(metrics)))
        points = [p for r in reports for p in _real_points(r.name, r.metrics)]
        plot = ir_pr_plot(points, "identity error Ir", "pose error Pr", _floors(metrics))
        parts += ["<h2>Identity vs pose</h2>", _plot_or_note(plot, "Ir / Pr")]
    else:
        points = []
        for r in reports:
            for part, key, kind in (
                ("output", "cross_person", "zero-shot"),
                ("output_finetuned", "cross_person_finetuned", "fine-tuned"),
            ):
                x = lookup(r.metrics, ("identity_leakage", part, "driver_corr"))
                y = _mean(r.metrics, key, "pose_error")
                if x is not None and y is not None:
                    points.append((f"{r.name} {kind}", x, y))
        plot = ir_pr_plot(points, "driver identity corr. (leakage)", "pose error")
        parts += ["<h2>Identity leakage vs pose</h2>", _plot_or_note(plot, "leakage / pose")]
        series = {
            r.name: r.metrics["expression_retrieval"]["pose_descriptor"]
            for r in reports
            if r.metrics.get("expression_retrieval")
        }
        if series:
            parts += [
                "<h2>Expression retrieval</h2>",
                _plot_or_note(retrieval_plot(series), "retrieval"),
            ]
    for r in reports:
        parts.append(f"<h2>{html.escape(r.name)}</h2>")
        if metrics["suite"] == "real":
            parts += _real_sections(r, level=3)
        else:
            parts += _synthetic_sections(r.metrics, r.samples, level=3)
    return _page(
        out, f"Evaluation: {metrics['suite']} suite, {len(reports)} models", metrics, parts
    )
