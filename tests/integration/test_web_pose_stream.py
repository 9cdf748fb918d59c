"""The demo page's pose-only live mode in headless Chromium against the `make run` stack
(deploy.local.LocalStack: tritonserver, a Celery worker, Redis, SQLite, the API): the page
downloads the pose encoder contract and ONNX, runs the encoder with onnxruntime-web (wasm)
on crops of Chromium's fake camera (samples/driver.mp4 as Y4M), sends 2 x D float16 bytes a
frame over `WS /v1/avatars/{id}/stream?mode=pose` and draws the rendered JPEGs.

Also checked through the page's debug hook (`window.lpdPoseDebug`): its descriptor of a
known crop against onnxruntime-python on the same ONNX bytes and against torch, its float16
wire bytes against numpy's rounding, and its face box and crop against media.faces/crop.

With POSE_BROWSER_BENCH_OUT=path the browser's encoder timings are written there as JSON
(benchmarks/results/pose_stream_browser.json); they are printed either way, never asserted.
Needs Chromium, ChromeDriver, selenium (as tests/integration/test_web_demo.py) and the
vendored libraries of `make web`; skipped, saying which is missing, without them.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import statistics
import subprocess
import time
import urllib.request
from email.message import Message
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from deploy.local import LocalStack
from media.crop import crop_face
from media.faces import FaceConfig, FaceDetector, shared_detector
from media.geometry import Box
from service.main import VENDOR_DIR
from tests.integration.test_web_demo import (  # the same stack, browser and fake camera
    CHROMIUM,
    MISSING,
    PHOTO,
    browser,
    save_page,
    stack,
    wait_for,
)

__all__ = ["browser", "stack"]  # fixtures, used by name

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "checkpoints" / "demo-tiny-64.safetensors"
BENCH_ENV = "POSE_BROWSER_BENCH_OUT"
TIMING_ROUNDS, TIMING_RUNS = 5, 20
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
    pytest.mark.skipif(
        not (VENDOR_DIR / "manifest.json").is_file(),
        reason="the page's browser libraries are not built (make web)",
    ),
]

# mediapipe (tasks-vision) prints its own INFO line to console.error: not a page error.
BENIGN_SEVERE = ("Created TensorFlow Lite XNNPACK delegate",)

CANVAS_DRAWN = """
const c = document.getElementById('live-canvas');
const px = c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data;
return Number(document.getElementById('live-frames').textContent) >= arguments[0]
    && px[3] > 0 && (px[0] + px[1] + px[2]) > 0;
"""


def call_hook(driver: Any, method: str, *args: Any) -> Any:
    """`await window.lpdPoseDebug[method](...args)` in the page; a page error fails the test."""
    result = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const [method, args] = [arguments[0], arguments[1]];
        window.lpdPoseDebug[method](...args).then(
            (value) => done({value}), (error) => done({error: String(error)}));
        """,
        method,
        list(args),
    )
    assert "error" not in result, f"{method}: {result['error']}"
    return result["value"]


def get(stack: LocalStack, path: str) -> tuple[bytes, Message]:
    """GET `path` with the stack's key: the body and the (case-insensitive) headers."""
    request = urllib.request.Request(
        stack.url + path, headers={"Authorization": f"Bearer {stack.api_key}"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return response.read(), response.headers


def onnx_pose(model: bytes, crop: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    frames = np.ascontiguousarray(crop.transpose(2, 0, 1)[None])  # (1, 3, S, S) uint8
    out: np.ndarray = session.run(["POSE"], {"FRAMES": frames})[0][0]
    return out


def torch_pose(crop: np.ndarray) -> np.ndarray:
    import torch

    from model.inference import InferenceModel

    model = InferenceModel.from_checkpoint(DEMO)
    frames = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)[None]))
    out: np.ndarray = model.encode_pose(frames).cpu().numpy()[0]
    return out


def iou(a: Box, b: Box) -> float:
    w = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    h = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    return w * h / (a.area + b.area - w * h)


def data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def severe_errors(driver: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and not any(b in e["message"] for b in BENIGN_SEVERE)
    ]


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median_ms": round(statistics.median(ordered), 2),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 2),
        "min_ms": round(ordered[0], 2),
    }


