"""Networks: official parameter counts, layout facts, shapes, ranges, gradients, determinism."""

import pytest
import torch
from torch import nn

from model.config import ModelConfig
from model.discriminator import Discriminator
from model.layers import AdaIN, DiscriminatorBlock, SpectralNorm, fold_spectral_norm, spectral_norm
from model.reenactor import Reenactor
from model.summary import count_params, summarize

OFFICIAL_PARAMS = {  # measured on the official modules (shared reference, section 12)
    "identity_encoder": 24_028_992,
    "pose_encoder": 2_551_808,
    "adain_mlp": 10_630_656,
    "generator": 37_516_996,
    "generator_without_mlp": 26_886_340,
    "discriminator_without_embed": 19_543_233,
}


def test_official_parameter_counts_match_exactly() -> None:
    summary = summarize(ModelConfig.preset("official-256", num_labels=98_000))
    for module, count in OFFICIAL_PARAMS.items():
        assert summary["params"][module] == count, module
    assert summary["params"]["discriminator"] == 69_719_233  # meta D, 98,000 videos
    finetuned = summarize(ModelConfig.preset("official-256", num_labels=1))
    assert finetuned["params"]["discriminator"] == 19_543_745
    assert summary["adain_params"] == 13_056


def test_official_flops_per_frame() -> None:
    gflops = summarize(ModelConfig.preset("official-256"))["gflops_per_frame"]
    assert gflops["identity_encoder"] == pytest.approx(11.05, abs=0.01)
    assert gflops["pose_encoder"] == pytest.approx(0.78, abs=0.01)
    assert gflops["generator"] == pytest.approx(60.72, abs=0.01)
    assert gflops["discriminator"] == pytest.approx(30.97, abs=0.01)


@pytest.mark.parametrize("preset", ["small-128", "tiny-64"])
def test_small_presets_keep_the_structure(preset: str) -> None:
    cfg = ModelConfig.preset(preset)
    with torch.device("meta"):
        g = Reenactor(cfg).generator
    assert len(g.blocks) == cfg.num_res_blocks + cfg.num_up_blocks
    assert [b.upsample for b in g.blocks[: cfg.num_res_blocks]] == [False] * cfg.num_res_blocks
    assert all(b.upsample for b in g.blocks[cfg.num_res_blocks :])
    assert len(g.adain_layers()) == 2 * len(g.blocks) + 1


def test_adain_parameter_layout_matches_official_offsets() -> None:
    with torch.device("meta"):
        g = Reenactor(ModelConfig.preset("official-256")).generator
    params = torch.arange(13_056, dtype=torch.float64)[None]
    starts = [(int(b[0, 0]), int(gm[0, 0])) for b, gm in g.split_adain_params(params)]
    official_beta = [0, 1024, 2048, 3072, 4096, 5120, 6144, 7168, 8192, 9216, 10240, 11264]
    official_beta += [11776, 12288, 12544, 12800, 12928]
    channels = [n.channels for n in g.adain_layers()]
    assert [s[0] for s in starts] == official_beta
    assert [gm - b for b, gm in starts] == channels  # beta first, then gamma


def test_head_is_a_3x3_conv_to_four_channels() -> None:
    with torch.device("meta"):
        g = Reenactor(ModelConfig.preset("official-256")).generator
    assert g.head.parametrizations.weight.original.shape == (4, 64, 3, 3)
    assert g.constant.shape == (1, 512, 4, 4)


def test_generator_constant_starts_at_ones(tiny: ModelConfig) -> None:
    constant = Reenactor(tiny).generator.constant
    assert torch.equal(constant, torch.ones_like(constant))


def test_shapes_and_value_ranges(tiny: ModelConfig) -> None:
    torch.manual_seed(0)
    net, disc = Reenactor(tiny), Discriminator(tiny)
    s = tiny.image_size
    out = net(torch.rand(2, 3, 3, s, s), torch.rand(2, 3, s, s))
    assert out.rgb.shape == (2, 3, s, s)
    assert out.mask.shape == (2, 1, s, s)
    assert out.rgb.min() > -0.25 and out.rgb.max() < 1.25
    assert out.mask.min() > 0 and out.mask.max() < 1
    d = disc(out.masked_rgb, torch.zeros(2, dtype=torch.long))
    assert d.score.shape == (2,)
    assert len(d.features) == len(disc.blocks) + 1
    assert d.features[-1].shape[-1] == tiny.const_size


