"""Face detection, official crop, segmentation and landmarks on real photos."""

import numpy as np
import pytest
from skimage import data

from media.crop import crop_face
from media.errors import MultipleFacesError, NoFaceError
from media.faces import FaceConfig, FaceDetector
from media.geometry import Box
from media.landmarks import FaceLandmarker, interocular_distance
from media.segmentation import ForegroundSegmenter
from tests.media_samples import astronaut


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def two_faces() -> np.ndarray:
    """Two real faces side by side: the astronaut and her mirror image."""
    photo = astronaut()
    return np.ascontiguousarray(np.concatenate([photo, photo[:, ::-1]], axis=1))


def test_astronaut_has_exactly_one_face(detector: FaceDetector) -> None:
    faces = detector.detect(astronaut())
    assert len(faces) == 1
    face = faces[0]
    assert face.score > 0.8
    cx, cy = face.box.center
    assert 180 < cx < 260 and 80 < cy < 150  # her face, upper middle of the photo
    assert 70 < face.box.width < 130
    box = detector.crop_box(astronaut())
    assert box.width == pytest.approx(1.8 * max(face.box.width, face.box.height))


def test_face_policies(detector: FaceDetector) -> None:
    image = two_faces()
    faces = detector.detect(image)
    assert len(faces) == 2
    assert detector.select(faces) is faces[0]
    with pytest.raises(MultipleFacesError):
        FaceDetector(FaceConfig(policy="single")).select(faces)
    right = FaceDetector(FaceConfig(policy="index", index=1)).select(faces)
    assert right.box.center[0] > 512
    with pytest.raises(NoFaceError, match="index 2"):
        FaceDetector(FaceConfig(policy="index", index=2)).select(faces)


def test_no_face(detector: FaceDetector) -> None:
    assert detector.detect(data.coffee()) == []
    with pytest.raises(NoFaceError):
        detector.crop_box(data.coffee())


def test_bad_image_type(detector: FaceDetector) -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector.detect(astronaut().astype(np.float32))


def test_official_crop_recipe(detector: FaceDetector) -> None:
    photo = astronaut()
    crop = crop_face(photo, detector.crop_box(photo), 256)
    assert crop.image.shape == (256, 256, 3) and crop.image.dtype == np.uint8
    # The face is centred in the crop: the detector finds it again in the middle.
    again = detector.detect(crop.image)
    assert len(again) == 1
    cx, cy = again[0].box.center
    assert abs(cx - 128) < 20 and abs(cy - 128) < 25


def test_border_padding_fades_to_the_median_colour() -> None:
    photo = astronaut()
    # 3/4 of this window lies outside the photo; the photo fills crop pixels [64:, 64:].
    crop = crop_face(photo, Box(-200, -200, 200, 200), 128).image
    median = np.median(photo.reshape(-1, 3), axis=0)
    corner = crop[:8, :8].reshape(-1, 3).astype(float)
    assert np.abs(corner - median).max() < 2  # far outside: the median colour
    inside = crop_face(photo, Box(0, 0, 200, 200), 64).image  # same pixels, same scale
    assert np.abs(crop[68:, 68:].astype(int) - inside[4:, 4:]).mean() < 3
    # Just outside the edge the reflection is blurred and fading, never a hard copy.
    assert np.abs(crop[60:64, 68:].astype(int) - inside[:4, 4:][::-1]).mean() > 1


def test_segmentation_covers_the_person() -> None:
    mask = ForegroundSegmenter().segment(astronaut())
    assert mask.shape == (512, 512) and mask.dtype == np.float32
    assert mask.min() >= 0 and mask.max() <= 1
    assert mask[110, 220] > 0.5  # her face
    assert 0.3 < (mask > 0.5).mean() < 0.8


def test_face_mesh_landmarks() -> None:
    (points,) = FaceLandmarker().landmarks(astronaut())
    assert points.shape == (468, 2)
    assert 45 < interocular_distance(points) < 80  # about 61 px on this photo
    assert FaceLandmarker().landmarks(data.coffee()) == []
