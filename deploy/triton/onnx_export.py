"""Export the three Triton ONNX models: identity encoder, pose encoder and generator.

The graphs take and return exactly the wire tensors of `deploy.triton.spec`: uint8 images
are scaled to [0, 1] inside the graph (clients send a quarter of the float32 bytes) and the
generator premultiplies and clamps like `InferenceModel.render`, so the serving side runs no
torch code. We export from an `InferenceModel` because its spectral norm is already folded
and it is in eval mode, so every weight is a plain constant.

The TorchScript-based exporter (`dynamo=False`) is used: torch 2.14 still ships it
(deprecated), it needs no onnxscript, and these networks have no data-dependent control
flow for tracing to miss.

    python -m deploy.triton.onnx_export CHECKPOINT OUT_DIR [--opset 17] [--fp16] [--verify]
    python -m deploy.triton.onnx_export CHECKPOINT OUT_DIR --pose-encoder [--verify]

`--pose-encoder` writes only the pose encoder, as fp32.onnx and fp16.onnx (the same uint8
FRAMES in, float32 POSE out): the files `GET /v1/models/pose-encoder/*.onnx` serves to
pose-only stream clients, which compute descriptors themselves.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from deploy.triton import spec
from model.config import ModelConfig
from model.encoders import IdentityEncoder, PoseEncoder
from model.generator import Generator
from model.inference import InferenceModel
from model.layers import AdaIN

M = TypeVar("M", bound=nn.Module)

MODEL_NAMES: tuple[str, ...] = (spec.IDENTITY_ENCODER, spec.POSE_ENCODER, spec.GENERATOR)
# Graph input and output names per model, in order: the contract of deploy/triton/spec.py.
INPUTS: dict[str, tuple[str, ...]] = {
    spec.IDENTITY_ENCODER: (spec.IMAGES,),
    spec.POSE_ENCODER: (spec.FRAMES,),
    spec.GENERATOR: (spec.IDENTITY, spec.POSE),
}
OUTPUTS: dict[str, tuple[str, ...]] = {
    spec.IDENTITY_ENCODER: (spec.IDENTITY,),
    spec.POSE_ENCODER: (spec.POSE,),
    spec.GENERATOR: (spec.RGB, spec.MASK),
}
# `export_pose_encoder`'s files, by precision.
POSE_ENCODER_FILES: dict[str, str] = {"fp32": "fp32.onnx", "fp16": "fp16.onnx"}
# Symbolic leading dimensions: K photos for the (unbatched) identity encoder, B otherwise.
DYNAMIC_AXES: dict[str, dict[str, dict[int, str]]] = {
    spec.IDENTITY_ENCODER: {spec.IMAGES: {0: "K"}},
    spec.POSE_ENCODER: {spec.FRAMES: {0: "B"}, spec.POSE: {0: "B"}},
    spec.GENERATOR: {name: {0: "B"} for name in (spec.IDENTITY, spec.POSE, spec.RGB, spec.MASK)},
}


def interface(config: ModelConfig) -> dict[str, dict[str, tuple[int, tuple[int | str, ...]]]]:
    """Every graph input and output per model: (ONNX element type, shape; str = dynamic)."""
    s, d_id, d_pose = config.image_size, config.identity_dim, config.pose_dim
    u8, f32 = onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT
    return {
        spec.IDENTITY_ENCODER: {spec.IMAGES: (u8, ("K", 3, s, s)), spec.IDENTITY: (f32, (d_id,))},
        spec.POSE_ENCODER: {spec.FRAMES: (u8, ("B", 3, s, s)), spec.POSE: (f32, ("B", d_pose))},
        spec.GENERATOR: {
            spec.IDENTITY: (f32, ("B", d_id)),
            spec.POSE: (f32, ("B", d_pose)),
            spec.RGB: (f32, ("B", 3, s, s)),
            spec.MASK: (f32, ("B", 1, s, s)),
        },
    }


# --- export wrappers -------------------------------------------------------------------------
class ExportAdaIN(nn.Module):
    """`AdaIN` with explicit unit scale / zero shift for the exporter, normalising in fp32.

    The generator's first activation is an `expand` of its constant to a dynamic batch, so
    the tracer loses the channel count, which `InstanceNormalization` needs for its default
    scale and bias; passing them explicitly computes the same thing (x * 1 + 0). The
    statistics are taken in float32 even in a half-precision graph: the variance of a large
    feature map loses most of its digits in fp16 and the 1e-4 eps is near fp16's smallest
    normal. The per-sample affine then runs in the graph's dtype, as `AdaIN` does.
    """

    ones: torch.Tensor
    zeros: torch.Tensor

    def __init__(self, adain: AdaIN):
        super().__init__()
        self.channels = adain.channels
        self.eps = adain.eps
        self.register_buffer("ones", torch.ones(adain.channels))
        self.register_buffer("zeros", torch.zeros(adain.channels))

    def forward(self, x: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        h = F.instance_norm(x.float(), weight=self.ones, bias=self.zeros, eps=self.eps)
        return h.to(x.dtype) * gamma[:, :, None, None] + beta[:, :, None, None]


class _Wrapper(nn.Module):
    """Holds the network to export and the dtype it computes in (float32 or float16)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        # The arithmetic of InferenceModel._prepare (uint8 -> float32 / 255), then the dtype.
        return (images.float() / 255).to(self.dtype)


