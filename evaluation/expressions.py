"""Expression classes and head-rotation groups of the synthetic retrieval test (paper, Table 1).

The paper retrieves Multi-PIE images by pose descriptor: six emotion labels, people in several
camera orientations, queries matched within their orientation group. Here the renderer's
expression parameters define six classes, and three yaw views stand in for the camera groups.
Each class is a box of parameter values, so two faces of a class differ a little in expression
and more in who they are and how the head is held (jittered pitch, roll, offset, scale):
retrieving the class means reading the expression and ignoring identity and head pose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.synthetic import PoseParams

Range = tuple[float, float]


@dataclass(frozen=True)
class ExpressionClass:
    """Uniform ranges of the expression parameters that make up one class."""

    name: str
    mouth_open: Range = (0.0, 0.1)
    smile: Range = (0.0, 0.1)
    blink: Range = (0.0, 0.1)  # both eyes, each drawn separately
    brow_raise: Range = (-0.1, 0.1)


# Six classes, like Multi-PIE's six emotion labels; the boxes do not overlap in at least one
# parameter, so every rendered face has exactly one true class.
EXPRESSION_CLASSES = (
    ExpressionClass("neutral"),
    ExpressionClass("smile", smile=(0.8, 1.0), brow_raise=(0.0, 0.2)),
    ExpressionClass("surprise", mouth_open=(0.6, 0.8), brow_raise=(0.75, 1.0)),
    ExpressionClass("squint", smile=(0.0, 0.2), blink=(0.6, 0.8), brow_raise=(-0.5, -0.3)),
    ExpressionClass("frown", blink=(0.0, 0.2), brow_raise=(-1.0, -0.75)),
    ExpressionClass("scream", mouth_open=(0.85, 1.0), brow_raise=(-0.8, -0.55)),
)
VIEW_YAWS = (-0.35, 0.0, 0.35)  # radians: half-profile left, frontal, half-profile right
VIEW_JITTER = {"yaw": 0.05, "pitch": 0.1, "roll": 0.08, "tx": 0.02, "ty": 0.02, "scale": 0.05}


def expression_pose(cls: ExpressionClass, view: int, rng: np.random.Generator) -> PoseParams:
    """A random face of class `cls` seen from view group `view` (an index into VIEW_YAWS)."""

    def draw(r: Range) -> float:
        return float(rng.uniform(*r))

    def jitter(name: str) -> float:
        return float(rng.uniform(-VIEW_JITTER[name], VIEW_JITTER[name]))

    return PoseParams(
        yaw=VIEW_YAWS[view] + jitter("yaw"),
        pitch=jitter("pitch"),
        roll=jitter("roll"),
        mouth_open=draw(cls.mouth_open),
        smile=draw(cls.smile),
        blink_left=draw(cls.blink),
        blink_right=draw(cls.blink),
        brow_raise=draw(cls.brow_raise),
        tx=jitter("tx"),
        ty=jitter("ty"),
        scale=1.0 + jitter("scale"),
    )


def describe() -> dict[str, object]:
    """The class and view definitions, for metrics.json: what a retrieval score is about."""
    return {
        "classes": {
            c.name: {
                "mouth_open": c.mouth_open,
                "smile": c.smile,
                "blink_left_and_right": c.blink,
                "brow_raise": c.brow_raise,
            }
            for c in EXPRESSION_CLASSES
        },
        "view_yaws_rad": VIEW_YAWS,
        "view_jitter": VIEW_JITTER,
    }
