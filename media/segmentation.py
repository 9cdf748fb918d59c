"""Foreground (person) segmentation with mediapipe selfie segmentation.

The paper used Graphonomy (human parsing; its masks cover hair, face, neck and clothes).
Selfie segmentation is a person/background matte: similar coverage on talking heads, softer
hair edges, and it has no "no person" signal, so an empty frame still gets some foreground.
"""

from __future__ import annotations

import numpy as np

from media._mediapipe import Graph


class ForegroundSegmenter:
    """Thread-safe selfie segmentation: RGB frame -> foreground probability."""

    def __init__(self, model_selection: int = 0):
        import mediapipe as mp

        solution = mp.solutions.selfie_segmentation.SelfieSegmentation
        self._graph = Graph(lambda: solution(model_selection=model_selection))

    def segment(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) float32 in [0, 1]."""
        mask = self._graph.process(image).segmentation_mask
        return np.clip(np.asarray(mask, dtype=np.float32), 0, 1)

    def close(self) -> None:
        self._graph.close()
