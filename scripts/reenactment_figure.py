"""docs/images/reenactment.png: a real reenactment for the README. The sample driver (top
row, its face crops) drives the person of the sample photo (bottom row), rendered by
`reenact local` with a checkpoint (default: the 64 px demo model trained on this CPU).

    python -m scripts.reenactment_figure [--checkpoint CKPT] [--out PNG]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cli.main import DEMO_CHECKPOINT
from cli.offline import reenact_offline
from media.crop import crop_face
from media.faces import shared_detector
from media.video import read_frames

ROOT = Path(__file__).resolve().parents[1]
TILE = 128


def _tile(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray(rgb).resize((TILE, TILE), Image.Resampling.LANCZOS)


def figure(checkpoint: Path, photo: Path, driver: Path, out: Path, columns: int = 6) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "out.mp4"
        reenact_offline(checkpoint, [photo], driver, video)
        rendered = [f.image for f in read_frames(video)]
    frames = [f.image for f in read_frames(driver)]
    picks = np.linspace(0, len(frames) - 1, columns).round().astype(int)
    detector = shared_detector()
    label_w = TILE
    sheet = Image.new("RGB", (label_w + columns * TILE, 2 * TILE), "white")
    source = Image.open(photo).convert("RGB")
    sheet.paste(
        _tile(crop_face(np.asarray(source), detector.crop_box(np.asarray(source)), TILE).image),
        (0, TILE),
    )
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 8), "driver\n(pose)", fill="black")
    draw.text((8, TILE - 20), "identity photo", fill="black")
    for col, i in enumerate(picks):
        crop = crop_face(frames[i], detector.crop_box(frames[i]), TILE).image
        sheet.paste(_tile(crop), (label_w + col * TILE, 0))
        sheet.paste(_tile(rendered[i]), (label_w + col * TILE, TILE))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--photo", type=Path, default=ROOT / "samples" / "photo.jpg")
    parser.add_argument("--driver", type=Path, default=ROOT / "samples" / "driver.mp4")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "reenactment.png")
    args = parser.parse_args()
    print(figure(args.checkpoint, args.photo, args.driver, args.out))


if __name__ == "__main__":
    main()