class IdentityEncoderExport(_Wrapper):
    """IMAGES uint8 (K, 3, S, S) -> IDENTITY float32 (D_id,): the mean of the K embeddings."""

    def __init__(self, encoder: IdentityEncoder, dtype: torch.dtype = torch.float32):
        super().__init__(dtype)
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # As Reenactor.embed_identity on one sample of K frames (InferenceModel.embed_identity).
        return self.encoder(self._images(images)[None]).mean.float()[0]


class PoseEncoderExport(_Wrapper):
    """FRAMES uint8 (B, 3, S, S) -> POSE float32 (B, D_pose)."""

    def __init__(self, encoder: PoseEncoder, dtype: torch.dtype = torch.float32):
        super().__init__(dtype)
        self.encoder = encoder

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.encoder(self._images(frames)).float()


class GeneratorExport(_Wrapper):
    """IDENTITY (B, D_id), POSE (B, D_pose) float32 -> RGB, MASK as `InferenceModel.render`."""

    def __init__(self, generator: Generator, dtype: torch.dtype = torch.float32):
        super().__init__(dtype)
        self.generator = generator

    def forward(self, identity: torch.Tensor, pose: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.generator(identity.to(self.dtype), pose.to(self.dtype))
        mask = out.mask.float()
        return (out.rgb.float() * mask).clamp(0, 1), mask.clamp(0, 1)


def _export_copy(module: M, dtype: torch.dtype) -> M:
    """A CPU eval-mode copy in `dtype` with `ExportAdaIN` layers; the model is untouched."""
    module = copy.deepcopy(module).cpu().to(dtype).eval()
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, AdaIN):
                setattr(parent, name, ExportAdaIN(child))  # float32 buffers, after .to(dtype)
    return module


def export_wrappers(model: InferenceModel, fp16: bool = False) -> dict[str, nn.Module]:
    """The three modules `export_onnx` traces, by model name (also handy for debugging).

    They compute in float32 whatever `model.dtype` is (autocast is not traced), or in
    float16 with float32 instance-norm statistics when `fp16`.
    """
    dtype = torch.float16 if fp16 else torch.float32
    net = model.net
    return {
        spec.IDENTITY_ENCODER: IdentityEncoderExport(
            _export_copy(net.identity_encoder, dtype), dtype
        ).eval(),
        spec.POSE_ENCODER: PoseEncoderExport(_export_copy(net.pose_encoder, dtype), dtype).eval(),
        spec.GENERATOR: GeneratorExport(_export_copy(net.generator, dtype), dtype).eval(),
    }


