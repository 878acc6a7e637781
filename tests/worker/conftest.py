"""Worker fixtures: the tiny models, built once per session, and a model cache that keeps them."""

from __future__ import annotations

import pytest
import torch

from darkroom.settings import Settings
from tests.support.tiny import tiny_settings_at
from worker.models.cache import ModelCache

# The tiny models' matrices are too small to gain from intra-op threads, and on a shared two-core
# CI machine extra threads only contend: one thread runs these tests about three times faster.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings of the tiny preset, with its models already built under a temporary folder."""
    return tiny_settings_at(tmp_path_factory.mktemp("darkroom"))


@pytest.fixture(scope="session")
def model_cache() -> ModelCache:
    """One cache for the session, so each tiny model is loaded once."""
    return ModelCache(max_entries=4, device="cpu")
