import dataclasses

import pytest

from model.config import PRESETS, ModelConfig


def test_presets_round_trip_through_dict() -> None:
    for name, cfg in PRESETS.items():
        assert cfg.name == name
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_presets_share_the_service_wire_format() -> None:
    for cfg in PRESETS.values():
        assert (cfg.identity_dim, cfg.pose_dim) == (512, 256)


def test_official_preset_is_the_release_configuration() -> None:
    cfg = ModelConfig.preset("official-256")
    assert cfg.image_size == 256
    assert cfg.num_up_blocks == 6
    assert cfg.mlp_hidden == 768
    assert [cfg.channels_at(r) for r in (4, 32, 64, 128, 256)] == [512, 512, 256, 128, 64]


def test_preset_overrides_and_unknown_names() -> None:
    assert ModelConfig.preset("tiny-64", num_labels=7).num_labels == 7
    with pytest.raises(KeyError, match="unknown preset"):
        ModelConfig.preset("huge-1024")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**PRESETS["tiny-64"].to_dict(), "bogus": 1})


def test_invalid_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="power of two"):
        dataclasses.replace(PRESETS["tiny-64"], image_size=96)
    with pytest.raises(ValueError, match="num_labels"):
        dataclasses.replace(PRESETS["tiny-64"], num_labels=0)
