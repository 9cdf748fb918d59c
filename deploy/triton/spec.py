"""The Triton side of the wire contract: model names, tensor names, dtypes and shapes.

`service/triton.py` holds the client side of the same contract (its own constants, checked
against the served model metadata at startup). Images are NCHW RGB at the checkpoint's
image_size S; B is the batch (dynamic batching), K the number of identity photos.

    identity_encoder  IMAGES uint8 (K, 3, S, S) -> IDENTITY fp32 (D_id,)   (no batching)
    pose_encoder      FRAMES uint8 (B, 3, S, S) -> POSE fp32 (B, D_pose)
    generator         POSE fp32 (B, D_pose), IDENTITY fp32 (B, D_id) and/or AVATAR_ID bytes
                      (B, 1) -> RGB fp32 (B, 3, S, S), MASK fp32 (B, 1, S, S)
    reenact           FRAMES + IDENTITY and/or AVATAR_ID -> RGB, MASK
                      (BLS: pose_encoder then generator, in one client call)

A row with a non-empty AVATAR_ID is rendered by that fine-tuned avatar's weights (Python
flavour only); a row without one is zero-shot and uses its IDENTITY row with the shared
weights. RGB is premultiplied by MASK, both in [0, 1], as in `model.inference.RenderOutput`.
"""

from __future__ import annotations

import re
from typing import Final

IDENTITY_ENCODER: Final = "identity_encoder"
POSE_ENCODER: Final = "pose_encoder"
GENERATOR: Final = "generator"
REENACT: Final = "reenact"
MODELS: Final = (IDENTITY_ENCODER, POSE_ENCODER, GENERATOR, REENACT)

IMAGES: Final = "IMAGES"
FRAMES: Final = "FRAMES"
IDENTITY: Final = "IDENTITY"
POSE: Final = "POSE"
AVATAR_ID: Final = "AVATAR_ID"
RGB: Final = "RGB"
MASK: Final = "MASK"

# Avatar ids name files under the avatar directory, so they are restricted to a safe alphabet.
AVATAR_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
AVATAR_SUFFIX: Final = ".safetensors"


def is_valid_avatar_id(avatar_id: str) -> bool:
    return AVATAR_ID_PATTERN.fullmatch(avatar_id) is not None
