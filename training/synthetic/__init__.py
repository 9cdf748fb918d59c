"""Procedural talking heads with known identity and pose: data for CPU training and ground truth.

`render(identity, pose, size)` is pure; `python -m training.synthetic` writes a clip dataset.
"""

from training.synthetic.cli import main
from training.synthetic.dataset import (
    GENERATOR_VERSION,
    SynthConfig,
    generate,
    generate_clip,
    render_clip,
    write_synthetic_clip,
)
from training.synthetic.grid import GRID_POSES, render_grid, write_grid
from training.synthetic.params import (
    BACKGROUNDS,
    DEFAULT_FPS,
    HAIR_STYLES,
    RGB,
    IdentityParams,
    PoseParams,
    identity_for,
    poses_for,
    sample_identity,
    sample_poses,
)
from training.synthetic.render import NUM_LANDMARKS, SyntheticFrame, render

__all__ = [
    "BACKGROUNDS",
    "DEFAULT_FPS",
    "GENERATOR_VERSION",
    "GRID_POSES",
    "HAIR_STYLES",
    "NUM_LANDMARKS",
    "RGB",
    "IdentityParams",
    "PoseParams",
    "SynthConfig",
    "SyntheticFrame",
    "generate",
    "generate_clip",
    "identity_for",
    "main",
    "poses_for",
    "render",
    "render_clip",
    "render_grid",
    "sample_identity",
    "sample_poses",
    "write_grid",
    "write_synthetic_clip",
]
