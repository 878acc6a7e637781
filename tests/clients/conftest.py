"""One `darkroom up` (embedded profile, tiny models) for every real-client test of this folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.system import RunningSystem, darkroom_up


@pytest.fixture(scope="package")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    workdir = tmp_path_factory.mktemp("clients")
    env = {
        "DARKROOM_DATA_DIR": str(workdir / "data"),
        "DARKROOM_MODEL_PRESET": "tiny",
        "DARKROOM_URL_ALLOWLIST": "127.0.0.1/32",
        # Synchronous edits on a shared CI machine: room for a slow first model build.
        "DARKROOM_SYNC_WAIT_MAX_S": "180",
    }
    with darkroom_up(env, workdir) as running:
        yield running
