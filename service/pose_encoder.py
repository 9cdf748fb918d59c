"""The pose encoder that pose-only stream clients run themselves (the paper's pose encoder,
Section 3.1): which one the server's generator expects, and its ONNX files.

The version is the first 16 hex digits of the base checkpoint's SHA-256: the generator on
Triton and the encoder a client downloaded match when their versions do. The files are
exported once per version into `<pose_encoder_dir>/<version>/{fp32,fp16}.onnx` by
`python -m deploy.triton.onnx_export --pose-encoder` in a subprocess (torch stays out of
the API process), under a file lock, into a temporary folder that is then renamed: API
processes sharing the directory export once, and nobody sees a partial file.

    python -m service.pose_encoder     # export now for LPD_BASE_CHECKPOINT (e.g. at deploy)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Final, Literal

from service.config import Settings, get_settings

logger = logging.getLogger(__name__)

PROJECT_ROOT: Final = Path(__file__).resolve().parents[1]  # where `deploy` imports from
VERSION_CHARS: Final = 16
Precision = Literal["fp32", "fp16"]
PRECISIONS: Final[tuple[Precision, ...]] = ("fp32", "fp16")
_CHUNK: Final = 1 << 20


class PoseEncoderUnavailable(Exception):
    """The base checkpoint cannot be read or its pose encoder not exported (logged)."""


@dataclass(frozen=True)
class PoseEncoderInfo:
    """What a client must agree on with the server's generator."""

    version: str  # first 16 hex digits of the checkpoint's SHA-256
    image_size: int  # S: FRAMES are (N, 3, S, S)
    pose_dim: int  # D: POSE is (N, D); 2 * D bytes of float16 on the wire


def checkpoint_info(checkpoint: Path) -> PoseEncoderInfo:
    """The checkpoint's version and sizes; hashed once per (path, size, mtime)."""
    try:
        stat = checkpoint.stat()
    except OSError as exc:
        raise PoseEncoderUnavailable(f"cannot read {checkpoint}: {exc}") from None
    return _info(str(checkpoint.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _info(path: str, size: int, mtime_ns: int) -> PoseEncoderInfo:
    from safetensors import SafetensorError, safe_open  # numpy framework: no torch

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        with safe_open(path, framework="numpy") as st:
            metadata = st.metadata() or {}
        config = json.loads(metadata["config"])
        image_size, pose_dim = int(config["image_size"]), int(config["pose_dim"])
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise PoseEncoderUnavailable(f"{path} is not a readable checkpoint: {exc}") from None
    return PoseEncoderInfo(digest.hexdigest()[:VERSION_CHARS], image_size, pose_dim)


def encoder_dir(settings: Settings) -> Path:
    """`pose_encoder_dir`, or `<artifacts_dir>/pose-encoder` when unset."""
    return settings.pose_encoder_dir or settings.artifacts_dir / "pose-encoder"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`: across processes, and across threads (each opens its
    own file description)."""
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class PoseEncoderFiles:
    """The ONNX files of one base checkpoint's pose encoder, exported on first use."""

    def __init__(self, checkpoint: Path, root: Path, timeout_s: float = 600.0) -> None:
        self.checkpoint = checkpoint
        self.root = root
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: Settings) -> PoseEncoderFiles:
        return cls(
            settings.base_checkpoint, encoder_dir(settings), settings.pose_encoder_export_timeout_s
        )

    def info(self) -> PoseEncoderInfo:
        return checkpoint_info(self.checkpoint)

    def path(self, precision: Precision) -> Path:
        """The file of `precision`, exporting both first if they are missing (blocking: call
        it from a worker thread)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        version = self.info().version
        folder = self.root / version
        target = folder / f"{precision}.onnx"
        if target.is_file():
            return target
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / f".{version}.lock"):
            if not target.is_file():  # another process or thread may have exported meanwhile
                self._export(folder)
        return target

    def _export(self, folder: Path) -> None:
        tmp = self.root / f".{folder.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        command = [
            sys.executable,
            "-m",
            "deploy.triton.onnx_export",
            str(self.checkpoint.resolve()),
            str(tmp),
            "--pose-encoder",
        ]
        logger.info("exporting the pose encoder of %s to %s", self.checkpoint, folder)
        try:
            done = subprocess.run(
                command,
                cwd=PROJECT_ROOT,
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                check=False,
            )
            missing = [p for p in PRECISIONS if not (tmp / f"{p}.onnx").is_file()]
            if done.returncode != 0 or missing:
                logger.error(
                    "pose encoder export failed (exit %s): %s", done.returncode, done.stderr[-4000:]
                )
                raise PoseEncoderUnavailable("the pose encoder could not be exported")
            shutil.rmtree(folder, ignore_errors=True)  # an incomplete one, e.g. a file deleted
            os.replace(tmp, folder)
        except subprocess.TimeoutExpired:
            logger.error("pose encoder export took over %g s", self.timeout_s)
            raise PoseEncoderUnavailable("the pose encoder export timed out") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    """Export for the environment's settings; print the version and the files."""
    files = PoseEncoderFiles.from_settings(get_settings())
    for precision in PRECISIONS:
        path = files.path(precision)
        print(f"{files.info().version} {precision}: {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
