"""Draw docs/images/media_pipeline.png: detection box -> official crop -> mask -> uses.

Run from the repo root: `python -m scripts.media_pipeline_figure [OUT.png]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
from skimage import data

from media.crop import composite, crop_face, paste_back
from media.faces import FaceDetector
from media.landmarks import FaceLandmarker
from media.segmentation import ForegroundSegmenter

PANEL = 256


def label(image: np.ndarray, text: str) -> np.ndarray:
    out = cv2.resize(image, (PANEL, PANEL), interpolation=cv2.INTER_AREA).copy()
    cv2.rectangle(out, (0, 0), (PANEL, 22), (0, 0, 0), -1)
    cv2.putText(out, text, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out_path = Path(args[0] if args else "docs/images/media_pipeline.png")
    photo = data.astronaut()
    detector = FaceDetector()
    face = detector.select(detector.detect(photo))
    box = face.box.square(detector.config.box_scale)
    annotated = photo.copy()
    for b, colour in ((face.box, (255, 255, 0)), (box, (0, 255, 0))):
        p0, p1 = (round(b.x0), round(b.y0)), (round(b.x1), round(b.y1))
        cv2.rectangle(annotated, p0, p1, colour, 3)
    corner = crop_face(photo, box.__class__(-120, -120, 300, 300), PANEL).image
    crop = crop_face(photo, box, PANEL)
    mask = ForegroundSegmenter().segment(crop.image)
    mesh = crop.image.copy()
    for x, y in FaceLandmarker().landmarks(crop.image)[0]:
        cv2.circle(mesh, (round(x), round(y)), 1, (255, 0, 0), -1)
    premultiplied = crop.image.astype(np.float32) / 255 * mask[..., None]
    green = composite(premultiplied, mask, (40, 200, 80))
    recoloured = (premultiplied * np.array([1.0, 0.8, 0.8], np.float32)).clip(0, 1)
    pasted = paste_back(photo, recoloured, mask, crop.transform)
    panels = [
        label(annotated, "face (yellow), crop x1.8 (green)"),
        label(crop.image, "official crop 256"),
        label(corner, "off-frame: reflect, blur, fade"),
        label((mask * 255).astype(np.uint8)[..., None].repeat(3, 2), "selfie segmentation"),
        label(mesh, "face mesh (468)"),
        label(green, "background replaced"),
        label(pasted, "paste-back into the frame"),
    ]
    grid = np.concatenate(panels, axis=1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(
        str(out_path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9]
    )
    print(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
