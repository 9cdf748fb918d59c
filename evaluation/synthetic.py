"""Synthetic ground-truth suite: cross-person reenactment (zero-shot and fine-tuned avatars),
identity leakage, pose-descriptor probes, expression retrieval and keypoint regression, all on
procedural heads the model never saw (paper, Sec. 4).

Identity i is embedded from K frames of its own trajectory and driven by frames of every other
identity j; the renderer draws i in j's pose as ground truth. Everything is a function of the
seed: identities, poses, probe splits and the order of work.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from evaluation import expressions
from evaluation.images import premultiplied, to_uint8
from evaluation.landmarks import PoseError
from evaluation.lpips import LPIPS
from evaluation.metrics import detection_summary, l1, psnr, ssim, summary
from evaluation.models import (
    ScoredModel,
    can_finetune,
    embed_each,
    encode_drivers,
    finetuned,
)
from evaluation.probes import (
    classification_probe,
    fit_regressor,
    keypoint_mlp_probe,
    mean_correlation,
    mean_shape_keypoints,
    regression_probe,
    retrieval_precision,
    standardise,
)
from model.inference import InferenceModel
from training.synthetic import IdentityParams, PoseParams, identity_for, poses_for, render

# Identity indices of each role. The demo data used indices below 300 (generator seed 0), and
# identities are keyed by (seed, index), so these are held out whatever the seed.
EVAL_FIRST = 1_000_000
LEAKAGE_PROBE_FIRST = 2_000_000
POSE_PROBE_FIRST = 3_000_000
RETRIEVAL_FIRST = 4_000_000
# The probe reads identity from premultiplied heads, where the background is black.
PROBED_IDENTITY_COLUMNS = tuple(
    i for i, name in enumerate(IdentityParams.names()) if not name.startswith("background")
)
AVATAR_KINDS = {"zero_shot": "zero-shot", "finetuned": "fine-tuned"}


@dataclass(frozen=True)
class SyntheticSuiteConfig:
    """Sizes of the synthetic suite; the defaults take about a minute on one CPU core."""

    identities: int = 10  # held-out avatars; each is driven by all the others
    k: int = 4  # identity frames per avatar (and fine-tuning photos)
    frames_per_driver: int = 4
    trajectory_frames: int = 100  # 4 s at 25 fps: identity and driver frames are drawn from it
    leakage_probe_identities: int = 300  # ground-truth renders that train the identity probe
    leakage_probe_poses: int = 2
    probe_pixels: int = 16  # the identity probe reads pixels downsampled to this size
    pose_probe_identities: int = 100  # also the keypoint-regression data (half train, half test)
    pose_probe_frames: int = 10
    retrieval_identities: int = 40  # x 3 views x 6 expression classes faces
    keypoint_steps: int = 300  # AdamW steps of each keypoint MLP; 0 skips keypoint regression
    finetune_steps: int = 0  # > 0: also fine-tune every avatar on its K frames and score it
    finetune_mode: str = "full"  # or "light" (training.finetune)
    pose_error: bool = True  # mediapipe face mesh on every output and ground truth
    grid_pairs: int = 8
    seed: int = 0


@dataclass
class Sample:
    """One cross-person frame for the report's image grid."""

    avatar: np.ndarray  # (S, S, 3) uint8: identity frame 0 of the avatar
    driver: np.ndarray
    truth: np.ndarray
    output: np.ndarray  # the zero-shot avatar's
    finetuned: np.ndarray | None = None


@dataclass
class SyntheticResult:
    """What the suite measured: JSON-ready metrics and sample images."""

    metrics: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)


