"""`reenact local`: the service's reenactment pipeline in this process, with the model run by
PyTorch instead of Triton: for trying a checkpoint without starting anything.

The photos give the identity (zero-shot), the driver goes through the same tracking,
cropping, compositing and encoding as a reenact job (workers.reenact), audio included.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from media.crop import crop_face
from media.faces import shared_detector
from media.video import probe
from model.inference import InferenceModel
from service.schemas import ReenactOptions
from service.triton import Rendered
from service.uploads import load_photo
from workers.reenact import Compositor, Condition, Outputs, render, track_faces

MAX_PHOTO_PIXELS = 40_000_000


class TorchRenderer:
    """service.triton.Renderer done by InferenceModel instead of Triton."""

    def __init__(self, model: InferenceModel) -> None:
        self.model = model

    def image_size(self) -> int:
        return int(self.model.config.image_size)

    def reenact(
        self, frames: np.ndarray, identity: np.ndarray | None = None, avatar_id: str | None = None
    ) -> Rendered:
        if identity is None:
            raise ValueError("local mode renders zero-shot identities only")
        with torch.inference_mode():
            out = self.model.reenact(torch.from_numpy(identity), torch.from_numpy(frames))
        return Rendered(out.rgb.float().cpu().numpy(), out.mask.float().cpu().numpy())


def embed_photos(model: InferenceModel, photos: Sequence[Path]) -> np.ndarray:
    """The identity embedding of the photos' largest faces (the official x1.8 crop)."""
    size = model.config.image_size
    crops = []
    for path in photos:
        rgb = load_photo(path, MAX_PHOTO_PIXELS)
        crops.append(crop_face(rgb, shared_detector().crop_box(rgb), size).image)
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        return model.embed_identity(batch).float().cpu().numpy()


def reenact_offline(
    checkpoint: Path, photos: Sequence[Path], driver: Path, out: Path, *, paste_back: bool = False
) -> int:
    """Render `driver` with the person in `photos` to the MP4 `out`; returns frames written."""
    model = InferenceModel.from_checkpoint(checkpoint)
    identity = embed_photos(model, photos)
    info = probe(driver)
    options = ReenactOptions.model_validate({"avatar_id": "local", "paste_back": paste_back})
    bar = tqdm(total=100, desc="reenact", unit="%")

    def report(fraction: float, stage: str | None = None) -> bool:
        bar.set_postfix_str(stage or "")
        bar.update(round(100 * fraction) - bar.n)
        return True

    renderer = TorchRenderer(model)
    size = renderer.image_size()
    frame_size = (info.width, info.height) if paste_back else (size, size)
    audio = driver if info.has_audio else None
    try:
        boxes = track_faces(driver, info.num_frames, report)
        assert boxes is not None  # report never cancels
        with tempfile.TemporaryDirectory(dir=out.parent or None) as tmp:
            outputs = Outputs(Path(tmp), options, info.fps, frame_size, audio)
            try:
                written = render(
                    renderer, Condition(identity=identity), driver, boxes, outputs,
                    Compositor(options, None, frame_size), 8, report,
                )  # fmt: skip
            except BaseException:
                outputs.abort()
                raise
            outputs.close()
            shutil.move(Path(tmp) / outputs.files["video"], out)
    finally:
        bar.close()
    return int(written or 0)
