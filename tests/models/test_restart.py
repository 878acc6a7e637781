"""The installer killed mid-download: the next one resumes the file and the load completes once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from darkroom.settings import Settings
from db.models import InstallState, ModelInstall, WebhookDelivery
from db.repositories.keys import create_key
from db.session import session_scope
from services import models
from tests.models.conftest import FileServer, Served, TinyFiles, models_folder
from tests.support.system import settings_env


def _installer(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", "installer"], env=env, stdout=out, stderr=out
        )


def _install(settings: Settings, install_id: int) -> ModelInstall:
    with session_scope(settings.resolved_database_url) as session:
        install = session.get(ModelInstall, install_id)
        assert install is not None
        session.expunge(install)
        return install


def _wait(
    settings: Settings, install_id: int, done: object, log: Path, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        install = _install(settings, install_id)
        if done(install):  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"install {install_id} never got there\n{log.read_text()[-3000:]}")


def test_killed_installer_resumes_and_completes_once(
    tmp_path: Path, own_pg_url: str, file_server: FileServer, tiny_files: TinyFiles
) -> None:
    root = models_folder(tmp_path / "models", tiny_files)
    body = tiny_files.sd_checkpoint
    chunks = len(body) // file_server.chunk + 1
    file_server.files["/slow.safetensors"] = Served(body, delay_per_chunk_s=20.0 / chunks)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=own_pg_url,
        broker_url="redis://127.0.0.1:6379/0",
        url_allowlist=["127.0.0.1/32"],
        models_dir=root,
        install_lease_s=2.0,
    )
    with session_scope(own_pg_url) as session:
        key = create_key(session, "restart")
        request = models.parse_load_model(
            {
                "url": file_server.url("/slow.safetensors"),
                "model_id": "resumed",
                "webhook": "http://127.0.0.1:9/hook",
            }
        )
        started = models.request_install(session, settings, request, key.row.id)
    env = {
        **settings_env(settings, tmp_path / "data"),
        "DARKROOM_MODEL_PRESET": "",
        "DARKROOM_MODELS_DIR": str(root),
        "DARKROOM_INSTALL_LEASE_S": "2",
        "DARKROOM_INSTALL_POLL_S": "0.2",
    }
    log = tmp_path / "installer.log"
    first = _installer(env, log)
    try:
        _wait(settings, started.install_id, lambda i: i.bytes_done > len(body) // 4, log)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    partial = _install(settings, started.install_id).bytes_done
    assert _install(settings, started.install_id).state == InstallState.DOWNLOADING
    file_server.files["/slow.safetensors"] = Served(body)  # quick from now on
    second = _installer(env, log)
    try:
        _wait(settings, started.install_id, lambda i: i.state != InstallState.DOWNLOADING, log)
    finally:
        second.terminate()
        second.wait(30)
    install = _install(settings, started.install_id)
    assert install.state == InstallState.READY, (install.error, log.read_text()[-3000:])
    assert install.attempts == 2
    assert install.size_bytes == len(body)
    resumed = [r for r in file_server.ranges if r]
    assert len(resumed) == 1
    assert int(resumed[0].removeprefix("bytes=").rstrip("-")) >= partial
    assert (root / "resumed" / "model_index.json").is_file()
    with session_scope(own_pg_url) as session:
        count = session.scalar(
            select(func.count(WebhookDelivery.id)).where(
                WebhookDelivery.model_install_id == started.install_id
            )
        )
        payload = session.scalar(
            select(WebhookDelivery.payload).where(
                WebhookDelivery.model_install_id == started.install_id
            )
        )
    assert count == 1
    assert json.loads(str(payload))["status"] == "success"
