"""Who an avatar is for the inference server: its zero-shot identity embedding, or - once
fine-tuned - the key Triton loads its own weights under (`<served dir>/<key>.safetensors`).

The reenact worker and the live stream both ask here, so an avatar renders the same way in
a video job and in a stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.models import Avatar
from service.storage import (
    ArtifactStore,
    publish_served_avatar,
    served_avatar_key,
    served_path,
)


@dataclass(frozen=True)
class Condition:
    """What the Triton adapter takes with the driving frames: one of the two."""

    identity: np.ndarray | None = None  # (D_id,) float32
    avatar_id: str | None = None


def avatar_condition(avatar: Avatar, store: ArtifactStore, served_dir: Path) -> Condition | None:
    """The avatar's condition, publishing fine-tuned weights for Triton first (idempotent);
    None while the avatar has no identity yet."""
    if avatar.artifact_path is not None:
        key = served_avatar_key(avatar.artifact_path)
        source = store.resolve(avatar.artifact_path)
        if not served_path(served_dir, key).is_file():
            store.pull(source)  # fine-tuned on another host: the bucket has the weights
        publish_served_avatar(source, served_dir, key)
        return Condition(avatar_id=key)
    if avatar.identity_embedding is None:
        return None
    return Condition(identity=np.frombuffer(avatar.identity_embedding, dtype="<f4").copy())