# --- rendering -----------------------------------------------------------------------------------
@dataclass
class _Rendered:
    """Frames of one identity in some poses, with their ground truth."""

    raw: torch.Tensor  # (N, 3, S, S) uint8 with background, as a driver video or photo is
    heads: torch.Tensor  # (N, 3, S, S) float on black, comparable with the model's output
    masks: torch.Tensor  # (N, 1, S, S) float in [0, 1]
    landmarks: np.ndarray  # (N, 68, 2) pixels, iBUG-68

    def photos(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S, 3) uint8 images and (N, S, S) uint8 masks: fine-tuning input."""
        images = self.raw.permute(0, 2, 3, 1).contiguous().numpy()
        return images, (self.masks[:, 0] * 255).round().to(torch.uint8).numpy()


def _render(identity: IdentityParams, poses: list[PoseParams], size: int) -> _Rendered:
    frames = [render(identity, p, size) for p in poses]
    return _Rendered(
        torch.from_numpy(np.stack([f.image for f in frames])).permute(0, 3, 1, 2).contiguous(),
        torch.stack([premultiplied(f.image, f.mask) for f in frames]),
        torch.from_numpy(np.stack([f.mask for f in frames])).float()[:, None] / 255,
        np.stack([f.landmarks for f in frames]),
    )


def _trajectory(cfg: SyntheticSuiteConfig, index: int, clip: int) -> list[PoseParams]:
    return poses_for(cfg.seed, index, clip, cfg.trajectory_frames)


def _pick(rng: np.random.Generator, poses: list[PoseParams], n: int) -> list[PoseParams]:
    return [poses[i] for i in sorted(rng.choice(len(poses), size=n, replace=False).tolist())]


def _pixels(images: torch.Tensor, size: int) -> np.ndarray:
    """Probe features: area-downsampled pixels, (N, 3 * size * size)."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return F.adaptive_avg_pool2d(x, size).flatten(1).numpy()


def _params(identities: list[IdentityParams]) -> np.ndarray:
    return np.stack([p.to_vector()[list(PROBED_IDENTITY_COLUMNS)] for p in identities])


# --- cross-person reenactment ---------------------------------------------------------------------
@dataclass
class _CrossPerson:
    """Scores of one avatar kind over every (avatar, driver) frame."""

    l1: list[float] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    lpips: list[float] = field(default_factory=list)
    pose_error: list[float | None] = field(default_factory=list)
    avatar: list[int] = field(default_factory=list)  # identity index of each scored frame
    driver: list[int] = field(default_factory=list)
    output_pixels: list[np.ndarray] = field(default_factory=list)
    truth_pixels: list[np.ndarray] = field(default_factory=list)
    driver_pixels: list[np.ndarray] = field(default_factory=list)


