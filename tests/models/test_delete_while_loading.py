"""delete_model while its install is queued or downloading: the installer stops, nothing is left
half installed, and the load's webhook says it was deleted."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from darkroom.settings import Settings
from db.models import InstallState, ModelInstall, WebhookDelivery
from db.repositories.keys import IssuedKey
from db.session import session_scope
from services import model_folder, models
from tests.models.conftest import FileServer, Served, TinyFiles, models_folder
from worker.installer import Installer


@pytest.fixture
def delete_settings(settings: Settings, tmp_path: Path, tiny_files: TinyFiles) -> Settings:
    """A models folder with the SD configuration, and a short lease (renewed every 0.5 s)."""
    root = models_folder(tmp_path / "models", tiny_files)
    return settings.model_copy(update={"models_dir": root, "install_lease_s": 1.5})


def _start(settings: Settings, url: str, key: IssuedKey) -> tuple[str, str, int]:
    """A queued load_model with a webhook: (model_id, webhook URL, install id)."""
    model_id = f"doomed-{uuid.uuid4().hex[:8]}"
    hook = f"http://127.0.0.1:9/hook-{model_id}"
    body = {"url": url, "model_id": model_id, "webhook": hook}
    with session_scope(settings.resolved_database_url) as session:
        started = models.request_install(
            session, settings, models.parse_load_model(body), key.row.id
        )
    return model_id, hook, started.install_id


def _install(settings: Settings, install_id: int) -> ModelInstall | None:
    with session_scope(settings.resolved_database_url) as session:
        install = session.get(ModelInstall, install_id)
        if install is not None:
            session.expunge(install)
        return install


def _deleted_webhook(settings: Settings, hook: str) -> dict[str, Any]:
    """The one delivery queued for `hook`, checked and its payload."""
    with session_scope(settings.resolved_database_url) as session:
        [delivery] = session.scalars(select(WebhookDelivery).where(WebhookDelivery.url == hook))
        assert delivery.model_install_id is None  # the install's row is gone
        assert delivery.job_id is None
        payload: dict[str, Any] = json.loads(delivery.payload)
    assert payload["status"] == "error"
    assert payload["model_status"] == "deleted"
    assert payload["message"] == models.DELETED_WHILE_LOADING
    return payload


def _nothing_left(settings: Settings, model_id: str) -> None:
    root = settings.models_dir
    assert root is not None
    assert not (root / model_id).exists()
    staging = root / model_folder.STAGING
    assert not staging.exists() or list(staging.iterdir()) == []


def test_delete_during_the_download_stops_the_installer_and_leaves_nothing(
    delete_settings: Settings, file_server: FileServer, tiny_files: TinyFiles, api_key: IssuedKey
) -> None:
    file_server.chunk = 16 * 1024
    file_server.files["/slow.safetensors"] = Served(tiny_files.sd_checkpoint, None, 0.05)
    model_id, hook, install_id = _start(
        delete_settings, file_server.url("/slow.safetensors"), api_key
    )
    outcome: list[bool] = []
    installer = threading.Thread(
        target=lambda: outcome.append(Installer(delete_settings, None).run_one(install_id))
    )
    installer.start()
    deadline = time.monotonic() + 30
    while True:  # until the installer has recorded some progress
        install = _install(delete_settings, install_id)
        assert install is not None
        if install.state == InstallState.DOWNLOADING and install.bytes_done > 0:
            break
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.05)
    assert install.bytes_done < len(tiny_files.sd_checkpoint)  # still downloading
    with session_scope(delete_settings.resolved_database_url) as session:
        assert models.delete(session, delete_settings, model_id) == ["model"]
    started = time.monotonic()
    installer.join(timeout=30)
    assert not installer.is_alive()
    assert time.monotonic() - started < 5  # stopped at its next renewal, not at the end
    assert outcome == [True]
    assert _install(delete_settings, install_id) is None
    _nothing_left(delete_settings, model_id)
    payload = _deleted_webhook(delete_settings, hook)
    assert payload["model_id"] == model_id
    with session_scope(delete_settings.resolved_database_url) as session:
        listed = {row["model_id"] for row in models.list_all(session, delete_settings)}
    assert model_id not in listed


def test_delete_of_a_queued_install_means_the_installer_never_starts_it(
    delete_settings: Settings, file_server: FileServer, tiny_files: TinyFiles, api_key: IssuedKey
) -> None:
    file_server.files["/m.safetensors"] = Served(tiny_files.sd_checkpoint)
    model_id, hook, install_id = _start(delete_settings, file_server.url("/m.safetensors"), api_key)
    with session_scope(delete_settings.resolved_database_url) as session:
        assert models.delete(session, delete_settings, model_id) == ["model"]
    assert not Installer(delete_settings, None).run_one(install_id)
    _nothing_left(delete_settings, model_id)
    _deleted_webhook(delete_settings, hook)
    assert file_server.ranges == []  # nothing was downloaded


def test_delete_of_a_ready_model_sends_no_webhook(
    delete_settings: Settings, file_server: FileServer, tiny_files: TinyFiles, api_key: IssuedKey
) -> None:
    """Only a load that had not ended is told: a ready one's webhook was sent already."""
    file_server.files["/m.safetensors"] = Served(tiny_files.sd_checkpoint)
    model_id, hook, install_id = _start(delete_settings, file_server.url("/m.safetensors"), api_key)
    assert Installer(delete_settings, None).run_one(install_id)
    with session_scope(delete_settings.resolved_database_url) as session:
        assert models.delete(session, delete_settings, model_id) == ["model"]
        urls = session.scalars(select(WebhookDelivery.url).where(WebhookDelivery.url == hook))
        assert list(urls) == []  # the ready webhook went with the row; no "deleted" one
    _nothing_left(delete_settings, model_id)
