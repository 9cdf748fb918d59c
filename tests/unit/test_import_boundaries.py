"""`model/` stays pure PyTorch: importing it pulls in no service code and prints nothing."""

import subprocess
import sys

import pytest

FORBIDDEN = ("fastapi", "celery", "redis", "tritonclient", "cv2", "service", "workers", "training")


@pytest.mark.parametrize(
    "module",
    ["model", "model.inference", "model.convert_official", "model.summary", "model.checkpoint"],
)
def test_model_imports_nothing_of_the_service(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "module", ["media.video", "media.faces", "media.crop", "media.smoothing", "media.segmentation"]
)
def test_media_does_not_load_torch(module: str) -> None:
    """Workers decode and encode video without paying for torch."""
    code = f"import sys, {module}\nassert 'torch' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "module",
    ["service.main", "service.admin", "service.jobs", "workers.celery_app", "workers.tasks"],
)
def test_service_does_not_load_torch(module: str) -> None:
    """The API, its CLI and a worker's start load no torch: a CPU preprocess worker pays for
    torch only on first use, and tritonclient loads on first use only."""
    code = (
        f"import sys, {module}\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'tritonclient', 'model')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
