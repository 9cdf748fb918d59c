"""Meta-learning samples (paper Section 3): per video, K identity frames and one driver.

The driver is pose-augmented (official recipe, `training.augment`); the identity frames
never are. The label is the video's row in the discriminator's embedding matrix. The
keypoints baseline also gets the driver's landmarks, which the clip store keeps per frame.
Randomness comes from (seed, epoch, index), so any sample can be reproduced exactly.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from training.augment import PoseAugmentConfig, PoseAugmenter
from training.clipstore import Clip, ClipRef, read_clip, scan

Split = Literal["train", "val", "all"]


@dataclass(frozen=True)
class DataConfig:
    root: str
    k: int = 8  # identity frames per sample (official: 8)
    image_size: int | None = None  # resize stored crops if they differ
    split: Split = "train"
    val_fraction: float = 0.0  # identities held out for validation
    seed: int = 0
    augment: PoseAugmentConfig = field(default_factory=PoseAugmentConfig)
    clip_cache: int = 16  # decoded clip archives kept per worker


class Sample(NamedTuple):
    identity_images: torch.Tensor  # (K, 3, S, S) float32 in [0, 1]
    pose_image: torch.Tensor  # (3, S, S) augmented driver
    target: torch.Tensor  # (3, S, S) driver (shared shift only); multiply by mask for loss
    mask: torch.Tensor  # (1, S, S) float32 in [0, 1]
    label: int  # video index
    # (L, 2) driver landmarks in [0, 1] crop coordinates, moved with the target's shift; only
    # for the keypoints baseline (VideoDataset(keypoints=True)), else (0, 2).
    keypoints: torch.Tensor | None = None


@dataclass(frozen=True)
class Video:
    identity: str
    name: str
    clips: tuple[ClipRef, ...]

    @property
    def num_frames(self) -> int:
        return sum(c.num_frames for c in self.clips)


def split_identities(identities: list[str], val_fraction: float, seed: int) -> set[str]:
    """Deterministic held-out identity set (at least one when val_fraction > 0)."""
    if not val_fraction:
        return set()
    shuffled = sorted(identities)
    random.Random(seed).shuffle(shuffled)
    n = min(len(shuffled) - 1, max(1, round(val_fraction * len(shuffled))))
    return set(shuffled[:n])


def list_videos(root: str | Path, split: Split, val_fraction: float, seed: int) -> list[Video]:
    groups: dict[tuple[str, str], list[ClipRef]] = {}
    for ref in scan(root):
        groups.setdefault((ref.identity, ref.video), []).append(ref)
    val = split_identities(sorted({i for i, _ in groups}), val_fraction, seed)
    keep = {"train": lambda i: i not in val, "val": lambda i: i in val, "all": lambda i: True}
    return [
        Video(identity, name, tuple(refs))
        for (identity, name), refs in sorted(groups.items())
        if keep[split](identity)
    ]


class VideoDataset(Dataset[Sample]):
    """One item per video; call `set_epoch` so each epoch draws new frames."""

    def __init__(self, config: DataConfig, keypoints: bool = False):
        self.config = config
        self.keypoints = keypoints
        self.videos = list_videos(config.root, config.split, config.val_fraction, config.seed)
        if not self.videos:
            raise ValueError(f"no {config.split} videos under {config.root}")
        self.augment = PoseAugmenter(config.augment)
        self.epoch = 0
        self._clips: OrderedDict[Path, Clip] = OrderedDict()  # per-process LRU

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def num_labels(self) -> int:
        """Rows the discriminator's embedding needs."""
        return len(self.videos)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng((self.config.seed, self.epoch, index))
        video = self.videos[index]
        frames = self._choose_frames(video, rng)
        points = None
        if self.keypoints:
            frames, points = self._landmarked_driver(video, frames)
        images = [self._image(video, f) for f in frames]
        mask = self._mask(video, frames[-1])
        size = images[-1].shape[0]
        if points is not None:
            points = points * size  # pixels of the (resized) crop, for the shared shift
        pose, target, mask, points = self.augment.augment(images[-1], images[-1], mask, rng, points)
        return Sample(
            identity_images=torch.stack([_to_tensor(x) for x in images[:-1]]),
            pose_image=_to_tensor(pose),
            target=_to_tensor(target),
            mask=torch.from_numpy(mask.astype(np.float32) / 255)[None],
            label=index,
            keypoints=torch.zeros(0, 2) if points is None else torch.from_numpy(points / size),
        )

    def _landmarked_driver(self, video: Video, frames: list[int]) -> tuple[list[int], np.ndarray]:
        """Frames with a driver whose landmarks were found, and those landmarks / crop size.

        A driver without landmarks (NaN: no face found) swaps places with the first chosen
        identity frame that has them.
        """
        for j in (len(frames) - 1, *range(len(frames) - 1)):
            clip, i = self._locate(video, frames[j])
            if clip.landmarks is None:
                raise ValueError(
                    f"{clip.path}: no landmarks stored; the keypoints baseline needs them "
                    "(synthetic stores have them; real data: training.prepare --landmarks)"
                )
            points = clip.landmarks[i]
            if np.isfinite(points).all():
                frames = list(frames)
                frames[j], frames[-1] = frames[-1], frames[j]
                return frames, (points / clip.image_size).astype(np.float32)
        raise ValueError(f"{video.identity}/{video.name}: no landmarks in any sampled frame")

    def _choose_frames(self, video: Video, rng: np.random.Generator) -> list[int]:
        """K identity frames + 1 driver, distinct while the video has enough frames."""
        k, n = self.config.k, video.num_frames
        if n >= k + 1:
            return [int(i) for i in rng.choice(n, size=k + 1, replace=False)]
        driver = int(rng.integers(n))
        others = [i for i in range(n) if i != driver] or [driver]
        return [int(i) for i in rng.choice(others, size=k, replace=True)] + [driver]

    def _locate(self, video: Video, frame: int) -> tuple[Clip, int]:
        for ref in video.clips:
            if frame < ref.num_frames:
                return self._read(ref.path), frame
            frame -= ref.num_frames
        raise IndexError(frame)

    def _read(self, path: Path) -> Clip:
        clip = self._clips.pop(path, None) or read_clip(path)
        self._clips[path] = clip
        while len(self._clips) > self.config.clip_cache:
            self._clips.popitem(last=False)
        return clip

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_clips": OrderedDict()}  # workers start with an empty cache

    def _resize(self, image: np.ndarray) -> np.ndarray:
        size = self.config.image_size
        if size is None or image.shape[0] == size:
            return image
        interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
        return cv2.resize(image, (size, size), interpolation=interp)

    def _image(self, video: Video, frame: int) -> np.ndarray:
        clip, i = self._locate(video, frame)
        return self._resize(clip.image(i))

    def _mask(self, video: Video, frame: int) -> np.ndarray:
        clip, i = self._locate(video, frame)
        return self._resize(clip.mask(i))


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 -> (3, S, S) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
