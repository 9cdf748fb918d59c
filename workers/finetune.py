"""The fine-tune stage of an avatar job (GPU): a thin task around training.finetune that
writes progress, stops on cancel, and resumes from the intermediate state a killed worker
left in the job's work directory. torch loads here only, on first use."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from service.db import session_scope
from service.jobs import transition
from service.models import Avatar, AvatarStatus, JobStatus
from service.storage import ArtifactStore
from workers.runtime import (
    PREPROCESS_SHARE,
    JobFailure,
    Reporter,
    WorkerContext,
    claim,
    discard_if_deleted,
)

logger = logging.getLogger(__name__)


def _remove(store: ArtifactStore, out: Path) -> None:
    shutil.rmtree(out.with_name(out.stem + ".work"), ignore_errors=True)
    out.unlink(missing_ok=True)
    out.with_suffix(".png").unlink(missing_ok=True)
    store.drop(out, out.with_suffix(".png"))


def finetune_job(ctx: WorkerContext, job_id: str) -> None:
    """Run the fine-tune stage of `job_id` (idempotent; see workers.runtime)."""
    from model.checkpoint import CheckpointError
    from training.finetune import FinetuneCancelled, FinetuneConfig, Progress, finetune
    from training.losses import LossWeights

    claimed = claim(ctx, job_id, "finetune")
    if claimed is None:
        return
    settings, store = ctx.settings, ctx.store
    crops_path = store.crops_path(claimed.tenant_id, claimed.avatar_id)
    store.pull(crops_path)  # preprocessed on another host; still missing: handled below
    try:
        with np.load(crops_path) as crops:
            images, masks = crops["images"], crops["masks"]
    except FileNotFoundError:
        discard_if_deleted(ctx, claimed)
        raise JobFailure(
            "preprocess_missing", "the avatar's crops are gone", retryable=True
        ) from None

    # Perceptual terms only where their weights are installed (nothing is downloaded);
    # without any, pixel L1 stands in for them (training.finetune's CLI default).
    official = LossWeights()
    perceptual = settings.vgg19_weights is not None or settings.vggface_weights is not None
    losses = dataclasses.replace(
        official,
        vgg19=official.vgg19 if settings.vgg19_weights else 0.0,
        vggface=official.vggface if settings.vggface_weights else 0.0,
        embedding_match=0.0,
        l1=0.0 if perceptual else 10.0,
    )
    config = FinetuneConfig(
        mode=claimed.params["fine_tune"],
        steps=claimed.params.get("steps"),
        losses=losses,
        vgg19_weights=str(settings.vgg19_weights) if settings.vgg19_weights else None,
        vggface_weights=str(settings.vggface_weights) if settings.vggface_weights else None,
        checkpoint_every=settings.finetune_checkpoint_every,
    )
    # Named by job id: a redelivered task finds the state its predecessor saved.
    out = store.finetune_path(claimed.tenant_id, claimed.avatar_id, job_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    reporter = Reporter(ctx, job_id, start=PREPROCESS_SHARE)
    reporter.update(0.0, "finetune", force=True)
    first_step: int | None = None

    def on_progress(p: Progress) -> None:
        nonlocal first_step
        first_step = first_step or p.step
        reporter.update(p.step / p.total, "finetune", force=p.step == p.total)

    try:
        result = finetune(
            settings.base_checkpoint,
            images,
            masks,
            out,
            config,
            work_dir=out.with_name(out.stem + ".work"),
            progress=on_progress,
            should_cancel=lambda: reporter.canceled,
            device=settings.finetune_device,
        )
    except FinetuneCancelled:
        logger.info("job %s: fine-tune canceled", job_id)
        _remove(store, out)
        discard_if_deleted(ctx, claimed)
        return
    except CheckpointError as exc:
        raise JobFailure(
            "model_unavailable", "the base model cannot be read", retryable=True
        ) from exc
    except ValueError as exc:
        raise JobFailure("invalid_input", str(exc)) from exc

    summary: dict[str, Any] = {
        "avatar_id": claimed.avatar_id,
        "artifact": store.relative(result.avatar),
        "preview": store.relative(result.preview),
        "steps": result.steps,
        "final_l1": result.final_l1 if math.isfinite(result.final_l1) else None,
        # > 0: this attempt continued from a predecessor's intermediate state.
        "resumed_from_step": (first_step - 1) if first_step else result.steps,
    }
    # Before the job says they exist: reenactments elsewhere pull the weights, the API the preview.
    store.push(result.avatar, result.preview)
    with session_scope(ctx.sessions) as session:
        applied = transition(
            session,
            job_id,
            JobStatus.SUCCEEDED,
            from_=JobStatus.RUNNING,
            stage="done",
            result=summary,
        )
        avatar = session.get(Avatar, claimed.avatar_id)
        if applied and avatar is not None:
            # The fine-tuned weights replace the zero-shot avatar from now on.
            avatar.artifact_path = summary["artifact"]
            avatar.status = AvatarStatus.READY
    if not applied:
        _remove(store, out)
        discard_if_deleted(ctx, claimed)
        return
    logger.info("job %s: avatar %s fine-tuned (%d steps)", job_id, claimed.avatar_id, result.steps)