def _cross_person(
    scored: ScoredModel,
    cfg: SyntheticSuiteConfig,
    identities: list[IdentityParams],
    lpips: LPIPS | None,
) -> tuple[dict[str, _CrossPerson], list[tuple[tuple[int, int], Sample]]]:
    model = scored.model
    size = model.config.image_size
    rng = np.random.default_rng([cfg.seed, 1])
    n = len(identities)
    id_frames = [
        _render(p, _pick(rng, _trajectory(cfg, EVAL_FIRST + i, 0), cfg.k), size)
        for i, p in enumerate(identities)
    ]
    driver_poses = [
        _pick(rng, _trajectory(cfg, EVAL_FIRST + j, 1), cfg.frames_per_driver) for j in range(n)
    ]
    drivers = [_render(p, q, size) for p, q in zip(identities, driver_poses, strict=True)]
    descriptors = [encode_drivers(model, d.raw, d.landmarks) for d in drivers]  # (F, d_pose)
    tune = cfg.finetune_steps > 0 and can_finetune(model) is None
    results = {kind: _CrossPerson() for kind in AVATAR_KINDS if kind == "zero_shot" or tune}
    samples: list[tuple[tuple[int, int], Sample]] = []
    estimator = PoseError() if cfg.pose_error else None
    try:
        for i, identity in enumerate(identities):
            avatars: dict[str, tuple[InferenceModel, torch.Tensor]] = {
                "zero_shot": (model, model.embed_identity(id_frames[i].raw))
            }
            if tune:
                images, masks = id_frames[i].photos()
                tuned = finetuned(
                    scored.base, images, masks, cfg.finetune_steps, cfg.finetune_mode,
                    cfg.seed, str(model.device),
                )  # fmt: skip
                assert tuned.avatar_identity is not None  # fine-tuned checkpoints carry one
                avatars["finetuned"] = (tuned, tuned.avatar_identity)
            for j in range(n):
                if j == i:
                    continue
                truth = _render(identity, driver_poses[j], size)
                meshes = [estimator.mesh(to_uint8(t)) for t in truth.heads] if estimator else None
                firsts: dict[str, np.ndarray] = {}
                for kind, (avatar_model, embedding) in avatars.items():
                    # Every model is scored on the ground truth's foreground, so a model
                    # without a mask (whole frames) and one with its own mask compare alike.
                    output = avatar_model.render(embedding, descriptors[j]).rgb.cpu()
                    output = output * truth.masks
                    cp = results[kind]
                    cp.l1 += l1(output, truth.heads).tolist()
                    cp.psnr += psnr(output, truth.heads).tolist()
                    cp.ssim += ssim(output, truth.heads).tolist()
                    if lpips is not None:
                        cp.lpips += lpips(output, truth.heads).tolist()
                    cp.avatar += [i] * len(output)
                    cp.driver += [j] * len(output)
                    cp.output_pixels.append(_pixels(output, cfg.probe_pixels))
                    cp.truth_pixels.append(_pixels(truth.heads, cfg.probe_pixels))
                    cp.driver_pixels.append(_pixels(drivers[j].heads, cfg.probe_pixels))
                    if estimator is not None and meshes is not None:
                        cp.pose_error += [
                            estimator(to_uint8(o), m) for o, m in zip(output, meshes, strict=True)
                        ]
                    firsts[kind] = to_uint8(output[0])
                sample = Sample(
                    to_uint8(id_frames[i].raw[0]),
                    to_uint8(drivers[j].raw[0]),
                    to_uint8(truth.heads[0]),
                    firsts["zero_shot"],
                    firsts.get("finetuned"),
                )
                samples.append((((j - i) % n, i), sample))
    finally:
        if estimator is not None:
            estimator.close()
    return results, samples


def _summary(
    cp: _CrossPerson, cfg: SyntheticSuiteConfig, kind: str, lpips: LPIPS | None
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "avatars": AVATAR_KINDS[kind],
        "identities": cfg.identities,
        "pairs": cfg.identities * (cfg.identities - 1),
        "frames": len(cp.l1),
        "l1": summary(cp.l1),
        "psnr_db": summary(cp.psnr),
        "ssim": summary(cp.ssim),
        "lpips": {**(summary(cp.lpips) or {}), "backbone": lpips.kind}
        if lpips is not None
        else None,
        "pose_error": None,
    }
    if cfg.pose_error:
        result["pose_error"] = {
            **detection_summary(cp.pose_error),
            "estimator": "mediapipe face mesh (468 points) on output and on ground truth",
            "normaliser": "ground truth's outer-eye-corner distance",
        }
    if kind == "finetuned":
        result["finetune"] = {
            "steps": cfg.finetune_steps,
            "mode": cfg.finetune_mode,
            "photos": cfg.k,
            "losses": "adversarial, feature matching, dice and pixel L1 x 10 (no VGG weights)",
        }
    return result


# --- identity leakage ----------------------------------------------------------------------------
READABLE_R2 = 0.3  # identity columns the probe reads at least this well from ground truth


