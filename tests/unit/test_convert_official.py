"""Converter: a fake official checkpoint built from the recorded key/shape list converts
losslessly, keeps the spectral-norm state, and bad files give clear errors."""

import argparse
import json
import pathlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from model.checkpoint import instantiate, load_checkpoint
from model.convert_official import ConversionError, convert, load_official, main
from model.discriminator import Discriminator
from model.reenactor import Reenactor

REFERENCE = Path(__file__).parents[1] / "data" / "official-lpr-state-dict.json"


def fake_tensors(shapes: dict[str, list[int]], gen: torch.Generator, rows: int | None = None):
    """Random values of the recorded shapes. SN u/v come from a few power iterations on
    their weight, as in a trained checkpoint (random u/v make sigma ill-conditioned)."""
    out = {}
    for key, shape in shapes.items():
        if key.startswith("embed.") and rows is not None and shape and shape[0] == 98_000:
            shape = [rows, *shape[1:]]
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1234, dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith("weight_u"):
            w = out[key.replace("weight_u", "weight_orig")].flatten(1)
            u = torch.randn(w.shape[0], generator=gen)
            for _ in range(3):
                v = torch.nn.functional.normalize(w.t() @ u, dim=0)
                u = torch.nn.functional.normalize(w @ v, dim=0)
            out[key], out[key.replace("weight_u", "weight_v")] = u, v
        elif not key.endswith("weight_v"):
            out[key] = torch.randn(shape, generator=gen)
    return out


def fake_official(finetuned: bool, rows: int = 5) -> dict[str, Any]:
    ref = json.loads(REFERENCE.read_text())
    gen = torch.Generator().manual_seed(0)
    g_keys = ref["generator_finetuned" if finetuned else "generator"]["keys"]
    d_keys = ref["discriminator_finetuned" if finetuned else "discriminator"]["keys"]
    emb_keys = ref["embedder"]["keys"]
    return {
        "embedder": fake_tensors(emb_keys, gen),
        "generator": fake_tensors(g_keys, gen),
        "discriminator": fake_tensors(d_keys, gen, rows=rows),
        "optimizer_G": {"state": {}, "param_groups": []},
        "optimizer_D": {"state": {}, "param_groups": []},
        "running_averages": {
            "embedder": fake_tensors(emb_keys, gen),
            "generator": fake_tensors(g_keys, gen),
        },
        "args": argparse.Namespace(image_size=256, experiments_dir=pathlib.PosixPath("/x/y")),
    }


def sn_weight(state: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """Official eval-mode weight W / (u . W v), computed as the legacy hook does."""
    w, u, v = (state[f"{layer}.weight_{s}"] for s in ("orig", "u", "v"))
    return w / torch.dot(u, torch.mv(w.flatten(1), v))


def assert_arrived(official: dict[str, torch.Tensor], ours: nn.Module, rename) -> None:
    """Every official tensor is in `ours` unchanged; every SN layer has the same eval weight."""
    ours.eval()
    state = ours.state_dict()
    for key, value in official.items():
        assert torch.equal(state[rename(key)], value), key
        if key.endswith(".weight_orig"):
            layer = key.removesuffix(".weight_orig")
            module = ours.get_submodule(
                rename(key).removesuffix(".parametrizations.weight.original")
            )
            with torch.no_grad():
                torch.testing.assert_close(
                    module.weight, sn_weight(official, layer), rtol=1e-5, atol=1e-7
                )


@pytest.mark.slow
def test_finetuned_release_converts_losslessly(tmp_path: Path) -> None:
    official = fake_official(finetuned=True)
    src = tmp_path / "latent-pose-release.pth"
    torch.save(official, src)
    out = tmp_path / "converted.safetensors"
    assert main([str(src), str(out)]) == 0

    ckpt = load_checkpoint(out, expect_preset="official-256")
    assert ckpt.info["finetuned"] and ckpt.config.num_labels == 1
    assert ckpt.config.embed_sn_eps == 1e-12
    assert ckpt.info["dropped"] == ["optimizer_D", "optimizer_G"]
    assert ckpt.info["official_args"]["experiments_dir"] == "/x/y"
    assert ckpt.ema is not None and ckpt.discriminator is not None and ckpt.avatar is not None
    raw = instantiate(Reenactor, ckpt.config, ckpt.reenactor, "raw")
    ema = instantiate(Reenactor, ckpt.config, ckpt.ema, "ema")
    disc = instantiate(Discriminator, ckpt.config, ckpt.discriminator, "disc")

    from model.convert_official import SN_SUFFIXES, discriminator_layers, generator_layers

    def renamer(layers: dict[str, str], prefix: str):
        def rename(key: str) -> str:
            if key == "constant.constant":
                return f"{prefix}constant"
            layer, _, tensor = key.rpartition(".")
            return f"{prefix}{layers[layer]}.{SN_SUFFIXES.get(tensor, tensor)}"

        return rename

    def embedder_rename(key: str) -> str:
        encoder, _, rest = key.partition(".")
        return f"{encoder}.backbone.{rest}"

    g_rename = renamer(generator_layers(ckpt.config), "generator.")
    for module, source in ((raw, official), (ema, official["running_averages"])):
        assert_arrived(source["embedder"], module, embedder_rename)
        generator = {k: v for k, v in source["generator"].items() if k != "identity_embedding"}
        assert_arrived(generator, module, g_rename)
    assert_arrived(official["discriminator"], disc, renamer(discriminator_layers(6), ""))
    assert torch.equal(ckpt.avatar["identity"], official["generator"]["identity_embedding"])
    ema_identity = official["running_averages"]["generator"]["identity_embedding"]
    assert torch.equal(ckpt.avatar_identity("ema"), ema_identity.reshape(-1))


def test_meta_checkpoint_keeps_its_video_embeddings() -> None:
    official = fake_official(finetuned=False, rows=7)
    del official["running_averages"]
    ckpt = convert(official)
    assert not ckpt.info["finetuned"] and ckpt.avatar is None and ckpt.ema is None
    assert ckpt.config.num_labels == 7 and ckpt.config.embed_sn_eps == 1e-4
    embed = official["discriminator"]["embed.weight_orig"]
    assert torch.equal(ckpt.discriminator["embed.parametrizations.weight.original"], embed)


def test_unknown_and_missing_keys_are_listed() -> None:
    official = fake_official(finetuned=False)
    official["generator"]["decoder_blocks.99.block.3.weight_orig"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"decoder_blocks\.99\.block\.3\.weight_orig"):
        convert(official)
    official = fake_official(finetuned=False)
    del official["embedder"]["pose_encoder.classifier.1.bias"]
    with pytest.raises(ConversionError, match=r"missing=\['pose_encoder\.backbone\.classifier"):
        convert(official)


def test_unsafe_or_foreign_files_are_refused(tmp_path: Path, capsys) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"embedder": {}, "generator": {}, "discriminator": {}, "x": Path.home}, evil)
    with pytest.raises(ConversionError, match="cannot load safely"):
        load_official(evil)
    partial = tmp_path / "partial.pth"
    torch.save({"generator": {}}, partial)
    assert main([str(partial), str(tmp_path / "out.safetensors")]) == 2
    assert "missing top-level keys" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(ConversionError, match="not found"):
        load_official(tmp_path / "absent.pth")