def example_inputs(
    model: InferenceModel, batch: int = 2, k: int = 2, seed: int = 0
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Random CPU inputs per model: uint8 photos and frames, in-distribution codes.

    The generator gets real identity embeddings (one per frame) and pose descriptors of
    random frames rather than Gaussian noise, so it is compared where its tanh head is not
    saturated and errors cannot hide.
    """
    size = model.config.image_size
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (k, 3, size, size), dtype=torch.uint8, generator=gen)
    frames = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    identities = torch.stack([model.embed_identity(f[None]) for f in frames]).cpu()
    poses = model.encode_pose(frames).cpu()
    return {
        spec.IDENTITY_ENCODER: (images,),
        spec.POSE_ENCODER: (frames,),
        spec.GENERATOR: (identities, poses),
    }


# --- export ----------------------------------------------------------------------------------
def export_onnx(
    model: InferenceModel, out_dir: Path, opset: int = 17, fp16: bool = False
) -> dict[str, Path]:
    """Write identity_encoder.onnx, pose_encoder.onnx and generator.onnx into `out_dir`.

    Each file is traced to a temporary name, checked with `onnx.checker`, then renamed, so
    a reader (or a Triton repository poll) never sees a partial or invalid model.

    `fp16=True` keeps the uint8 / float32 interface but stores half weights and computes in
    half precision (instance-norm statistics in float32). It is meant for GPU execution
    providers (CUDA, TensorRT): CPU providers have few or slow fp16 kernels.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrappers = export_wrappers(model, fp16)
    inputs = example_inputs(model)
    return {
        name: _trace(wrappers[name], inputs[name], name, out_dir / f"{name}.onnx", model, opset)
        for name in MODEL_NAMES
    }


def export_pose_encoder(model: InferenceModel, out_dir: Path, opset: int = 17) -> dict[str, Path]:
    """Write the pose encoder alone as fp32.onnx and fp16.onnx into `out_dir`, by precision.

    Both take uint8 FRAMES and return float32 POSE; fp16.onnx holds half weights and computes
    in half inside (half the download; onnxruntime's CPU provider casts around the few
    kernels it lacks). Same atomic write as `export_onnx`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = model.config.image_size
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=gen)
    paths: dict[str, Path] = {}
    for precision, file in POSE_ENCODER_FILES.items():
        dtype = torch.float16 if precision == "fp16" else torch.float32
        wrapper = PoseEncoderExport(_export_copy(model.net.pose_encoder, dtype), dtype).eval()
        paths[precision] = _trace(
            wrapper, (frames,), spec.POSE_ENCODER, out_dir / file, model, opset
        )
    return paths


def _trace(
    wrapper: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    name: str,
    path: Path,
    model: InferenceModel,
    opset: int,
) -> Path:
    """Trace `wrapper` as the graph of model `name` (the spec's tensor names) into `path`."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The legacy exporter's deprecation notice, and a false alarm about
            # instance_norm's train flag (it always uses per-sample statistics).
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*instance_norm.*train=True")
            # instance_norm's eager check that a map has more than one pixel.
            warnings.filterwarnings(
                "ignore", category=torch.jit.TracerWarning, module="torch.nn.functional"
            )
            torch.onnx.export(
                wrapper,
                inputs,
                str(tmp),
                dynamo=False,
                input_names=list(INPUTS[name]),
                output_names=list(OUTPUTS[name]),
                dynamic_axes=DYNAMIC_AXES[name],
                opset_version=opset,
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
        _pin_interface(proto, interface(model.config)[name])
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _pin_interface(
    proto: onnx.ModelProto, expected: dict[str, tuple[int, tuple[int | str, ...]]]
) -> None:
    """Check the graph's inputs and outputs against `expected` and write its static dims.

    The tracer cannot see through the generator's batch-sized `expand`, so RGB and MASK
    come out with anonymous spatial dims; Triton and TensorRT want them stated.
    """
    values = [*proto.graph.input, *proto.graph.output]
    if sorted(v.name for v in values) != sorted(expected):
        raise ValueError(f"graph tensors {[v.name for v in values]}, expected {list(expected)}")
    for value in values:
        elem_type, shape = expected[value.name]
        tensor = value.type.tensor_type
        if tensor.elem_type != elem_type or len(tensor.shape.dim) != len(shape):
            raise ValueError(f"{value.name}: traced as {tensor}, expected {elem_type} {shape}")
        for dim, size in zip(tensor.shape.dim, shape, strict=True):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size


# --- verification ----------------------------------------------------------------------------
def run_onnx(
    path: Path, inputs: Sequence[torch.Tensor], providers: Sequence[str] = ("CPUExecutionProvider",)
) -> list[np.ndarray]:
    """Run one exported model on `inputs` (fed by graph input order) with onnxruntime."""
    import onnxruntime as ort  # deferred: only verification needs the runtime

    session = ort.InferenceSession(str(path), providers=list(providers))
    feeds = {i.name: t.cpu().numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return list(session.run(None, feeds))


def eager_outputs(
    model: InferenceModel, inputs: dict[str, tuple[torch.Tensor, ...]]
) -> dict[str, list[np.ndarray]]:
    """What the public `InferenceModel` API returns for the same inputs, as numpy."""
    (images,) = inputs[spec.IDENTITY_ENCODER]
    (frames,) = inputs[spec.POSE_ENCODER]
    identity, pose = inputs[spec.GENERATOR]
    render = model.render(identity, pose)
    outs = {
        spec.IDENTITY_ENCODER: [model.embed_identity(images)],
        spec.POSE_ENCODER: [model.encode_pose(frames)],
        spec.GENERATOR: [render.rgb, render.mask],
    }
    return {name: [t.cpu().numpy() for t in ts] for name, ts in outs.items()}


def verify_onnx(
    model: InferenceModel,
    onnx_dir: Path,
    batch: int = 3,
    k: int = 2,
    seed: int = 0,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> dict[str, float]:
    """Max abs difference between onnxruntime and eager torch, per model (over all outputs).

    `batch` and `k` may differ from the export's example sizes to exercise the dynamic axes.
    """
    inputs = example_inputs(model, batch, k, seed)
    expected = eager_outputs(model, inputs)
    errors: dict[str, float] = {}
    for name in MODEL_NAMES:
        got = run_onnx(Path(onnx_dir) / f"{name}.onnx", inputs[name], providers)
        errors[name] = max(
            float(np.abs(g.astype(np.float64) - e).max())
            for g, e in zip(got, expected[name], strict=True)
        )
    return errors


def verify_pose_encoder(
    model: InferenceModel, onnx_dir: Path, batch: int = 3, seed: int = 0
) -> dict[str, float]:
    """Max abs difference of `export_pose_encoder`'s files from `InferenceModel.encode_pose`,
    by precision, on random uint8 frames."""
    size = model.config.image_size
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    expected = model.encode_pose(frames).cpu().numpy()
    return {
        precision: float(np.abs(run_onnx(Path(onnx_dir) / file, [frames])[0] - expected).max())
        for precision, file in POSE_ENCODER_FILES.items()
    }


# --- CLI -------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument(
        "--fp16", action="store_true", help="half-precision compute, for GPU execution providers"
    )
    parser.add_argument(
        "--verify", action="store_true", help="compare onnxruntime (CPU) with eager torch"
    )
    parser.add_argument(
        "--pose-encoder",
        action="store_true",
        help="only the pose encoder, as fp32.onnx and fp16.onnx (pose-only stream clients)",
    )
    args = parser.parse_args(argv)

    model = InferenceModel.from_checkpoint(args.checkpoint)
    start = time.perf_counter()
    if args.pose_encoder:
        paths = export_pose_encoder(model, args.out_dir, opset=args.opset)
    else:
        paths = export_onnx(model, args.out_dir, opset=args.opset, fp16=args.fp16)
    elapsed = time.perf_counter() - start
    for name, path in paths.items():
        print(f"{name}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(f"exported in {elapsed:.1f} s")
    if args.verify:
        verify = verify_pose_encoder if args.pose_encoder else verify_onnx
        for name, error in verify(model, args.out_dir).items():
            print(f"{name}: max abs error {error:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