def _identity_leakage(
    cfg: SyntheticSuiteConfig,
    size: int,
    identities: list[IdentityParams],
    results: dict[str, _CrossPerson],
) -> dict[str, Any]:
    """How much of the avatar's and of the driver's identity a pixel probe reads from outputs.

    The probe (ridge, pixels -> identity parameters) is trained on ground-truth renders of
    other identities, and scored by mean correlation over the parameters it reads well on
    identities it did not see. The paper's Ir/Pr analogue: high avatar correlation = identity
    kept; driver correlation above the ground truth's (about 0) = the driver leaks through.
    """
    rng = np.random.default_rng([cfg.seed, 2])
    x, y, who = [], [], []
    for m in range(cfg.leakage_probe_identities):
        index = LEAKAGE_PROBE_FIRST + m
        p = identity_for(cfg.seed, index)
        poses = _pick(rng, _trajectory(cfg, index, 0), cfg.leakage_probe_poses)
        x.append(_pixels(_render(p, poses, size).heads, cfg.probe_pixels))
        y += [p] * len(poses)
        who += [m] * len(poses)
    features, targets, owner = np.concatenate(x), _params(y), np.asarray(who)
    test = owner >= int(0.8 * cfg.leakage_probe_identities)  # unseen people: the probe's score
    quality = regression_probe(
        features[~test], targets[~test], features[test], targets[test], rng, owner[~test]
    )
    readable = [c for c, r in enumerate(quality.per_column) if r >= READABLE_R2]
    names = [IdentityParams.names()[PROBED_IDENTITY_COLUMNS[c]] for c in readable]
    result: dict[str, Any] = {
        "probe": "ridge from premultiplied pixels "
        f"({cfg.probe_pixels}x{cfg.probe_pixels}) to identity parameters (background excluded)",
        "probe_on_held_out_identities": quality.as_dict(),
        "readable_parameters": names,
        "score": f"mean Pearson correlation over readable_parameters (R² >= {READABLE_R2})",
    }
    parts = ("output", "output_finetuned", "ground_truth", "driver_frames")
    if not readable:
        return {**result, **dict.fromkeys(parts)}
    probe = fit_regressor(features, standardise(targets, targets), rng, owner)
    zero_shot = results["zero_shot"]
    avatar = _params([identities[i] for i in zero_shot.avatar])[:, readable]
    driver = _params([identities[j] for j in zero_shot.driver])[:, readable]

    def read(pixels: list[np.ndarray]) -> dict[str, float]:
        predicted = probe.predict(np.concatenate(pixels))[:, readable]
        return {
            "avatar_corr": mean_correlation(avatar, predicted),
            "driver_corr": mean_correlation(driver, predicted),
        }

    tuned = results.get("finetuned")
    return {
        **result,
        "output": read(zero_shot.output_pixels),
        "output_finetuned": read(tuned.output_pixels) if tuned is not None else None,
        "ground_truth": read(zero_shot.truth_pixels),  # the no-leak reference
        "driver_frames": read(zero_shot.driver_pixels),  # the full-leak reference (driver_corr)
    }


# --- pose-descriptor probes and keypoint regression ----------------------------------------------
@dataclass
class _ProbeData:
    """Frames of many identities along their trajectories, and what the model makes of them."""

    descriptors: np.ndarray  # (N, d_pose)
    identity_embeddings: np.ndarray  # (N, d_id), one frame each
    pixels: np.ndarray  # (N, 3 * p * p)
    poses: np.ndarray  # (N, pose params)
    landmarks: np.ndarray  # (N, 68, 2), divided by the image size
    who: np.ndarray  # (N,) identity labels


def _probe_data(model: InferenceModel, cfg: SyntheticSuiteConfig) -> _ProbeData:
    rng = np.random.default_rng([cfg.seed, 3])
    size = model.config.image_size
    descriptors, embeddings, pixels, poses, landmarks, labels = [], [], [], [], [], []
    for m in range(cfg.pose_probe_identities):
        index = POSE_PROBE_FIRST + m
        chosen = _pick(rng, _trajectory(cfg, index, 0), cfg.pose_probe_frames)
        frames = _render(identity_for(cfg.seed, index), chosen, size)
        descriptors.append(encode_drivers(model, frames.raw, frames.landmarks).cpu().numpy())
        if cfg.keypoint_steps > 0:
            embeddings.append(embed_each(model, frames.raw).cpu().numpy())
        pixels.append(_pixels(frames.raw, cfg.probe_pixels))
        poses += [p.to_vector() for p in chosen]
        landmarks.append(frames.landmarks / size)
        labels += [m] * len(chosen)
    return _ProbeData(
        np.concatenate(descriptors),
        np.concatenate(embeddings) if embeddings else np.zeros((len(labels), 0)),
        np.concatenate(pixels),
        np.stack(poses),
        np.concatenate(landmarks),
        np.asarray(labels),
    )


