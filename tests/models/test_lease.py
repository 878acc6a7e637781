"""The installer keeps its lease through steps that report no progress (a conversion, a Hub
snapshot): another installer cannot claim the install meanwhile, and a deletion still stops it."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from darkroom.settings import Settings
from db.repositories import models as repo
from db.session import session_scope
from services import models
from tests.models.conftest import TinyFiles, models_folder
from worker.installer import Installer, InstallGoneError

LEASE_S = 1.5


@pytest.fixture
def lease_settings(settings: Settings, tmp_path: Path, tiny_files: TinyFiles) -> Settings:
    root = models_folder(tmp_path / "models", tiny_files)
    return settings.model_copy(update={"models_dir": root, "install_lease_s": LEASE_S})


def _claimable(settings: Settings, install_id: int) -> bool:
    """Whether another installer could claim the install now (it does, if so)."""
    with session_scope(settings.resolved_database_url) as session:
        return repo.claim_install(session, lease_s=LEASE_S, install_id=install_id) is not None


def test_a_long_step_keeps_the_lease_and_a_delete_still_stops_it(
    lease_settings: Settings,
) -> None:
    model_id = f"long-{uuid.uuid4().hex[:8]}"
    body = {"url": "http://127.0.0.1:9/m.safetensors", "model_id": model_id}
    with session_scope(lease_settings.resolved_database_url) as session:
        request = models.parse_load_model(body)
        install_id = models.request_install(session, lease_settings, request, None).install_id
    installer = Installer(lease_settings, None)
    claim = installer._claim(install_id)
    assert claim is not None
    with installer.leased(claim, 100):
        time.sleep(3 * LEASE_S)  # a conversion three leases long
        assert not _claimable(lease_settings, install_id)
    time.sleep(LEASE_S + 0.5)  # without the beat the lease passes
    assert _claimable(lease_settings, install_id)  # (claimed again here, as by a second installer)
    with installer.leased(claim, 100):
        with session_scope(lease_settings.resolved_database_url) as session:
            assert models.delete(session, lease_settings, model_id) == ["model"]
        time.sleep(LEASE_S)  # the beat sees the deletion and stops
    with pytest.raises(InstallGoneError):
        installer.renew(claim, 100, 100, force=True)
