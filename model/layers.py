"""Building blocks shared by the generator and discriminator: spectral norm and AdaIN."""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

M = TypeVar("M", bound=nn.Module)


class SpectralNorm(nn.Module):
    """Spectral-norm parametrization with the power-iteration order of the legacy
    `torch.nn.utils.spectral_norm` the official code used (v from u, then u from v).

    torch's own parametrization updates u first, which changes the training dynamics of
    the released weights; the eval-mode weight W / (u . W v) is the same in both.
    """

    u: torch.Tensor  # (out_features,) left singular vector estimate
    v: torch.Tensor  # (in_features,) right singular vector estimate

    def __init__(self, weight: torch.Tensor, eps: float = 1e-4, init_iterations: int = 15):
        super().__init__()
        self.eps = eps
        out_features = weight.shape[0]
        in_features = weight[0].numel()
        u = F.normalize(weight.new_empty(out_features).normal_(), dim=0, eps=eps)
        v = F.normalize(weight.new_empty(in_features).normal_(), dim=0, eps=eps)
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        # The legacy hook starts from random u, v; a few iterations at construction (as
        # torch's parametrization does) make freshly initialised models usable in eval mode.
        if weight.device.type != "meta":
            self._power_iteration(weight.detach().flatten(1), init_iterations)

    @torch.no_grad()
    def _power_iteration(self, w: torch.Tensor, iterations: int) -> None:
        for _ in range(iterations):
            # In place (as the legacy hook), so DataParallel replicas update the shared buffers.
            F.normalize(torch.mv(w.t(), self.u), dim=0, eps=self.eps, out=self.v)
            F.normalize(torch.mv(w, self.v), dim=0, eps=self.eps, out=self.u)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        device = weight.device.type
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            # Keep sigma and the power iteration in fp32 under AMP.
            with torch.autocast(device, enabled=False):
                return self._normalize(weight)
        return self._normalize(weight)

    def _normalize(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.flatten(1)
        u, v = self.u, self.v
        if self.training:
            self._power_iteration(w.detach(), 1)
            # Clone so a graph built by an earlier forward is not invalidated by the update.
            u, v = u.clone(), v.clone()
        sigma = torch.dot(u.to(w.dtype), torch.mv(w, v.to(w.dtype)))
        return weight / sigma


def spectral_norm(module: nn.Module, eps: float = 1e-4, name: str = "weight") -> nn.Module:
    """Register `SpectralNorm` on `module.<name>` (dim 0, one power iteration per step)."""
    weight = getattr(module, name)
    parametrize.register_parametrization(module, name, SpectralNorm(weight, eps=eps))
    return module


def fold_spectral_norm(root: M) -> M:
    """Replace every spectral-norm parametrization by its current eval-mode weight.

    For export and inference speed: the folded module computes exactly what the
    parametrized one computes in eval mode, with plain `weight` parameters.
    """
    for module in list(root.modules()):
        if not parametrize.is_parametrized(module, "weight"):
            continue
        chain = module.get_submodule("parametrizations.weight")
        if any(isinstance(p, SpectralNorm) for p in chain.children()):
            was_training = module.training
            module.eval()  # evaluate without a power-iteration step
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            module.train(was_training)
    return root


def sn_conv(c_in: int, c_out: int, kernel: int, eps: float, bias: bool = True) -> nn.Conv2d:
    """Spectrally normalised conv with 'same' zero padding."""
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=bias)
    return spectral_norm(conv, eps)  # type: ignore[return-value]


class AdaIN(nn.Module):
    """Instance norm whose per-sample scale and bias come from the AdaIN MLP.

    Holds no parameters: `Generator` assigns `gamma`, `beta` (B, C) before each forward.
    """

    def __init__(self, channels: int, eps: float = 1e-4):
        super().__init__()
        self.channels = channels
        self.eps = eps

    def forward(self, x: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        x = F.instance_norm(x, eps=self.eps)
        return x * gamma[:, :, None, None] + beta[:, :, None, None]


class GeneratorBlock(nn.Module):
    """Pre-activation residual block: AdaIN -> ReLU -> [up] -> conv3 -> AdaIN -> ReLU -> conv3.

    The skip is [up] -> 1x1 conv (with bias) when upsampling or changing width, else identity;
    it has no normalisation (official layout; the paper draws AdaIN after each conv).
    """

    def __init__(self, c_in: int, c_out: int, upsample: bool, norm_eps: float, sn_eps: float):
        super().__init__()
        self.upsample = upsample
        self.norm1 = AdaIN(c_in, norm_eps)
        self.conv1 = sn_conv(c_in, c_out, 3, sn_eps, bias=False)
        self.norm2 = AdaIN(c_out, norm_eps)
        self.conv2 = sn_conv(c_out, c_out, 3, sn_eps, bias=False)
        self.skip = sn_conv(c_in, c_out, 1, sn_eps) if upsample or c_in != c_out else None

    def forward(self, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        b1, g1, b2, g2 = params
        h = F.relu(self.norm1(x, b1, g1))
        if self.upsample:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        h = self.conv2(F.relu(self.norm2(self.conv1(h), b2, g2)))
        skip = x if self.skip is None else self.skip(x)
        return h + skip


class DiscriminatorBlock(nn.Module):
    """ReLU -> conv3 -> ReLU -> conv3 -> [avgpool], plus a [1x1 conv ->] [avgpool] skip.

    The official block's first ReLU is in place, so its skip also sees relu(x); we apply
    the ReLU to the input of both paths to reproduce that without mutating the caller's map.
    """

    def __init__(self, c_in: int, c_out: int, downsample: bool, sn_eps: float):
        super().__init__()
        self.downsample = downsample
        self.conv1 = sn_conv(c_in, c_out, 3, sn_eps)
        self.conv2 = sn_conv(c_out, c_out, 3, sn_eps)
        self.skip = sn_conv(c_in, c_out, 1, sn_eps) if downsample or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        h = self.conv2(F.relu(self.conv1(x)))
        skip = x if self.skip is None else self.skip(x)
        if self.downsample:
            h, skip = F.avg_pool2d(h, 2), F.avg_pool2d(skip, 2)
        return h + skip
