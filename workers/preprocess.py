"""The preprocess stage of an avatar job (CPU): photos -> face crops at the model's size ->
foreground masks -> identity embedding (the zero-shot avatar, paper Sec. 3.1), then either
the job succeeds or it is handed to the fine-tune queue.

Crops follow the official recipe (media.crop): the largest face, a x1.8 square box.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from media.crop import crop_face
from media.errors import MediaError
from media.faces import shared_detector
from media.segmentation import ForegroundSegmenter
from service.config import Settings
from service.db import session_scope
from service.jobs import transition
from service.models import Avatar, AvatarStatus, Job, JobKind, JobStatus
from service.queue import FINETUNE_TASK
from service.triton import TritonBackend, TritonConfig
from service.uploads import load_photo
from workers.runtime import (
    PREPROCESS_SHARE,
    JobFailure,
    Reporter,
    WorkerContext,
    claim,
    discard_if_deleted,
)

logger = logging.getLogger(__name__)

# (N, S, S, 3) uint8 crops -> (identity_dim,) float32
Embedder = Callable[[np.ndarray], np.ndarray]


@lru_cache(maxsize=1)
def _segmenter() -> ForegroundSegmenter:
    return ForegroundSegmenter()


@lru_cache(maxsize=2)
def _image_size(checkpoint: Path) -> int:
    from model.checkpoint import CheckpointError, read_header  # torch: only in workers

    try:
        return read_header(checkpoint)[0].image_size
    except (CheckpointError, OSError) as exc:
        raise JobFailure(
            "model_unavailable", "the base model cannot be read", retryable=True
        ) from exc


@lru_cache(maxsize=2)
def _local_model(checkpoint: Path) -> object:
    from model.inference import InferenceModel

    return InferenceModel.from_checkpoint(checkpoint)


def identity_embedder(settings: Settings) -> Embedder:
    """Embed through Triton (`identity_backend="triton"`) or with PyTorch in this process."""
    if settings.identity_backend == "triton":

        def remote(crops: np.ndarray) -> np.ndarray:
            with TritonBackend(TritonConfig.from_settings(settings)) as backend:
                return backend.embed_identity(np.ascontiguousarray(crops.transpose(0, 3, 1, 2)))

        return remote

    def local(crops: np.ndarray) -> np.ndarray:
        import torch

        from model.inference import InferenceModel

        model = _local_model(settings.base_checkpoint)
        assert isinstance(model, InferenceModel)
        vector = model.embed_identity(torch.from_numpy(crops).permute(0, 3, 1, 2))
        return vector.cpu().numpy()

    return local


def crop_photos(
    photos: list[Path], size: int, max_pixels: int, report: Callable[[float], bool]
) -> tuple[np.ndarray, np.ndarray] | None:
    """(N, S, S, 3) crops and (N, S, S) uint8 masks; None if `report` says stop (canceled).

    Raises JobFailure `no_face` / `multiple_faces` / `not_an_image` naming the photo.
    """
    images, masks = [], []
    for i, path in enumerate(photos):
        where = f"photo {i + 1} of {len(photos)}"
        try:
            rgb = load_photo(path, max_pixels)
        except (OSError, ValueError) as exc:
            raise JobFailure("not_an_image", f"{where} cannot be decoded") from exc
        try:
            crop = crop_face(rgb, shared_detector().crop_box(rgb), size)
        except MediaError as exc:
            raise JobFailure(exc.code, f"{where}: {exc}") from exc
        except ValueError as exc:  # the crop box lies outside the frame
            raise JobFailure("no_face", f"{where}: {exc}") from exc
        mask = _segmenter().segment(crop.image)
        images.append(crop.image)
        masks.append(np.clip(mask * 255.0 + 0.5, 0, 255).astype(np.uint8))
        if not report((i + 1) / (len(photos) + 1)):
            return None
    return np.stack(images), np.stack(masks)


def preprocess_job(ctx: WorkerContext, job_id: str, embed: Embedder | None = None) -> None:
    """Run the preprocess stage of `job_id` (idempotent; see workers.runtime)."""
    with session_scope(ctx.sessions) as session:
        job = session.get(Job, job_id)
        if job is None:
            return
        avatar = session.get(Avatar, job.avatar_id) if job.avatar_id else None
        done = avatar is not None and avatar.identity_embedding is not None
        waiting = job.kind is JobKind.FINETUNE and job.status is JobStatus.QUEUED
        tenant_id, avatar_id = job.tenant_id, str(job.params["avatar_id"])
    if done:
        # A redelivery after this stage finished: the hand-off may be what failed.
        if waiting and ctx.store.pull(ctx.store.crops_path(tenant_id, avatar_id)):
            ctx.queue.enqueue(FINETUNE_TASK, job_id)
        return

    claimed = claim(ctx, job_id, "preprocess")
    if claimed is None:
        return
    settings, store = ctx.settings, ctx.store
    finetune = claimed.kind == JobKind.FINETUNE.value
    reporter = Reporter(ctx, job_id, end=PREPROCESS_SHARE if finetune else 1.0)
    reporter.update(0.0, "preprocess", force=True)

    store.pull_dir(store.photos_dir(claimed.tenant_id, claimed.avatar_id))  # uploaded elsewhere
    photos = store.photos(claimed.tenant_id, claimed.avatar_id)
    if not photos:
        raise JobFailure("no_photos", "the avatar's photos are gone")
    size = _image_size(settings.base_checkpoint)
    crops = crop_photos(photos, size, settings.max_photo_pixels, reporter.update)
    if crops is None:
        discard_if_deleted(ctx, claimed)
        return
    images, masks = crops
    crops_path = store.crops_path(claimed.tenant_id, claimed.avatar_id)
    store.write_arrays(crops_path, images=images, masks=masks)
    store.push(crops_path)  # before the fine-tune stage, maybe on another host, is queued
    if not reporter.update(len(photos) / (len(photos) + 1), "embedding", force=True):
        discard_if_deleted(ctx, claimed)
        return
    vector = np.asarray((embed or identity_embedder(settings))(images), dtype="<f4").reshape(-1)

    # The job's next state and the avatar's identity land together, or not at all.
    with session_scope(ctx.sessions) as session:
        if finetune:
            applied = transition(
                session,
                job_id,
                JobStatus.QUEUED,
                from_=JobStatus.RUNNING,
                stage="finetune_queued",
                progress=PREPROCESS_SHARE,
            )
        else:
            applied = transition(
                session,
                job_id,
                JobStatus.SUCCEEDED,
                from_=JobStatus.RUNNING,
                stage="done",
                result={"avatar_id": claimed.avatar_id},
            )
        avatar = session.get(Avatar, claimed.avatar_id)
        if applied and avatar is not None:
            avatar.identity_embedding = vector.tobytes()
            avatar.status = AvatarStatus.READY
    if not applied:  # canceled meanwhile
        discard_if_deleted(ctx, claimed)
        return
    logger.info("job %s: avatar %s is ready zero-shot", job_id, claimed.avatar_id)
    if finetune:
        ctx.queue.enqueue(FINETUNE_TASK, job_id)