def _pose_probes(data: _ProbeData, cfg: SyntheticSuiteConfig) -> dict[str, Any]:
    """Identity should not, and pose should, be linearly readable from the pose descriptor.

    The same probes on downsampled pixels are the reference: what a linear read of the raw
    frame gets, so "high" and "near chance" have a scale at this image size.
    """
    rng = np.random.default_rng([cfg.seed, 30])
    y, who = data.poses, data.who
    # identity: same people, other frames (alternate frames of each trajectory)
    frame_test = np.tile(np.arange(cfg.pose_probe_frames) % 2 == 1, cfg.pose_probe_identities)
    # pose: people the probe never saw
    person_test = who >= cfg.pose_probe_identities // 2

    def probes(x: np.ndarray) -> dict[str, Any]:
        identity = classification_probe(
            x[~frame_test], who[~frame_test], x[frame_test], who[frame_test], rng
        )
        pose = regression_probe(
            x[~person_test], y[~person_test], x[person_test], y[person_test], rng,
            who[~person_test],
        )  # fmt: skip
        return {"identity_from": identity.as_dict(), "pose_params_from": pose.as_dict()}

    ours, reference = probes(data.descriptors), probes(data.pixels)
    return {
        "identity_from_pose": ours["identity_from"],
        "pose_params_from_pose": ours["pose_params_from"],
        "pose_param_names": list(PoseParams.names()),
        "reference_pixels": {
            "features": f"frames downsampled to {cfg.probe_pixels}x{cfg.probe_pixels}",
            "identity_from_pixels": reference["identity_from"],
            "pose_params_from_pixels": reference["pose_params_from"],
        },
    }


def _keypoint_regression(data: _ProbeData, cfg: SyntheticSuiteConfig) -> dict[str, Any] | None:
    """68 landmarks from [pose descriptor, identity embedding] with a 768-hidden ReLU MLP.

    The paper's MAFL experiment; here the targets are the renderer's exact landmarks, the split
    is by identity, and the inputs that are not both embeddings are the baselines.
    """
    if cfg.keypoint_steps <= 0:
        return None
    test = data.who >= cfg.pose_probe_identities // 2
    y = data.landmarks
    inputs = {
        "pose_and_identity": np.concatenate([data.descriptors, data.identity_embeddings], 1),
        "pose_only": data.descriptors,
        "identity_only": data.identity_embeddings,
        "pixels": data.pixels,
    }
    result: dict[str, Any] = {
        "regressor": "ReLU MLP, one hidden layer of 768, full-batch AdamW",
        "steps": cfg.keypoint_steps,
        "targets": "the renderer's 68 iBUG landmarks, divided by the image size",
        "error": "mean point distance / outer-eye-corner distance, percent (paper: 2.63 on MAFL)",
        "split": "by identity: the first half of the probe identities train, the rest test",
        "mean_shape": mean_shape_keypoints(y[~test], y[test]).as_dict(),
    }
    for name, x in inputs.items():
        result[name] = keypoint_mlp_probe(
            x[~test], y[~test], x[test], y[test], cfg.seed, cfg.keypoint_steps
        ).as_dict()
    return result


