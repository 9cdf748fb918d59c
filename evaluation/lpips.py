"""LPIPS (Zhang et al. 2018), loaded only from local weight files; nothing is downloaded.

LPIPS needs two sets of weights: an ImageNet-trained backbone (AlexNet or VGG-16) and the
learned per-channel linear heads. Neither ships with any package here, so the metric is off
unless `--lpips-weights` names a file. That file is either a full LPIPS state dict (what
`lpips.LPIPS(net=...).state_dict()` saves: `net.sliceK.*`, `linK.model.1.weight`,
`scaling_layer.*`), or only the linear heads (the `lpips` package's `weights/v0.1/alex.pth`)
together with `--lpips-backbone`, a torchvision `alexnet()` / `vgg16()` state dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

Backbone = Literal["alex", "vgg"]
# Indices of torchvision's `features` in each of the five slices, and the channels they end on.
SLICES: dict[str, tuple[tuple[int, int], ...]] = {
    "alex": ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12)),
    "vgg": ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)),
}
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
# Inputs in [-1, 1] are shifted and scaled to the backbone's ImageNet statistics.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPSError(ValueError):
    """A weights file that does not make a complete LPIPS network."""


class _ScalingLayer(nn.Module):
    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


def _features(kind: Backbone) -> nn.Sequential:
    """torchvision's `alexnet().features` / `vgg16().features` layer for layer (same indices),
    built directly: the full constructors also initialise 60-140 M classifier weights."""
    if kind == "alex":
        return nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        )  # fmt: skip
    layers: list[nn.Module] = []
    channels = 3
    for width in (64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0):
        if width == 0:
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
    return nn.Sequential(*layers)


class _Slices(nn.Module):
    """The backbone cut into five stages, with torchvision's layer indices kept as names."""

    def __init__(self, kind: Backbone) -> None:
        super().__init__()
        features = _features(kind)  # weights come from the file, never a download
        for k, (start, stop) in enumerate(SLICES[kind], 1):
            stage = nn.Sequential()
            for i in range(start, stop):
                stage.add_module(str(i), features[i])
            self.add_module(f"slice{k}", stage)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            taps.append(x)
        return taps


class _Linear(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """Learned perceptual distance; module names match the `lpips` package's state dict."""

    def __init__(self, kind: Backbone = "alex") -> None:
        super().__init__()
        self.kind = kind
        self.scaling_layer = _ScalingLayer()
        self.net = _Slices(kind)
        for k, c in enumerate(CHANNELS[kind]):
            self.add_module(f"lin{k}", _Linear(c))
        self.eval().requires_grad_(False)

    @torch.inference_mode()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] -> (N,) float64 distances (0 for identical images)."""
        if a.shape != b.shape or a.dim() != 4:
            raise ValueError(f"expected two (N, 3, H, W) tensors, got {a.shape} {b.shape}")
        dev = self.scaling_layer.shift.device
        fa = self.net(self.scaling_layer(a.float().to(dev) * 2 - 1))
        fb = self.net(self.scaling_layer(b.float().to(dev) * 2 - 1))
        total = torch.zeros(len(a), device=dev)
        for k, (x, y) in enumerate(zip(fa, fb, strict=True)):
            diff = (_unit(x) - _unit(y)) ** 2
            total += getattr(self, f"lin{k}").model(diff).mean(dim=(1, 2, 3))
        return total.double().cpu()


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LPIPSError(f"LPIPS weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise LPIPSError(f"{path} holds no state dict")
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_lpips(weights: Path, backbone: Path | None = None, device: str = "cpu") -> LPIPS:
    """An LPIPS network from a full state dict, or from linear heads plus a backbone file."""
    state = _read(weights)
    # `lins.K.*` duplicates `linK.*` in the package's full state dict
    state = {k.replace("lins.", "lin", 1) if k.startswith("lins.") else k: v
             for k, v in state.items()}  # fmt: skip
    head = state.get("lin1.model.1.weight")
    if head is None:
        raise LPIPSError(f"{weights} has no LPIPS linear heads (lin0..lin4.model.1.weight)")
    kind: Backbone = "alex" if head.shape[1] == CHANNELS["alex"][1] else "vgg"
    net = LPIPS(kind)
    if backbone is not None:  # torchvision names: features.<index>.<weight|bias>
        for key, value in _read(backbone).items():
            parts = key.split(".")
            if len(parts) != 3 or parts[0] != "features":
                continue
            for k, (start, stop) in enumerate(SLICES[kind], 1):
                if start <= int(parts[1]) < stop:
                    state[f"net.slice{k}.{parts[1]}.{parts[2]}"] = value
    own = net.state_dict()
    missing = sorted(k for k in own if k not in state and not k.startswith("scaling_layer."))
    if missing:
        hint = "" if backbone else " (a file of linear heads only needs --lpips-backbone)"
        raise LPIPSError(f"LPIPS weights lack {len(missing)} tensors, e.g. {missing[0]}{hint}")
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if wrong:
        raise LPIPSError(f"LPIPS tensor {wrong[0]} has shape {tuple(state[wrong[0]].shape)}")
    net.load_state_dict({k: state.get(k, v) for k, v in own.items()})
    return net.to(device)
