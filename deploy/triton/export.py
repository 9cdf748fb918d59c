"""`python -m deploy.triton.export CHECKPOINT OUT`: build a Triton model repository.

Two flavours from one description of the models (names, tensors, batching, instances):
- `python`: Python-backend models running our torch code. Runs on the tritonserver bundled
  in nvidia-pytriton (CPU here) and on the official image (CPU or GPU); serves fine-tuned
  avatars from `--avatar-dir` on demand through a bounded LRU cache.
- `onnx`: ONNX models for the onnxruntime backend of the official image (TensorRT through
  its execution accelerator when `--dtype fp16` on GPU). Zero-shot avatars only.
Both get the same `reenact` model (BLS, Python backend), so clients see one contract.
The repository is written to a temp folder and renamed, so a failed build leaves nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deploy.triton import spec
from model.checkpoint import CheckpointError, read_header
from model.config import ModelConfig

WEIGHTS_FILE = "model.safetensors"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RepositoryConfig:
    flavour: Literal["python", "onnx"] = "python"
    device: Literal["cpu", "gpu"] = "cpu"
    dtype: Literal["fp32", "fp16"] = "fp32"  # fp16 applies on GPU only
    instances: int = 1  # per model and per GPU (or on the CPU)
    max_batch: int = 32  # frames per execution of pose_encoder, generator and reenact
    # A lone real-time frame waits out the queue delay, so keep it well under a frame time.
    queue_delay_us: int = 500
    threads: int = 1  # torch threads per Python-backend instance; on CPU, 1 and more instances
    # beat more threads (2 threads on 2 cores ran ~30x slower under load)
    avatar_dir: Path | None = None  # fine-tuned avatars (python flavour)
    avatar_cache_mb: float = 512.0
    # GPU, python flavour: torch.compile mode. "reduce-overhead" (CUDA graphs) took one
    # official-256 frame from 10.3 to 1.2 ms on an H200; each new batch size is recorded once.
    compile: str = ""

    def preferred_batches(self) -> list[int]:
        sizes = [s for s in (4, 8, 16, 32, 64) if s <= self.max_batch]
        return sorted({*sizes[-3:], self.max_batch})


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton TYPE_* without the prefix
    dims: tuple[int, ...]
    optional: bool = False


def _tensors(cfg: ModelConfig, avatars: bool) -> dict[str, tuple[list[Tensor], list[Tensor]]]:
    """(inputs, outputs) per model; dims exclude the batch dim where max_batch_size > 0."""
    s, d_id, d_pose = cfg.image_size, cfg.identity_dim, cfg.pose_dim
    frames = Tensor(spec.FRAMES, "UINT8", (3, s, s))
    identity = Tensor(spec.IDENTITY, "FP32", (d_id,), optional=avatars)
    rendered = [Tensor(spec.RGB, "FP32", (3, s, s)), Tensor(spec.MASK, "FP32", (1, s, s))]
    avatar = [Tensor(spec.AVATAR_ID, "STRING", (1,), optional=True)] if avatars else []
    return {
        spec.IDENTITY_ENCODER: (
            [Tensor(spec.IMAGES, "UINT8", (-1, 3, s, s))],
            [Tensor(spec.IDENTITY, "FP32", (d_id,))],
        ),
        spec.POSE_ENCODER: ([frames], [Tensor(spec.POSE, "FP32", (d_pose,))]),
        spec.GENERATOR: ([Tensor(spec.POSE, "FP32", (d_pose,)), identity, *avatar], rendered),
        spec.REENACT: ([frames, identity, *avatar], rendered),
    }


def _block(kind: str, tensors: Iterable[Tensor]) -> str:
    items = []
    for t in tensors:
        dims = ", ".join(str(d) for d in t.dims)
        optional = "\n    optional: true" if t.optional else ""
        items.append(
            f'  {{\n    name: "{t.name}"\n    data_type: TYPE_{t.dtype}\n    dims: [ {dims} ]'
            f"{optional}\n  }}"
        )
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def model_config(
    name: str, model_cfg: ModelConfig, repo: RepositoryConfig, parameters: dict[str, str]
) -> str:
    """config.pbtxt text for one model."""
    onnx = repo.flavour == "onnx" and name != spec.REENACT
    avatars = repo.flavour == "python"
    inputs, outputs = _tensors(model_cfg, avatars)[name]
    batched = name != spec.IDENTITY_ENCODER
    lines = [f'name: "{name}"', 'backend: "onnxruntime"' if onnx else 'backend: "python"']
    lines.append(f"max_batch_size: {repo.max_batch if batched else 0}")
    text = "\n".join(lines) + "\n" + _block("input", inputs) + _block("output", outputs)
    if batched:
        sizes = ", ".join(str(b) for b in repo.preferred_batches())
        text += (
            f"dynamic_batching {{\n  preferred_batch_size: [ {sizes} ]\n"
            f"  max_queue_delay_microseconds: {repo.queue_delay_us}\n}}\n"
        )
    # The BLS model only waits on the others: one CPU instance per expected concurrent stream.
    kind = "KIND_GPU" if repo.device == "gpu" and name != spec.REENACT else "KIND_CPU"
    count = max(repo.instances, 2) if name == spec.REENACT else repo.instances
    text += f"instance_group [\n  {{\n    kind: {kind}\n    count: {count}\n  }}\n]\n"
    if onnx and repo.device == "gpu" and repo.dtype == "fp16":
        text += (
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n"
            '      { name: "tensorrt"\n        parameters { key: "precision_mode" '
            'value: "FP16" } }\n    ]\n  }\n}\n'
        )
    for key, value in parameters.items():
        text += f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
    return text


def _model_py(name: str) -> str:
    cls = "".join(part.title() for part in name.split("_")) + "Model"
    return (
        f'"""Triton model `{name}`; written by deploy.triton.export (see python_models.py)."""\n'
        "import os\nimport sys\n\n"
        f'sys.path.insert(0, os.environ.get("PROJECT_ROOT", {str(PROJECT_ROOT)!r}))\n'
        f"from deploy.triton.python_models import {cls} as TritonPythonModel  # noqa: E402\n"
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no extra disk for three copies of the weights) when on one filesystem."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_repository(checkpoint: Path, out: Path, repo: RepositoryConfig) -> Path:
    """Write the four models for `checkpoint` to `out` (replacing it) and return `out`."""
    model_cfg, _ = read_header(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        onnx_files: dict[str, Path] = {}
        if repo.flavour == "onnx":
            from deploy.triton.onnx_export import export_onnx
            from model.inference import InferenceModel

            model = InferenceModel.from_checkpoint(checkpoint)
            onnx_files = export_onnx(model, tmp / "_onnx", fp16=repo.dtype == "fp16")
        for name in spec.MODELS:
            version = tmp / name / "1"
            version.mkdir(parents=True)
            params: dict[str, str] = {}
            if name in onnx_files:
                onnx_files[name].replace(version / "model.onnx")
            else:
                (version / "model.py").write_text(_model_py(name))
            if name not in onnx_files and name != spec.REENACT:  # the BLS holds no weights
                _link_or_copy(checkpoint, version / WEIGHTS_FILE)
                params = {"checkpoint": WEIGHTS_FILE, "dtype": repo.dtype}
                params["threads"] = str(repo.threads)
                if repo.compile:
                    params["compile"] = repo.compile
                if name == spec.GENERATOR and repo.avatar_dir is not None:
                    Path(repo.avatar_dir).mkdir(parents=True, exist_ok=True)
                    params["avatar_dir"] = str(Path(repo.avatar_dir).resolve())
                    params["avatar_cache_mb"] = str(repo.avatar_cache_mb)
            (tmp / name / "config.pbtxt").write_text(model_config(name, model_cfg, repo, params))
        shutil.rmtree(tmp / "_onnx", ignore_errors=True)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.triton.export", description=__doc__)
    p.add_argument("checkpoint", type=Path, help="checkpoint in the model package's format")
    p.add_argument("out", type=Path, help="repository folder to write (replaced)")
    p.add_argument("--flavour", choices=("python", "onnx"), default="python")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--queue-delay-us", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="torch threads per instance (0: all)")
    p.add_argument("--avatar-dir", type=Path, default=None, help="fine-tuned avatars")
    p.add_argument("--avatar-cache-mb", type=float, default=512.0)
    p.add_argument("--compile", default="", help="GPU: torch.compile mode, e.g. reduce-overhead")
    a = p.parse_args(argv)
    if a.instances < 1 or a.max_batch < 1 or a.queue_delay_us < 0 or a.avatar_cache_mb <= 0:
        p.error("--instances and --max-batch must be >= 1, --queue-delay-us >= 0")
    if a.flavour == "onnx" and a.avatar_dir is not None:
        p.error("--avatar-dir needs the python flavour (the ONNX models serve zero-shot avatars)")
    repo = RepositoryConfig(
        flavour=a.flavour, device=a.device, dtype=a.dtype, instances=a.instances,
        max_batch=a.max_batch, queue_delay_us=a.queue_delay_us, threads=a.threads,
        avatar_dir=a.avatar_dir, avatar_cache_mb=a.avatar_cache_mb, compile=a.compile,
    )  # fmt: skip
    try:
        out = build_repository(a.checkpoint, a.out, repo)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
