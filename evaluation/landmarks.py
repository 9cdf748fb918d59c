"""Pose error of a rendered face: mediapipe face mesh on the output vs on the ground truth.

The renderer's own iBUG-68 points follow a different convention from any estimator's, so
comparing an estimate with them would mostly measure the estimator's bias on cartoon heads.
Running the same estimator on the ground-truth render and on the output cancels that bias.
"""

from __future__ import annotations

import cv2
import numpy as np

from evaluation.metrics import normalised_landmark_error
from media.landmarks import OUTER_EYE_CORNERS, FaceLandmarker

MIN_ESTIMATOR_SIZE = 256  # the face mesh is trained on larger faces; small renders are upscaled


class PoseError:
    """Normalised mesh distance between two images of a face, or None where either has none."""

    def __init__(self) -> None:
        self._landmarker = FaceLandmarker(max_faces=1, static=True)

    def mesh(self, image: np.ndarray) -> np.ndarray | None:
        """(468, 2) points in the input's pixel units, or None if no face was found."""
        size = image.shape[0]
        scale = max(1, -(-MIN_ESTIMATOR_SIZE // size))
        big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        faces = self._landmarker.landmarks(big)
        return faces[0] / scale if faces else None

    def __call__(self, output: np.ndarray, truth_mesh: np.ndarray | None) -> float | None:
        """Error of `output` (H, W, 3) uint8 against a ground-truth mesh from `mesh`."""
        if truth_mesh is None:
            return None
        found = self.mesh(output)
        if found is None:
            return None
        return normalised_landmark_error(found, truth_mesh, OUTER_EYE_CORNERS)

    def close(self) -> None:
        self._landmarker.close()
