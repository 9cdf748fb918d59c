"""Face recognition for the identity error (paper, Sec. 4.3): descriptors and 68 landmarks.

dlib's ResNet face descriptor (128-d) and shape predictors ship as files in the
`face-recognition-models` package; they are loaded by path, offline. An ArcFace ONNX model (the
paper's choice) is used instead when its path is given. Crops come from our face cropper, whose
box is the detector's face box scaled by 1.8 about its centre, so the face box inside a crop is
known: using it instead of re-detecting treats reference photos and (possibly blurry) model
outputs alike, and a shape predictor aligns the face within it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from media.faces import FaceConfig

WORK_SIZE = 256  # crops are enlarged to this before landmarking: dlib's models expect >= 80 px
FACE_BOX = 1 / FaceConfig().box_scale  # side of the face box in crop units
DLIB_FILES = {
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "landmarks5": "shape_predictor_5_face_landmarks.dat",
    "landmarks68": "shape_predictor_68_face_landmarks.dat",
}
# ArcFace's 112 x 112 alignment template: image-left eye, image-right eye, nose tip, mouth
# corners (image-left, image-right), as insightface's recognition models were trained with.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
     [70.7299, 92.2041]], np.float32,
)  # fmt: skip


class RecognitionError(RuntimeError):
    """A face recognition model that cannot be found or loaded."""


class FaceEmbedder(Protocol):
    """Unit-length identity descriptors of face crops."""

    name: str

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(S, S, 3) uint8 RGB crops -> (N, D) float64 unit rows."""
        ...


def dlib_models_dir() -> Path:
    """The `face_recognition_models` package's models folder, found without importing it
    (its __init__ needs pkg_resources, which current setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RecognitionError(
            "dlib's models are missing: pip install face-recognition-models (requirements.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _enlarge(crop: np.ndarray) -> np.ndarray:
    if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
        raise ValueError(f"expected an (S, S, 3) uint8 crop, got {crop.dtype} {crop.shape}")
    return np.ascontiguousarray(
        cv2.resize(crop, (WORK_SIZE, WORK_SIZE), interpolation=cv2.INTER_CUBIC)
    )


class DlibFaces:
    """dlib's face descriptor and landmarks on crops, from the package's model files."""

    name = "dlib_resnet_v1"

    def __init__(self, models: Path | None = None) -> None:
        import dlib

        self._dlib = dlib
        self._dir = models or dlib_models_dir()
        for key in ("recognition", "landmarks5"):
            if not (self._dir / DLIB_FILES[key]).is_file():
                raise RecognitionError(f"{self._dir / DLIB_FILES[key]} not found")
        self._recognizer = dlib.face_recognition_model_v1(
            str(self._dir / DLIB_FILES["recognition"])
        )
        self._five = dlib.shape_predictor(str(self._dir / DLIB_FILES["landmarks5"]))
        self._sixty_eight: object | None = None  # 100 MB: loaded on first use
        half = FACE_BOX * WORK_SIZE / 2
        lo, hi = round(WORK_SIZE / 2 - half), round(WORK_SIZE / 2 + half)
        self._box = dlib.rectangle(lo, lo, hi, hi)

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 128) unit descriptors (dlib's own are about unit length already)."""
        rows = []
        for crop in crops:
            big = _enlarge(crop)
            shape = self._five(big, self._box)
            rows.append(np.asarray(self._recognizer.compute_face_descriptor(big, shape)))
        return _unit(np.stack(rows))

    def landmarks(self, crop: np.ndarray) -> np.ndarray:
        """(68, 2) float32 iBUG-68 points in the crop's pixels."""
        if self._sixty_eight is None:
            path = self._dir / DLIB_FILES["landmarks68"]
            if not path.is_file():
                raise RecognitionError(f"{path} not found")
            self._sixty_eight = self._dlib.shape_predictor(str(path))
        shape = self._sixty_eight(_enlarge(crop), self._box)  # type: ignore[operator]
        points = np.array([(p.x, p.y) for p in shape.parts()], np.float32)
        return points * (crop.shape[0] / WORK_SIZE)


class ArcFace:
    """An ArcFace ONNX model (112 x 112 RGB, (x - 127.5) / 127.5), aligned on 5 landmarks."""

    name = "arcface"

    def __init__(self, path: Path, faces: DlibFaces) -> None:
        import onnxruntime as ort

        if not path.is_file():
            raise RecognitionError(f"ArcFace model not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # reproducible reductions, like the rest of the suite
        try:
            self._session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise RecognitionError(f"cannot load ArcFace model {path}: {exc}") from exc
        entry = self._session.get_inputs()[0]
        self._input = entry.name
        self._channels_first = len(entry.shape) == 4 and entry.shape[1] == 3
        self._faces = faces

    def align(self, crop: np.ndarray) -> np.ndarray:
        """The crop warped onto ArcFace's template: (112, 112, 3) uint8."""
        p = self._faces.landmarks(crop)
        src = np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
        matrix, _ = cv2.estimateAffinePartial2D(src, ARCFACE_TEMPLATE, method=cv2.LMEDS)
        if matrix is None:
            raise RecognitionError("no similarity transform onto the ArcFace template")
        return cv2.warpAffine(crop, matrix, (112, 112), borderMode=cv2.BORDER_REPLICATE)

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        batch = np.stack([self.align(c) for c in crops]).astype(np.float32)
        batch = (batch - 127.5) / 127.5
        if self._channels_first:
            batch = batch.transpose(0, 3, 1, 2)
        rows = [self._session.run(None, {self._input: batch[i : i + 1]})[0][0]
                for i in range(len(batch))]  # fmt: skip
        return _unit(np.stack(rows).reshape(len(rows), -1))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def identity_errors(descriptors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """1 - cosine similarity of each descriptor row with a reference descriptor (paper's Ir)."""
    ref = np.asarray(reference, np.float64).reshape(-1)
    ref = ref / max(float(np.linalg.norm(ref)), 1e-12)
    return 1 - _unit(descriptors) @ ref
