"""Real-face suite: the paper's protocol (Sec. 4.3) on talking-head videos in VoxCeleb2 layout.

Per identity, 32 random frames of one video fine-tune (or embed) the avatar and 32 other frames
of the same video are held out. Self-reenactment drives the avatar with its hold-out frames
(images, landmarks and identity compared with those frames); cross-driving drives it with every
other identity's hold-out frames, where only identity (vs the avatar's own photos) and pose (vs
the driver's landmarks) can be scored. Frames are cropped as the service crops them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.images import to_uint8
from evaluation.landmarks import PoseError
from evaluation.lpips import LPIPS
from evaluation.metrics import detection_summary, l1, psnr, ssim, summary
from evaluation.models import (
    ScoredModel,
    can_finetune,
    encode_drivers,
    finetuned,
    pose_source,
    predicts_mask,
)
from evaluation.recognition import DlibFaces, FaceEmbedder, identity_errors
from media.crop import crop_face
from media.errors import MediaError
from media.faces import FaceDetector
from media.segmentation import ForegroundSegmenter
from media.video import read_frames
from model.inference import InferenceModel
from training.finetune import MAX_IMAGES
from training.prepare import SourceClip, find_clips


class RealDataError(ValueError):
    """A data folder the real suite cannot score (too few usable identities or frames)."""


@dataclass(frozen=True)
class RealSuiteConfig:
    """Sizes of the real suite; the defaults are the paper's protocol."""

    finetune_frames: int = 32  # per identity: the avatar's photos
    holdout_frames: int = 32  # per identity: self-reenactment drivers and targets
    cross_frames: int = 8  # hold-out frames of each other identity that drive an avatar
    max_identities: int | None = None  # the first N identities (sorted) with enough frames
    finetune_steps: int = 0  # > 0: also fine-tune each avatar on its photos (paper: 600)
    finetune_mode: str = "full"
    pose_error: bool = True
    grid_pairs: int = 8
    seed: int = 0


@dataclass
class Person:
    """One identity's frames, cropped at the model's size, and what is measured on them."""

    name: str
    video: str
    photos: np.ndarray  # (F, S, S, 3) uint8: fine-tuning / identity frames
    photo_masks: np.ndarray  # (F, S, S) uint8
    holdout: np.ndarray  # (H, S, S, 3) uint8
    holdout_masks: np.ndarray  # (H, S, S) uint8
    no_face: int = 0  # sampled frames dropped for want of a face
    reference: np.ndarray = field(default_factory=lambda: np.zeros(0))  # mean photo descriptor
    meshes: list[np.ndarray | None] = field(default_factory=list)  # per hold-out frame
    landmarks: np.ndarray | None = None  # (H, 68, 2) dlib points, for keypoint-driven models

    def truth(self) -> torch.Tensor:
        """Hold-out frames on black, (H, 3, S, S) float: what a perfect output would be."""
        rgb = torch.from_numpy(self.holdout).permute(0, 3, 1, 2).float() / 255
        return rgb * self.masks()

    def masks(self) -> torch.Tensor:
        return torch.from_numpy(self.holdout_masks).float()[:, None] / 255

    def drivers(self) -> torch.Tensor:
        return torch.from_numpy(self.holdout).permute(0, 3, 1, 2).contiguous()


@dataclass
class RealData:
    """Every identity's crops and reference measurements, shared by the models compared."""

    size: int
    people: list[Person]
    skipped: list[dict[str, Any]]
    embedder: str
    timings_s: dict[str, float]


# --- data ----------------------------------------------------------------------------------------
def _count(clips: list[SourceClip]) -> list[int]:
    return [sum(1 for _ in read_frames(c.path)) for c in clips]


def _videos(data: Path) -> dict[str, dict[str, list[SourceClip]]]:
    by_person: dict[str, dict[str, list[SourceClip]]] = defaultdict(lambda: defaultdict(list))
    for clip in find_clips(data):
        by_person[clip.identity][clip.video].append(clip)
    return {p: dict(v) for p, v in sorted(by_person.items())}


