"""The demo page in headless Chromium against the `make run` stack (deploy.local.LocalStack):
API key -> photo -> avatar -> uploaded driver -> a playable MP4; a driver recorded from the
webcam -> a WebM with alpha; then live mode over the WebSocket. Chromium's fake webcam plays
samples/driver.mp4.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them) and selenium; it is
skipped, saying what is missing, without them.
"""

from __future__ import annotations

import base64
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import pytest

from deploy.local import LocalStack, LocalStackConfig
from deploy.triton.serve import free_port

ROOT = Path(__file__).resolve().parents[2]
PHOTO = ROOT / "samples" / "photo.jpg"
DRIVER = ROOT / "samples" / "driver.mp4"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TIMEOUT_S = 300.0  # one job on 2 CPU cores, next to other tests
# Root in a container without network: no sandbox, no background connections to Google.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1200",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream",  # grant the camera without asking
    "--use-fake-device-for-media-stream",
)


def missing_browser() -> str | None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        return (
            f"{' and '.join(missing)} not installed "
            "(apt-get install -y chromium chromium-driver; .ci/run does it)"
        )
    return None


MISSING = missing_browser()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


def write_y4m(video: Path, out: Path) -> Path:
    """The video as Y4M, which Chromium's fake camera plays in a loop."""
    with av.open(str(video)) as src, av.open(str(out), "w", format="yuv4mpegpipe") as dst:
        stream = src.streams.video[0]
        y4m = dst.add_stream("rawvideo", rate=round(stream.average_rate or 25))
        y4m.width, y4m.height, y4m.pix_fmt = stream.width, stream.height, "yuv420p"
        for frame in src.decode(stream):
            dst.mux(y4m.encode(frame.reformat(format="yuv420p")))
        dst.mux(y4m.encode(None))
    return out


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    config = LocalStackConfig(
        port=free_port(),
        root=tmp_path / "stack",
        # A port nothing answers on: the stack runs a Redis of its own, not a shared one.
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        settings={"rate_limit_per_minute": 1000},
    )
    with LocalStack(config) as running:
        yield running


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must not download anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    camera = write_y4m(DRIVER, tmp_path / "camera.y4m")
    options.add_argument(f"--use-file-for-fake-video-capture={camera}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, what: str, check: Callable[[], Any], timeout_s: float = TIMEOUT_S) -> Any:
    """Poll `check` until it returns something truthy; fail with the page's error box."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            error = driver.execute_script("return document.getElementById('error').textContent")
            log = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            pytest.fail(
                f"timed out after {timeout_s:g} s waiting for {what}; "
                f"error box: {error!r}; browser errors: {log}"
            )
        time.sleep(0.5)


def job_status(driver: Any, prefix: str, after: str | None = None) -> str | None:
    """`succeeded` once the job (one newer than `after`) has; failed or canceled fail."""
    job = driver.find_element("id", f"{prefix}-job")
    if job.get_attribute("data-job-id") in {None, after}:
        return None
    status = job.get_attribute("data-status")
    if status in {"failed", "canceled"}:
        text = driver.find_element("id", f"{prefix}-status").text
        pytest.fail(f"the {prefix} job {status}: {text}")
    return status if status == "succeeded" else None


PLAYABLE = """
const v = document.getElementById('result-video');
return Boolean(v.currentSrc) && v.readyState >= 3 && v.videoWidth > 0
    ? {src: v.currentSrc, width: v.videoWidth, height: v.videoHeight, duration: v.duration}
    : null;
"""


PLAY = """
const done = arguments[arguments.length - 1];
const v = document.getElementById('result-video');
v.muted = true;
v.play().then(() => done(null), (e) => done(String(e)));
"""


def save_page(driver: Any, path: Path) -> None:
    """A PNG of the whole page, beyond the window."""
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def reenact(driver: Any, expect: bytes) -> dict[str, Any]:
    """Submit the form, wait for a playable result; check both signed download links."""

    def by_id(element_id: str) -> Any:
        return driver.find_element("id", element_id)

    before = by_id("reenact-job").get_attribute("data-job-id")
    by_id("submit-reenactment").click()
    wait_for(driver, "the reenactment job", lambda: job_status(driver, "reenact", before))
    job_id = by_id("reenact-job").get_attribute("data-job-id")
    video: dict[str, Any] = wait_for(
        driver,
        "a playable result video",
        lambda: (v := driver.execute_script(PLAYABLE)) and f"/{job_id}/" in v["src"] and v,
    )
    assert video["width"] > 0 and video["height"] > 0
    assert not by_id("error").is_displayed(), by_id("error").text
    assert driver.execute_async_script(PLAY) is None  # play() resolved
    wait_for(
        driver,
        "the result to play",
        lambda: driver.execute_script(
            "const v = document.getElementById('result-video');"
            "if (v.currentTime > 0.3) { v.pause(); return true; } return false;"
        ),
        60,
    )
    # The stack signs links: the page plays and offers those (no API key needed).
    assert video["src"] == by_id("download-video").get_attribute("href")
    for name, link_id, magic in (
        ("video", "download-video", expect),
        ("mask", "download-mask", b"ftyp"),
    ):
        href = by_id(link_id).get_attribute("href")
        assert f"/v1/files/{job_id}/{name}?" in href and "signature=" in href, href
        with urllib.request.urlopen(href, timeout=30) as r:
            assert r.status == 200
            assert magic in r.read(64)
    return video


def test_demo_page_from_photo_to_playable_video_and_live(
    browser: Any, stack: LocalStack, tmp_path: Path
) -> None:
    from selenium.webdriver.support.select import Select

    driver = browser
    driver.set_script_timeout(30)

    def by_id(element_id: str) -> Any:
        return driver.find_element("id", element_id)

    start = time.monotonic()
    driver.get(f"{stack.url}/")
    wait_for(driver, "the page script", lambda: by_id("api-key").is_displayed(), 30)
    assert driver.execute_script("return document.body.dataset.ready") == "true"

    # 1. the key, checked with GET /v1/me and kept in localStorage
    by_id("api-key").send_keys(stack.api_key)
    by_id("save-key").click()
    wait_for(driver, "the key check", lambda: by_id("key-status").get_attribute("data-ok"), 30)
    assert by_id("key-status").get_attribute("data-ok") == "true", by_id("error").text
    assert driver.execute_script("return localStorage.getItem('lpd.apiKey')") == stack.api_key

    # 2. an avatar from the sample photo, zero-shot
    by_id("photo-input").send_keys(str(PHOTO))
    assert by_id("fine-tune").get_attribute("value") == "none"
    by_id("create-avatar").click()
    wait_for(driver, "the avatar job", lambda: job_status(driver, "avatar"))
    wait_for(
        driver,
        "the ready avatar in the list",
        lambda: by_id("avatar-info").get_attribute("data-status") == "ready",
        30,
    )
    avatar_done = time.monotonic()

    # 4. the sample driver video, default options (mp4 on the generated background)
    by_id("driver-input").send_keys(str(DRIVER))
    video = reenact(driver, b"ftyp")
    assert video["duration"] == pytest.approx(2.0, abs=0.2)  # 50 frames at 25 fps
    save_page(driver, tmp_path / "web-demo-upload.png")
    upload_done = time.monotonic()

    # 4b. a driver recorded from the (fake) webcam with MediaRecorder, as WebM with alpha
    by_id("driver-source-webcam").click()
    by_id("record-start").click()
    wait_for(driver, "the recording", lambda: by_id("record-stop").is_enabled(), 30)
    time.sleep(2.5)
    by_id("record-stop").click()
    wait_for(driver, "the recorded video", lambda: "recorded" in by_id("record-status").text, 30)
    Select(by_id("output")).select_by_value("webm")
    reenact(driver, b"webm")
    record_done = time.monotonic()

    # 6. live: the fake camera's frames over the WebSocket, the avatar drawn on the canvas
    by_id("live-start").click()
    wait_for(
        driver,
        "live frames with images",
        lambda: driver.execute_script(
            "const c = document.getElementById('live-canvas');"
            "const px = c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data;"
            "return Number(document.getElementById('live-frames').textContent) >= 5"
            " && px[3] > 0 && (px[0] + px[1] + px[2]) > 0;"
        ),
        120,
    )
    latency = by_id("live-latency").text
    assert latency.endswith("ms)"), latency
    assert by_id("live-dropped").text.isdigit()
    save_page(driver, tmp_path / "web-demo.png")  # the README's docs/images/web-demo.png
    by_id("live-stop").click()
    wait_for(driver, "the stream to stop", lambda: by_id("live-start").is_enabled(), 30)
    assert not by_id("error").is_displayed(), by_id("error").text

    log = driver.get_log("browser")
    (tmp_path / "browser.log").write_text("\n".join(str(e) for e in log))
    errors = [e for e in log if e["level"] == "SEVERE"]
    assert not errors, errors
    print(
        f"avatar {avatar_done - start:.1f} s, upload reenactment {upload_done - avatar_done:.1f} s,"
        f" webcam reenactment {record_done - upload_done:.1f} s,"
        f" live {time.monotonic() - record_done:.1f} s; screenshots in {tmp_path}"
    )