# --- expression retrieval ------------------------------------------------------------------------
def _expression_retrieval(model: InferenceModel, cfg: SyntheticSuiteConfig) -> dict[str, Any]:
    """Table 1's analogue: retrieve faces of the same expression class across identities.

    Every identity shows every class in every view once; a query's gallery is the other
    identities' faces in its view. The renderer's landmarks (centred, in units of the
    inter-ocular distance) and raw pixels are the references.
    """
    size = model.config.image_size
    descriptors, pixels, points, labels, people, views = [], [], [], [], [], []
    for m in range(cfg.retrieval_identities):
        identity = identity_for(cfg.seed, RETRIEVAL_FIRST + m)
        rng = np.random.default_rng([cfg.seed, 4, m])
        poses, classes, groups = [], [], []
        for view in range(len(expressions.VIEW_YAWS)):
            for c, cls in enumerate(expressions.EXPRESSION_CLASSES):
                poses.append(expressions.expression_pose(cls, view, rng))
                classes.append(c)
                groups.append(view)
        frames = _render(identity, poses, size)
        descriptors.append(encode_drivers(model, frames.raw, frames.landmarks).cpu().numpy())
        pixels.append(_pixels(frames.raw, cfg.probe_pixels))
        centred = frames.landmarks - frames.landmarks.mean(1, keepdims=True)
        eyes = np.linalg.norm(frames.landmarks[:, 36] - frames.landmarks[:, 45], axis=1)
        points.append((centred / eyes[:, None, None]).reshape(len(poses), -1))
        labels += classes
        views += groups
        people += [m] * len(poses)
    label, person, group = np.asarray(labels), np.asarray(people), np.asarray(views)

    def table(x: list[np.ndarray]) -> dict[str, Any]:
        found = retrieval_precision(np.concatenate(x), label, person, group)
        return {str(r.k): r.as_dict() for r in found}

    return {
        "definition": expressions.describe(),
        "identities": cfg.retrieval_identities,
        "faces": len(label),
        "gallery": "same view, other identities; cosine similarity; every face queries once",
        "pose_descriptor": table(descriptors),
        "reference_landmarks": table(points),
        "reference_pixels": table(pixels),
    }


# --- the suite -----------------------------------------------------------------------------------
def run_synthetic(
    scored: ScoredModel, cfg: SyntheticSuiteConfig, lpips: LPIPS | None = None
) -> SyntheticResult:
    """Run every part of the synthetic suite; deterministic for a given seed and thread count."""
    if cfg.identities < 2:
        raise ValueError("cross-person reenactment needs at least 2 identities")
    if cfg.pose_probe_identities < 2 or cfg.pose_probe_frames < 2:
        raise ValueError("the pose probes need at least 2 identities with 2 frames each")
    if cfg.retrieval_identities < 2:
        raise ValueError("retrieval across identities needs at least 2 identities")
    if cfg.finetune_mode not in ("full", "light"):
        raise ValueError(f"finetune_mode must be full or light, got {cfg.finetune_mode!r}")
    model = scored.model
    torch.manual_seed(cfg.seed)
    identities = [identity_for(cfg.seed, EVAL_FIRST + i) for i in range(cfg.identities)]
    timings: dict[str, float] = {}

    start = time.perf_counter()
    results, samples = _cross_person(scored, cfg, identities, lpips)
    timings["cross_person"] = time.perf_counter() - start
    start = time.perf_counter()
    leakage = _identity_leakage(cfg, model.config.image_size, identities, results)
    timings["identity_leakage"] = time.perf_counter() - start
    start = time.perf_counter()
    data = _probe_data(model, cfg)
    pose = _pose_probes(data, cfg)
    timings["pose_descriptor"] = time.perf_counter() - start
    start = time.perf_counter()
    keypoints = _keypoint_regression(data, cfg)
    timings["keypoint_regression"] = time.perf_counter() - start
    start = time.perf_counter()
    retrieval = _expression_retrieval(model, cfg)
    timings["expression_retrieval"] = time.perf_counter() - start

    notes = []
    if lpips is None:
        notes.append("LPIPS off: no --lpips-weights (pretrained weights are never downloaded)")
    why_not = can_finetune(model)
    if cfg.finetune_steps <= 0:
        notes.append("fine-tuned avatars off: pass --finetune-steps N")
    elif why_not is not None:
        notes.append(f"fine-tuned avatars skipped: {why_not}")
    if keypoints is None:
        notes.append("keypoint regression off: --keypoint-steps 0")
    tuned = results.get("finetuned")
    ordered = [s for _, s in sorted(samples, key=lambda kv: kv[0])]
    metrics = {
        "suite": "synthetic",
        "config": asdict(cfg),
        "cross_person": _summary(results["zero_shot"], cfg, "zero_shot", lpips),
        "cross_person_finetuned": (
            _summary(tuned, cfg, "finetuned", lpips) if tuned is not None else None
        ),
        "identity_leakage": leakage,
        "pose_descriptor": pose,
        "expression_retrieval": retrieval,
        "keypoint_regression": keypoints,
        "notes": notes,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    return SyntheticResult(metrics, ordered[: cfg.grid_pairs])