def open_page(driver: Any, stack: LocalStack) -> None:
    """The page with the stack's key, and a ready avatar made from the sample photo."""

    def by_id(element_id: str) -> Any:
        return driver.find_element("id", element_id)

    driver.get(f"{stack.url}/")
    wait_for(driver, "the page script", lambda: by_id("api-key").is_displayed(), 30)
    by_id("api-key").send_keys(stack.api_key)
    by_id("save-key").click()
    wait_for(driver, "the key check", lambda: by_id("key-status").get_attribute("data-ok"), 30)
    assert by_id("key-status").get_attribute("data-ok") == "true", by_id("error").text
    by_id("photo-input").send_keys(str(PHOTO))
    by_id("create-avatar").click()
    wait_for(
        driver,
        "a ready avatar",
        lambda: by_id("avatar-info").get_attribute("data-status") == "ready",
    )


def check_descriptors(driver: Any, stack: LocalStack, contract: dict[str, Any]) -> None:
    """The page's encoder and wire bytes on a known crop, and its face box and crop."""
    size, dim = contract["image_size"], contract["pose_dim"]

    # A crop made by the server's own code (full-range detector, media.crop).
    photo = np.asarray(Image.open(PHOTO).convert("RGB"))
    crop = crop_face(photo, shared_detector().crop_box(photo), size).image
    reference = torch_pose(crop)
    for precision, to_onnx, to_torch in (("fp32", 1e-4, 1e-3), ("fp16", 2e-2, 3e-2)):
        model, headers = get(stack, contract["files"][precision])
        assert headers["X-Model-Version"] == contract["version"]
        got = call_hook(driver, "encodeCrop", crop.reshape(-1).tolist(), precision)
        pose = np.asarray(got["pose"], np.float32)
        assert pose.shape == (dim,)
        # The wire: exactly numpy's little-endian float16 of the page's float32 descriptor.
        assert len(got["wire"]) == 2 * dim == contract["wire"]["bytes_per_frame"]
        assert bytes(got["wire"]) == pose.astype("<f2").tobytes()
        onnx_error = float(np.abs(pose - onnx_pose(model, crop)).max())
        torch_error = float(np.abs(pose - reference).max())
        print(
            f"{precision}: max |browser - onnxruntime| {onnx_error:.2e}, - torch {torch_error:.2e}"
        )
        assert onnx_error < to_onnx, precision
        assert torch_error < to_torch * float(np.abs(reference).max()), precision

    # The page's detector (short range, the same model as mediapipe's model_selection=0) and
    # its crop, against the Python detector and media.crop on the page's own box.
    found = call_hook(driver, "detectAndCrop", data_url(PHOTO))
    assert found["crop"] is not None, "the page found no face in the sample photo"
    face = found["faces"][0]
    page_box = Box(face["x0"], face["y0"], face["x1"], face["y1"])
    short = FaceDetector(FaceConfig(model_selection=0)).detect(photo)[0].box
    full = shared_detector().detect(photo)[0].box
    assert np.abs(page_box.as_array() - short.as_array()).max() <= 2.0, (page_box, short)
    overlap = iou(page_box, full)
    print(f"page box {page_box}, server (full range) box {full}, IoU {overlap:.2f}")
    assert overlap > 0.6
    expected = crop_face(photo, page_box.square(contract["crop"]["scale"]), size)
    window = found["window"]
    assert (window["x0"], window["y0"], window["side"]) == (
        expected.transform.x0,
        expected.transform.y0,
        expected.transform.side,
    )
    page_crop = np.asarray(found["crop"], np.uint8).reshape(size, size, 3)
    diff = np.abs(page_crop.astype(np.int16) - expected.image.astype(np.int16))
    print(f"page crop vs media.crop: mean |diff| {diff.mean():.2f} levels")
    assert diff.mean() < 6.0  # resampling differs (canvas vs OpenCV INTER_AREA), not the box


