"""ONNX export for Triton: onnxruntime matches eager torch and the graphs match the spec."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from deploy.triton import spec
from deploy.triton.onnx_export import export_onnx, main, verify_onnx
from model.config import ModelConfig
from model.inference import InferenceModel
from model.layers import AdaIN
from model.reenactor import Reenactor

DEMO = Path(__file__).resolve().parents[2] / "checkpoints" / "demo-tiny-64.safetensors"
FILES = {f"{name}.onnx" for name in (spec.IDENTITY_ENCODER, spec.POSE_ENCODER, spec.GENERATOR)}
U8, F32 = onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT


@pytest.fixture(scope="module", params=["random", "demo"])
def model(request: pytest.FixtureRequest) -> InferenceModel:
    if request.param == "demo":
        if not DEMO.exists():
            pytest.skip(f"{DEMO} not present")
        return InferenceModel.from_checkpoint(DEMO)
    torch.manual_seed(0)
    return InferenceModel(Reenactor(ModelConfig.preset("tiny-64")))


@pytest.fixture(scope="module")
def fp32_dir(model: InferenceModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx-fp32")
    export_onnx(model, out)
    return out


@pytest.fixture(scope="module")
def fp16_dir(model: InferenceModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx-fp16")
    export_onnx(model, out, fp16=True)
    return out


def expected_interface(cfg: ModelConfig) -> dict[str, tuple[list[tuple], list[tuple]]]:
    """(inputs, outputs) per model from the spec docstring: (name, dtype, shape)."""
    s, d_id, d_pose = cfg.image_size, cfg.identity_dim, cfg.pose_dim
    return {
        spec.IDENTITY_ENCODER: (
            [(spec.IMAGES, U8, ("K", 3, s, s))],
            [(spec.IDENTITY, F32, (d_id,))],
        ),
        spec.POSE_ENCODER: (
            [(spec.FRAMES, U8, ("B", 3, s, s))],
            [(spec.POSE, F32, ("B", d_pose))],
        ),
        spec.GENERATOR: (
            [(spec.IDENTITY, F32, ("B", d_id)), (spec.POSE, F32, ("B", d_pose))],
            [(spec.RGB, F32, ("B", 3, s, s)), (spec.MASK, F32, ("B", 1, s, s))],
        ),
    }


def signature(values: list[onnx.ValueInfoProto]) -> list[tuple]:
    """(name, dtype, shape) with symbolic dims as their names: what Triton reads."""
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim)
        out.append((v.name, t.elem_type, dims))
    return out


@pytest.mark.parametrize(("batch", "k"), [(1, 1), (5, 3)])
def test_fp32_matches_eager(model: InferenceModel, fp32_dir: Path, batch: int, k: int) -> None:
    """Batch and K differ from the traced example (2, 2): the leading axes are dynamic."""
    errors = verify_onnx(model, fp32_dir, batch=batch, k=k, seed=batch)
    assert set(errors) == {spec.IDENTITY_ENCODER, spec.POSE_ENCODER, spec.GENERATOR}
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_interface_matches_spec(
    model: InferenceModel, precision: str, request: pytest.FixtureRequest
) -> None:
    """fp16 graphs keep the uint8 / float32 wire dtypes; only the leading axis is dynamic."""
    out_dir: Path = request.getfixturevalue(f"{precision}_dir")
    assert {p.name for p in out_dir.iterdir()} == FILES  # no temp files left behind
    for name, (inputs, outputs) in expected_interface(model.config).items():
        proto = onnx.load(str(out_dir / f"{name}.onnx"))
        assert signature(list(proto.graph.input)) == inputs, name
        assert signature(list(proto.graph.output)) == outputs, name


def test_fp16_is_close_and_half(model: InferenceModel, fp16_dir: Path) -> None:
    """onnxruntime's CPU provider runs the fp16 graph (casting around kernels it lacks)."""
    errors = verify_onnx(model, fp16_dir, batch=2, k=3)
    assert max(errors.values()) < 5e-2, errors
    proto = onnx.load(str(fp16_dir / f"{spec.GENERATOR}.onnx"))
    weights = {i.name: i.data_type for i in proto.graph.initializer if len(i.dims) == 4}
    assert weights and set(weights.values()) == {onnx.TensorProto.FLOAT16}
    # Convolutions run in half, instance-norm statistics in float32.
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.value_info}
    convs = [types[n.input[0]] for n in inferred.node if n.op_type == "Conv"]
    norms = [types[n.input[0]] for n in inferred.node if n.op_type == "InstanceNormalization"]
    assert convs and set(convs) == {onnx.TensorProto.FLOAT16}
    assert norms and set(norms) == {F32}


def test_export_leaves_the_model_untouched(model: InferenceModel, fp16_dir: Path) -> None:
    assert all(p.dtype == torch.float32 for p in model.net.parameters())
    assert any(isinstance(m, AdaIN) for m in model.net.generator.modules())


def test_cli_exports_and_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not DEMO.exists():
        pytest.skip(f"{DEMO} not present")
    assert main([str(DEMO), str(tmp_path / "out"), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in (tmp_path / "out").iterdir()} == FILES
    for name in (spec.IDENTITY_ENCODER, spec.POSE_ENCODER, spec.GENERATOR):
        assert str(tmp_path / "out" / f"{name}.onnx") in printed
        assert f"{name}: max abs error" in printed