class _Cropper:
    """Official face crop and selfie mask of single frames (media/, as the service does it)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.detector = FaceDetector()
        self.segmenter = ForegroundSegmenter()

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        faces = self.detector.detect(frame)
        if not faces:
            return None
        box = self.detector.select(faces).box.square(self.detector.config.box_scale)
        crop = crop_face(frame, box, self.size).image
        mask = (self.segmenter.segment(crop) * 255).round().astype(np.uint8)
        return crop, mask

    def close(self) -> None:
        self.detector.close()
        self.segmenter.close()


def _person(
    name: str,
    videos: dict[str, list[SourceClip]],
    cfg: RealSuiteConfig,
    cropper: _Cropper,
    rng: np.random.Generator,
) -> Person | str:
    """The first video (sorted) with enough frames, sampled and cropped; or why none fits."""
    need = cfg.finetune_frames + cfg.holdout_frames
    failures: list[str] = []
    for video, clips in sorted(videos.items()):
        try:
            counts = _count(clips)
            if sum(counts) < need:
                continue
            chosen = rng.choice(sum(counts), size=need, replace=False)
            role = dict.fromkeys(chosen[: cfg.finetune_frames].tolist(), "photo")
            role |= dict.fromkeys(chosen[cfg.finetune_frames :].tolist(), "holdout")
            crops: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"photo": [], "holdout": []}
            no_face, offset = 0, 0
            for clip, count in zip(clips, counts, strict=True):
                for frame in read_frames(clip.path):
                    kind = role.get(offset + frame.index)
                    if kind is None:
                        continue
                    found = cropper(frame.image)
                    if found is None:
                        no_face += 1
                    else:
                        crops[kind].append(found)
                offset += count
        except MediaError as exc:  # an unreadable video: try the person's next one
            failures.append(f"{video}: {exc}")
            continue
        if not crops["photo"] or not crops["holdout"]:
            return f"{video}: no face in the sampled frames"
        return Person(
            name,
            video,
            np.stack([c for c, _ in crops["photo"]]),
            np.stack([m for _, m in crops["photo"]]),
            np.stack([c for c, _ in crops["holdout"]]),
            np.stack([m for _, m in crops["holdout"]]),
            no_face,
        )
    return "; ".join([*failures, f"no video with {need} frames"])


def prepare_real(
    data: Path,
    size: int,
    cfg: RealSuiteConfig,
    embedder: FaceEmbedder,
    estimator: PoseError | None,
    faces: DlibFaces | None = None,
) -> RealData:
    """Sample, crop and measure every identity's frames once, for any number of models.

    `faces` (dlib's 68-point predictor) adds hold-out landmarks for keypoint-driven models.
    """
    if not data.is_dir():
        raise RealDataError(f"{data} is not a directory")
    videos = _videos(data)
    if not videos:
        raise RealDataError(f"no <identity>/<video>/<clip>.mp4 videos under {data}")
    start = time.perf_counter()
    rng = np.random.default_rng([cfg.seed, 5])
    cropper = _Cropper(size)
    people: list[Person] = []
    skipped: list[dict[str, Any]] = []
    try:
        for name, by_video in videos.items():
            if cfg.max_identities is not None and len(people) >= cfg.max_identities:
                break
            found = _person(name, by_video, cfg, cropper, rng)
            if isinstance(found, str):
                skipped.append({"identity": name, "reason": found})
            else:
                people.append(found)
    finally:
        cropper.close()
    if len(people) < 2:
        raise RealDataError(
            f"cross-driving needs 2 identities with {cfg.finetune_frames} + "
            f"{cfg.holdout_frames} frames of one video; found {len(people)} under {data}"
            + (f" (skipped: {skipped})" if skipped else "")
        )
    timings = {"crop": time.perf_counter() - start}
    start = time.perf_counter()
    for person in people:
        person.reference = embedder.embed(list(person.photos)).mean(0)
        if estimator is not None:
            person.meshes = [estimator.mesh(frame) for frame in person.holdout]
        if faces is not None:
            person.landmarks = np.stack([faces.landmarks(f) for f in person.holdout])
    timings["reference_measurements"] = time.perf_counter() - start
    return RealData(size, people, skipped, embedder.name, timings)


# --- scoring -------------------------------------------------------------------------------------
@dataclass
class _Scores:
    l1: list[float] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    lpips: list[float] = field(default_factory=list)
    identity_error: list[float] = field(default_factory=list)
    pose_error: list[float | None] = field(default_factory=list)


def _outputs(
    avatar: InferenceModel, identity: torch.Tensor, model: InferenceModel, driver: Person, n: int
) -> torch.Tensor:
    poses = encode_drivers(
        model, driver.drivers()[:n], None if driver.landmarks is None else driver.landmarks[:n]
    )
    out = avatar.render(identity, poses).rgb.cpu()
    return out if predicts_mask(model) else out * driver.masks()[:n]


@dataclass
class RealResult:
    """One model's real-suite metrics and its sample grids (columns of tiles)."""

    metrics: dict[str, Any]
    self_columns: list[list[np.ndarray]]  # photo, hold-out driver, target, outputs
    cross_columns: list[list[np.ndarray]]  # photo, other person's frame, outputs


def run_real(
    scored: ScoredModel,
    data: RealData,
    cfg: RealSuiteConfig,
    embedder: FaceEmbedder,
    estimator: PoseError | None,
    lpips: LPIPS | None = None,
) -> RealResult:
    """Score one model on prepared data: zero-shot avatars, and fine-tuned ones if asked."""
    model = scored.model
    if model.config.image_size != data.size:
        raise ValueError(f"data cropped at {data.size} px, model renders {model.config.image_size}")
    if pose_source(model) == "keypoints" and data.people[0].landmarks is None:
        raise ValueError("a keypoint-driven model needs prepare_real(..., faces=DlibFaces())")
    tune = cfg.finetune_steps > 0 and can_finetune(model) is None
    kinds = ("zero_shot", "finetuned") if tune else ("zero_shot",)
    self_scores = {k: _Scores() for k in kinds}
    cross_scores = {k: _Scores() for k in kinds}
    self_columns: list[list[np.ndarray]] = []
    cross_columns: list[list[np.ndarray]] = []
    start = time.perf_counter()
    n_people = len(data.people)
    for a, person in enumerate(data.people):
        photos = torch.from_numpy(person.photos).permute(0, 3, 1, 2)
        avatars: dict[str, tuple[InferenceModel, torch.Tensor]] = {
            "zero_shot": (model, model.embed_identity(photos))
        }
        if tune:
            tuned = finetuned(
                scored.base, person.photos[:MAX_IMAGES], person.photo_masks[:MAX_IMAGES],
                cfg.finetune_steps, cfg.finetune_mode, cfg.seed, str(model.device),
            )  # fmt: skip
            assert tuned.avatar_identity is not None  # fine-tuned checkpoints carry one
            avatars["finetuned"] = (tuned, tuned.avatar_identity)
        truth = person.truth()
        self_tiles = [person.photos[0], person.holdout[0], to_uint8(truth[0])]
        neighbour = data.people[(a + 1) % n_people]
        cross_tiles = [person.photos[0], neighbour.holdout[0]]
        for kind, (avatar, identity) in avatars.items():
            # self-reenactment: the hold-out frames drive and are the targets
            out = _outputs(avatar, identity, model, person, len(truth))
            images = [to_uint8(o) for o in out]
            s = self_scores[kind]
            s.l1 += l1(out, truth).tolist()
            s.psnr += psnr(out, truth).tolist()
            s.ssim += ssim(out, truth).tolist()
            if lpips is not None:
                s.lpips += lpips(out, truth).tolist()
            s.identity_error += identity_errors(embedder.embed(images), person.reference).tolist()
            if estimator is not None:
                s.pose_error += [
                    estimator(o, m) for o, m in zip(images, person.meshes, strict=True)
                ]
            self_tiles.append(images[0])
            # cross-driving: every other identity's hold-out frames drive
            c = cross_scores[kind]
            for b, driver in enumerate(data.people):
                if b == a:
                    continue
                n = min(cfg.cross_frames, len(driver.holdout))
                images = [to_uint8(o) for o in _outputs(avatar, identity, model, driver, n)]
                c.identity_error += identity_errors(
                    embedder.embed(images), person.reference
                ).tolist()
                if estimator is not None:
                    c.pose_error += [
                        estimator(o, m) for o, m in zip(images, driver.meshes[:n], strict=True)
                    ]
                if driver is neighbour:
                    cross_tiles.append(images[0])
        if len(self_columns) < cfg.grid_pairs:
            self_columns.append(self_tiles)
            cross_columns.append(cross_tiles)
    elapsed = time.perf_counter() - start

    def scores_of(kind: str) -> dict[str, Any]:
        s, c = self_scores[kind], cross_scores[kind]
        return {
            "self_reenactment": {
                "frames": len(s.l1),
                "l1": summary(s.l1),
                "psnr_db": summary(s.psnr),
                "ssim": summary(s.ssim),
                "lpips": summary(s.lpips),
                "identity_error": summary(s.identity_error),
                "pose_error": detection_summary(s.pose_error) if estimator is not None else None,
            },
            "cross_driving": {
                "frames": len(c.identity_error),
                "identity_error": summary(c.identity_error),
                "pose_error": detection_summary(c.pose_error) if estimator is not None else None,
            },
        }

    metrics: dict[str, Any] = {
        "zero_shot": scores_of("zero_shot"),
        "finetuned": scores_of("finetuned") if tune else None,
        "finetune": (
            {"steps": cfg.finetune_steps, "mode": cfg.finetune_mode, "photos_max": MAX_IMAGES}
            if tune
            else None
        ),
        "timings_s": {"score": round(elapsed, 2)},
    }
    return RealResult(metrics, self_columns, cross_columns)


def reference_errors(data: RealData, embedder: FaceEmbedder) -> dict[str, Any]:
    """Model-free identity errors that give the scale: the same person's hold-out frames on
    black (a perfect self-reenactment) and other people's (a total identity loss)."""
    same: list[float] = []
    other: list[float] = []
    truths = [embedder.embed([to_uint8(t) for t in p.truth()]) for p in data.people]
    for a, person in enumerate(data.people):
        for b, descriptors in enumerate(truths):
            errors = identity_errors(descriptors, person.reference).tolist()
            (same if a == b else other).extend(errors)
    return {"same_person_holdout": summary(same), "other_people_holdout": summary(other)}


def describe_data(data: RealData, cfg: RealSuiteConfig) -> dict[str, Any]:
    """What was scored: identities, videos, frame counts, and the identity model used."""
    return {
        "config": asdict(cfg),
        "identities": [
            {
                "identity": p.name,
                "video": p.video,
                "photos": len(p.photos),
                "holdout": len(p.holdout),
                "no_face": p.no_face,
            }
            for p in data.people
        ],
        "skipped": data.skipped,
        "identity_model": data.embedder,
        "identity_error": "1 - cosine similarity with the mean descriptor of the avatar's photos",
        "pose_error": "mediapipe face mesh, output vs driver frame, / driver's eye-corner distance",
        "crop_size": data.size,
    }
