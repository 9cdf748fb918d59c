"""Latent pose reenactment networks (Burkov et al., CVPR 2020), faithful to the official code.

`model` is pure PyTorch: it imports nothing of the service, downloads nothing and picks no
device at import time. Start with `model.config.ModelConfig` and `model.inference.InferenceModel`.
"""

from model.config import PRESETS, ModelConfig

__all__ = ["PRESETS", "ModelConfig"]