def test_gradients_reach_every_parameter(tiny: ModelConfig) -> None:
    torch.manual_seed(0)
    net, disc = Reenactor(tiny), Discriminator(tiny)
    s = tiny.image_size
    out = net(torch.rand(2, 2, 3, s, s), torch.rand(2, 3, s, s))
    score = disc(out.masked_rgb, torch.tensor([0, 0])).score
    (score.sum() + out.mask.mean()).backward()
    for module in (net, disc):
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_same_seed_gives_same_weights_and_outputs(tiny: ModelConfig) -> None:
    def build() -> Reenactor:
        torch.manual_seed(123)
        return Reenactor(tiny).eval()

    a, b = build(), build()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    x = torch.rand(1, 2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x, x[:, 0]).rgb, b(x, x[:, 0]).rgb)


def test_spectral_norm_follows_the_legacy_power_iteration() -> None:
    """Train-mode updates must match torch.nn.utils.spectral_norm, which the release used."""
    torch.manual_seed(0)
    legacy = torch.nn.utils.spectral_norm(nn.Linear(6, 5), eps=1e-4)
    ours = nn.Linear(6, 5)
    spectral_norm(ours, eps=1e-4)
    with torch.no_grad():
        ours.parametrizations.weight.original.copy_(legacy.weight_orig)
        ours.bias.copy_(legacy.bias)
        ours.parametrizations.weight[0].u.copy_(legacy.weight_u)
        ours.parametrizations.weight[0].v.copy_(legacy.weight_v)
    x = torch.randn(3, 6)
    for _ in range(4):  # each train-mode forward runs one power iteration
        torch.testing.assert_close(ours(x), legacy(x), rtol=0, atol=1e-6)
    sn = ours.parametrizations.weight[0]
    torch.testing.assert_close(sn.u, legacy.weight_u, rtol=0, atol=1e-6)
    torch.testing.assert_close(sn.v, legacy.weight_v, rtol=0, atol=1e-6)
    legacy.eval(), ours.eval()
    torch.testing.assert_close(ours(x), legacy(x), rtol=0, atol=1e-6)


def test_spectral_norm_normalises_the_top_singular_value() -> None:
    torch.manual_seed(0)
    conv = spectral_norm(nn.Conv2d(8, 16, 3), eps=1e-4)
    conv.eval()
    with torch.no_grad():
        sigma = torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item()
    assert sigma == pytest.approx(1.0, abs=0.02)  # 15 power iterations at construction
    assert isinstance(conv.parametrizations.weight[0], SpectralNorm)


def test_folding_spectral_norm_keeps_eval_outputs(tiny: ModelConfig) -> None:
    torch.manual_seed(0)
    net = Reenactor(tiny).eval()
    x = torch.rand(2, 2, 3, 64, 64)
    with torch.no_grad():
        before = net(x, x[:, 0]).rgb
        after = fold_spectral_norm(net)(x, x[:, 0]).rgb
    assert torch.equal(before, after)
    assert not any(k.endswith(".u") for k in net.state_dict())


def test_discriminator_skip_sees_relu_of_input() -> None:
    """Official quirk: the block's in-place ReLU also feeds the skip path."""
    torch.manual_seed(0)
    block = DiscriminatorBlock(4, 4, downsample=False, sn_eps=1e-4).eval()
    x = torch.randn(1, 4, 8, 8)
    main = block.conv2(torch.relu(block.conv1(torch.relu(x))))
    torch.testing.assert_close(block(x), main + torch.relu(x))


def test_adain_is_instance_norm_times_gamma_plus_beta() -> None:
    x = torch.randn(2, 3, 5, 5)
    beta, gamma = torch.randn(2, 3), torch.randn(2, 3)
    mean, var = x.mean((2, 3), keepdim=True), x.var((2, 3), unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-4) * gamma[..., None, None] + beta[..., None, None]
    torch.testing.assert_close(AdaIN(3, 1e-4)(x, beta, gamma), expected)


def test_discriminator_embedding_rows_and_init(tiny: ModelConfig) -> None:
    disc = Discriminator(ModelConfig.preset("tiny-64", num_labels=5))
    raw = disc.embed.parametrizations.weight.original
    assert raw.shape == (5, tiny.identity_dim)  # identity space, for embedding match
    assert raw.abs().max() <= 0.1
    assert count_params(disc.embed) == 5 * tiny.identity_dim


def test_spectral_norm_stays_fp32_under_autocast() -> None:
    torch.manual_seed(0)
    layer = spectral_norm(nn.Linear(8, 4), eps=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight = layer.weight
        out = layer(torch.randn(2, 8))
    assert weight.dtype == torch.float32
    assert layer.parametrizations.weight[0].u.dtype == torch.float32
    assert out.dtype == torch.bfloat16
