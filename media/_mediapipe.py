"""Shared mediapipe plumbing: quiet construction and one lock per graph.

mediapipe prints XNNPACK/absl lines to fd 2 on first use, which no environment variable
silences, and its graphs break if two threads call them at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Point fd 2 at /dev/null for the duration (process-wide, so keep it short)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def check_rgb(image: np.ndarray) -> np.ndarray:
    """mediapipe wants contiguous (H, W, 3) uint8 RGB; say so clearly otherwise."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


class Graph:
    """A mediapipe solution built quietly, warmed up quietly, and called under a lock."""

    def __init__(self, build: Callable[[], Any]):
        self._lock = threading.Lock()
        with quiet_stderr():
            self._solution = build()
            self._solution.process(np.zeros((64, 64, 3), np.uint8))

    def process(self, image: np.ndarray) -> Any:
        image = check_rgb(image)
        with self._lock:
            return self._solution.process(image)

    def close(self) -> None:
        with self._lock:
            self._solution.close()
