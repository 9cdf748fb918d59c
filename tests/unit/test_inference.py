"""The inference facade: tensor conventions, dtypes and input validation."""

import pytest
import torch

from model.config import ModelConfig
from model.inference import InferenceModel
from model.reenactor import Reenactor


@pytest.fixture(scope="module")
def model() -> InferenceModel:
    torch.manual_seed(0)
    return InferenceModel(Reenactor(ModelConfig.preset("tiny-64")))


def test_conventions(model: InferenceModel) -> None:
    identity = model.embed_identity(torch.rand(3, 3, 64, 64))
    assert identity.shape == (512,) and identity.dtype == torch.float32
    poses = model.encode_pose(torch.rand(5, 3, 64, 64))
    assert poses.shape == (5, 256) and poses.dtype == torch.float32
    out = model.render(identity, poses)
    assert out.rgb.shape == (5, 3, 64, 64) and out.mask.shape == (5, 1, 64, 64)
    assert out.rgb.dtype == out.mask.dtype == torch.float32
    assert out.rgb.min() >= 0 and out.rgb.max() <= 1
    assert out.mask.min() >= 0 and out.mask.max() <= 1
    # rgb is premultiplied: it can never exceed the mask.
    assert (out.rgb <= out.mask + 1e-6).all()


def test_uint8_frames_match_float_frames(model: InferenceModel) -> None:
    frames = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(model.encode_pose(frames), model.encode_pose(frames / 255))


def test_per_frame_identities_and_reenact(model: InferenceModel) -> None:
    frames = torch.rand(2, 3, 64, 64)
    identity = model.embed_identity(frames)
    a = model.reenact(identity, frames)
    b = model.render(identity.expand(2, -1), model.encode_pose(frames))
    torch.testing.assert_close(a.rgb, b.rgb)


def test_frames_are_independent_of_batching(model: InferenceModel) -> None:
    """Eval mode: a frame's output must not depend on its batch neighbours."""
    frames = torch.rand(4, 3, 64, 64)
    identity = model.embed_identity(frames[:1])
    together = model.reenact(identity, frames).rgb
    alone = torch.cat([model.reenact(identity, f[None]).rgb for f in frames])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_bfloat16_autocast_is_close_to_float32() -> None:
    torch.manual_seed(0)
    net = Reenactor(ModelConfig.preset("tiny-64"))
    fp32, bf16 = InferenceModel(net), InferenceModel(net, dtype=torch.bfloat16)
    frames = torch.rand(2, 3, 64, 64)
    identity = fp32.embed_identity(frames)
    a, b = fp32.reenact(identity, frames), bf16.reenact(identity, frames)
    assert b.rgb.dtype == torch.float32
    assert (a.rgb - b.rgb).abs().max() < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = Reenactor(ModelConfig.preset("tiny-64"))
    cpu, gpu = InferenceModel(net), InferenceModel(net, device="cuda", dtype=dtype)
    frames = torch.rand(2, 3, 64, 64)
    identity = cpu.embed_identity(frames)
    a, b = cpu.reenact(identity, frames), gpu.reenact(identity, frames)
    assert (a.rgb - b.rgb.cpu()).abs().max() < 0.05


def test_bad_inputs_raise_value_errors(model: InferenceModel) -> None:
    with pytest.raises(ValueError, match=r"images must be \(N, 3, 64, 64\)"):
        model.encode_pose(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="at least one frame"):
        model.encode_pose(torch.rand(0, 3, 64, 64))
    with pytest.raises(ValueError, match="uint8 or floating"):
        model.encode_pose(torch.zeros(1, 3, 64, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="poses must be"):
        model.render(torch.zeros(512), torch.zeros(2, 128))
    with pytest.raises(ValueError, match="identity must be"):
        model.render(torch.zeros(256), torch.zeros(2, 256))
    with pytest.raises(ValueError, match="dtype"):
        InferenceModel(Reenactor(ModelConfig.preset("tiny-64")), dtype=torch.float64)


@pytest.mark.slow
def test_torch_compile_gives_the_same_frames() -> None:
    """Optional torch.compile path (about a minute of inductor compilation on 2 cores)."""
    torch.manual_seed(0)
    net = Reenactor(ModelConfig.preset("tiny-64"))
    eager, compiled = InferenceModel(net), InferenceModel(net, compile=True)
    frames = torch.rand(2, 3, 64, 64)
    identity = eager.embed_identity(frames)
    torch.testing.assert_close(
        compiled.reenact(identity, frames).rgb,
        eager.reenact(identity, frames).rgb,
        atol=1e-5,
        rtol=1e-4,
    )