def test_pose_mode_in_the_browser(browser: Any, stack: LocalStack, tmp_path: Path) -> None:
    from selenium.webdriver.support.select import Select

    driver = browser
    driver.set_script_timeout(120)

    def by_id(element_id: str) -> Any:
        return driver.find_element("id", element_id)

    begin = time.monotonic()
    open_page(driver, stack)
    body, _ = get(stack, "/v1/models/pose-encoder")
    contract = json.loads(body)
    dim = contract["pose_dim"]
    ready = time.monotonic()
    check_descriptors(driver, stack, contract)
    checked = time.monotonic()

    Select(by_id("live-mode")).select_by_value("pose")
    assert by_id("pose-options").is_displayed()
    assert by_id("pose-precision").get_attribute("value") == "fp32"  # the faster on wasm
    assert not by_id("live-paste-back").is_enabled()  # no frame to paste into
    start = time.monotonic()
    by_id("live-start").click()
    wait_for(driver, "rendered frames", lambda: driver.execute_script(CANVAS_DRAWN, 15), 180)
    streaming_s = time.monotonic() - start
    stats = driver.execute_script("return window.lpdPoseDebug.stats()")
    assert stats["bytes"] == 2 * dim == 512
    assert by_id("live-bytes").text == f"{2 * dim} B/frame"
    assert stats["encoderMs"] and all(ms > 0 for ms in stats["encoderMs"])
    assert stats["renderMs"] and by_id("live-render").text.endswith(" ms")
    assert by_id("live-latency").text.endswith("ms)")
    assert by_id("live-dropped").text.isdigit()
    assert contract["version"] in by_id("pose-info").text
    assert not by_id("error").is_displayed(), by_id("error").text
    save_page(driver, tmp_path / "web-pose.png")
    by_id("live-stop").click()
    wait_for(driver, "the stream to stop", lambda: by_id("live-start").is_enabled(), 30)

    # A server whose encoder changed (simulated by a stale cached version): the socket
    # closes with 4412, the page says so, forgets its encoder and the next start (with the
    # fp16 file this time) downloads the contract again and streams.
    driver.execute_script("window.lpdPoseDebug.staleVersion('0123456789abcdef')")
    by_id("live-start").click()
    wait_for(driver, "the 4412 close", lambda: "(4412)" in by_id("live-status").text, 60)
    assert "pose encoder changed" in by_id("error").text, by_id("error").text
    Select(by_id("pose-precision")).select_by_value("fp16")
    by_id("live-start").click()
    wait_for(driver, "frames after the reload", lambda: driver.execute_script(CANVAS_DRAWN, 5), 120)
    assert f"{contract['version']}, fp16" in by_id("pose-info").text
    assert driver.execute_script("return window.lpdPoseDebug.stats().bytes") == 2 * dim
    by_id("live-stop").click()
    wait_for(driver, "the stream to stop", lambda: by_id("live-start").is_enabled(), 30)

    # The fallback crop without the detector: a fixed guide box the user puts their face in.
    Select(by_id("pose-crop")).select_by_value("guide")
    by_id("live-start").click()
    wait_for(driver, "guide-box frames", lambda: driver.execute_script(CANVAS_DRAWN, 5), 120)
    assert "guide box" in by_id("live-status").text, by_id("live-status").text
    by_id("live-stop").click()
    wait_for(driver, "the stream to stop", lambda: by_id("live-start").is_enabled(), 30)

    # The browser's encoder time on this machine's CPU, per precision (recorded, not asserted),
    # in alternating rounds so that load from other processes hits both alike.
    timings: dict[str, list[float]] = {"fp32": [], "fp16": []}
    for _ in range(TIMING_ROUNDS):
        for precision, samples in timings.items():
            samples += call_hook(driver, "timeEncoder", precision, TIMING_RUNS)
    errors = severe_errors(driver)
    assert not errors, errors
    record = {
        "benchmark": "pose_stream_browser",
        "what": "the demo page's pose mode in headless Chromium: pose encoder time per frame "
        "(onnxruntime-web, wasm, 1 thread, batch 1, one crop), after warm-up; and the parts "
        "of a live fp32 stream from the fake camera",
        "browser": chromium_version(),
        "onnxruntime_web": json.loads((VENDOR_DIR / "manifest.json").read_text())["versions"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, shared with the stack "
        "and whatever else runs; min_ms is the least disturbed estimate",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "checkpoint": DEMO.name,
        "image_size": contract["image_size"],
        "pose_dim": dim,
        "bytes_per_frame": stats["bytes"],
        "encoder": {p: summary(t) for p, t in timings.items()},
        "stream_fp32": {
            "frames": len(stats["encoderMs"]),
            "encoder": summary(stats["encoderMs"]),
            "face_detector": summary(stats["detectMs"]),
            "crop": summary(stats["cropMs"]),
            "server_latency": summary(stats["latencyMs"]),
            "server_render": summary(stats["renderMs"]),
            "seconds_to_15_frames": round(streaming_s, 1),
        },
    }
    print(json.dumps(record, indent=2))
    print(
        f"avatar {ready - begin:.1f} s, descriptor checks {checked - ready:.1f} s, "
        f"streams and timings {time.monotonic() - checked:.1f} s; screenshot in {tmp_path}"
    )
    if out := os.environ.get(BENCH_ENV):
        Path(out).write_text(json.dumps(record, indent=2) + "\n")


def chromium_version() -> str:
    done = subprocess.run([str(CHROMIUM), "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"
