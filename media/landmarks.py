"""Dense facial landmarks (mediapipe face mesh, 468 points) for metrics and baselines."""

from __future__ import annotations

import numpy as np

from media._mediapipe import Graph

OUTER_EYE_CORNERS = (33, 263)  # image-left and image-right outer corners: the pose-error scale


class FaceLandmarker:
    """Thread-safe face mesh; `static=True` treats every image independently (no tracking)."""

    def __init__(self, max_faces: int = 1, static: bool = True, min_confidence: float = 0.5):
        import mediapipe as mp

        solution = mp.solutions.face_mesh.FaceMesh
        self._graph = Graph(
            lambda: solution(
                static_image_mode=static,
                max_num_faces=max_faces,
                min_detection_confidence=min_confidence,
            )
        )

    def landmarks(self, image: np.ndarray) -> list[np.ndarray]:
        """(468, 2) float32 pixel coordinates per face found (possibly none)."""
        h, w = image.shape[:2]
        result = self._graph.process(image)
        return [
            np.array([(p.x * w, p.y * h) for p in face.landmark], dtype=np.float32)
            for face in result.multi_face_landmarks or []
        ]

    def close(self) -> None:
        self._graph.close()


def interocular_distance(points: np.ndarray) -> float:
    """Distance between the outer eye corners of a (468, 2) landmark set."""
    a, b = OUTER_EYE_CORNERS
    return float(np.linalg.norm(points[a] - points[b]))
