"""The demo page's pose-mode helpers (service/static/pose.js) under Node, against the Python
they mirror: float16 bits as numpy rounds them, the crop window of media.geometry, the
REFLECT_101 index of OpenCV, and the One Euro box smoother of media.smoothing.

Skipped, saying so, where Node is not installed (.ci/run's machines have it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from media.geometry import Box, CropTransform
from media.smoothing import BoxSmoother

ROOT = Path(__file__).resolve().parents[2]
POSE_JS = ROOT / "service" / "static" / "pose.js"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

# Reads {"fn": name, "args": [...]} cases from stdin, prints their results as JSON.
RUNNER = """
require(process.argv[1]);
const P = globalThis.LpdPose;
const cases = JSON.parse(require("fs").readFileSync(0, "utf8"));
const fns = {
  halfBits: (bits) => bits.map((b) => {
    const view = new DataView(new ArrayBuffer(4));
    view.setUint32(0, b >>> 0);
    return P.halfBits(view.getFloat32(0));
  }),
  wire: (values) => Array.from(new Uint8Array(P.toFloat16Bytes(Float32Array.from(values)))),
  halfToFloat: (bits) => bits.map((b) => P.halfToFloat(b)),
  cropWindow: (boxes, scale) => boxes.map(
    ([x0, y0, x1, y1]) => P.cropWindow(P.squareBox({x0, y0, x1, y1}, scale))),
  reflect101: (pairs) => pairs.map(([i, n]) => P.reflect101(i, n)),
  smooth: (track) => {
    const smoother = new P.BoxSmoother();
    return track.map(([box, t]) => {
      const out = smoother.update(box && {x0: box[0], y0: box[1], x1: box[2], y1: box[3]}, t);
      return out && [out.x0, out.y0, out.x1, out.y1];
    });
  },
};
console.log(JSON.stringify(cases.map((c) => fns[c.fn](...c.args))));
"""


def run_js(*cases: tuple[str, list[Any]]) -> list[Any]:
    """Each (function, args) case evaluated by pose.js in Node."""
    assert NODE is not None
    payload = json.dumps([{"fn": fn, "args": args} for fn, args in cases])
    done = subprocess.run(
        [NODE, "-e", RUNNER, str(POSE_JS)],
        input=payload,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: list[Any] = json.loads(done.stdout)
    return result


def float32_cases() -> np.ndarray:
    """float32 values where rounding to half is easy to get wrong, and many random ones."""
    rng = np.random.default_rng(0)
    half = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    ties = (half[:-1] + (half[1:] - half[:-1]) / 2).astype(np.float32)  # exact midpoints
    around = np.concatenate([np.nextafter(ties, -np.inf), ties, np.nextafter(ties, np.inf)])
    special = np.array(
        [0.0, 65504.0, 65519.99, 65520.0, 1e5, 2.0**-24, 2.0**-25, 2.0**-26, 3 * 2.0**-26, 1e-30],
        dtype=np.float32,
    )
    wide = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-9, 5, 20000)).astype(np.float32)
    values = np.concatenate([half, around[::7], special, wide]).astype(np.float32)
    return np.concatenate([values, -values, np.array([np.inf, -np.inf], np.float32)])


def test_float16_bits_match_numpy_rounding() -> None:
    values = float32_cases()
    got, decoded = run_js(
        ("halfBits", [values.view(np.uint32).tolist()]),
        ("halfToFloat", [list(range(0, 0x7C00, 97))]),
    )
    with np.errstate(over="ignore"):  # the values past 65504 are meant to become inf
        expected = values.astype(np.float16).view(np.uint16)
    wrong = np.flatnonzero(np.asarray(got, np.uint16) != expected)
    assert not wrong.size, [(float(values[i]), got[i], int(expected[i])) for i in wrong[:5]]
    bits = np.arange(0, 0x7C00, 97, dtype=np.uint16)
    np.testing.assert_array_equal(np.asarray(decoded), bits.view(np.float16).astype(np.float64))


def test_nan_stays_nan() -> None:
    (bits,) = run_js(("halfBits", [[0x7FC00000, 0xFFC00001]]))
    assert all(np.isnan(np.uint16(b).view(np.float16)) for b in bits)


def test_wire_bytes_are_little_endian_float16() -> None:
    pose = np.random.default_rng(1).standard_normal(256).astype(np.float32)
    (wire,) = run_js(("wire", [pose.tolist()]))
    assert len(wire) == 2 * 256
    assert bytes(wire) == pose.astype("<f2").tobytes()


def test_crop_window_matches_media_geometry() -> None:
    rng = np.random.default_rng(2)
    boxes = []
    for _ in range(500):
        x0, y0 = rng.uniform(-50, 600, 2)
        w, h = rng.uniform(1, 300, 2)
        boxes.append([float(x0), float(y0), float(x0 + w), float(y0 + h)])
    # Integer and half-integer centres and sides: where Python's round() (half to even)
    # and JavaScript's Math.round() (half up) differ.
    boxes += [[10.0, 10.0, 20.0, 21.0], [0.0, 0.0, 5.0, 5.0], [-3.5, 2.5, 1.5, 7.5]]
    (windows,) = run_js(("cropWindow", [boxes, 1.8]))
    for box, window in zip(boxes, windows, strict=True):
        t = CropTransform.from_box(Box(*box).square(1.8), 64)
        assert (window["x0"], window["y0"], window["side"]) == (t.x0, t.y0, t.side), box


def test_reflect101_matches_opencv() -> None:
    pairs = [[i, n] for n in (1, 2, 3, 7) for i in range(-20, 21)]
    (got,) = run_js(("reflect101", [pairs]))
    expected = [cv2.borderInterpolate(i, n, cv2.BORDER_REFLECT_101) for i, n in pairs]
    assert got == expected


def test_box_smoother_matches_media_smoothing() -> None:
    rng = np.random.default_rng(3)
    track: list[tuple[list[float] | None, float]] = []
    cx, cy, side = 300.0, 200.0, 120.0
    for i in range(120):
        if i == 60:
            cx += 250.0  # a cut: the filter restarts
        cx, cy = cx + rng.normal(0, 3), cy + rng.normal(0, 3)
        box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2 + rng.normal(0, 2)]
        track.append((None if i % 17 == 5 else box, i / 25.0))
    (got,) = run_js(("smooth", [track]))
    smoother = BoxSmoother()
    for (box, t), js in zip(track, got, strict=True):
        py = smoother.update(None if box is None else Box(*box), t)
        assert py is not None and js is not None
        np.testing.assert_allclose(js, py.as_array(), rtol=0, atol=1e-3)
