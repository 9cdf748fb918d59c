"""Shared fixtures; tests without an explicit marker count as `unit`."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig

KNOWN_MARKERS = {"unit", "integration", "e2e", "gpu", "slow"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = torch.cuda.is_available()
    for item in items:
        if not KNOWN_MARKERS & {m.name for m in item.iter_markers()}:
            item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture
def tiny() -> ModelConfig:
    return ModelConfig.preset("tiny-64")
