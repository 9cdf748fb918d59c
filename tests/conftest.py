"""Shared fixtures; tests without an explicit marker count as `unit`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """A migrated SQLite database of the service's schema."""
    from service.db import migrate  # service tests only: keeps other suites free of it

    url = f"sqlite:///{tmp_path / 'lpd.db'}"
    migrate(url)
    return url


@pytest.fixture
def sessions(db_url: str) -> Iterator[Any]:
    """A sessionmaker on `db_url`; the engine is disposed afterwards."""
    from service.db import create_db_engine, create_session_factory

    engine = create_db_engine(db_url)
    yield create_session_factory(engine)
    engine.dispose()
