"""`darkroom up` on a laptop: it says where everything is, the dashboard just works with the
token it prints (embedded profile), a production dashboard stays off unless configured, and a
machine without the worker's dependencies gets one clear line instead of a restart loop."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cli.supervisor import default_public_url, laptop_admin_token, startup_lines
from darkroom.settings import Settings
from tests.api.test_submit import PIX2PIX
from tests.support.system import RunningSystem

pytestmark = pytest.mark.slow


def printed_urls(system: RunningSystem, timeout: float = 30) -> dict[str, str]:
    """The URLs `darkroom up` printed, by name (it prints them once the API answers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = dict(
            re.findall(r"(API|Docs|Metrics|Dashboard): +(\S+)", system.log_path.read_text())
        )
        if len(found) == 4:
            return found
        time.sleep(0.2)
    raise AssertionError(f"darkroom up printed no URLs\n{system.log_tail()}")


def test_up_prints_its_urls_and_a_dashboard_link_that_signs_in(system: RunningSystem) -> None:
    urls = printed_urls(system)

    assert urls["API"] == system.base_url + "/"
    assert httpx.get(urls["Docs"], timeout=10).status_code == 200
    assert "darkroom" in httpx.get(urls["Metrics"], timeout=10).text
    page, _, fragment = urls["Dashboard"].partition("#token=")
    assert page == system.base_url + "/dashboard"
    assert len(fragment) >= 32
    assert httpx.get(page, timeout=10).status_code == 200
    queue = system.base_url + "/admin/api/queue"
    signed_in = httpx.get(queue, headers={"Authorization": f"Bearer {fragment}"}, timeout=10)
    assert signed_in.status_code == 200
    wrong = httpx.get(queue, headers={"Authorization": "Bearer " + "x" * 40}, timeout=10)
    assert wrong.status_code == 401


def test_links_point_at_the_port_up_listens_on_unless_public_url_is_set(
    system: RunningSystem, tmp_path: Path
) -> None:
    """`darkroom up --port P` without DARKROOM_PUBLIC_URL (as the system fixture starts it):
    the answers' links lead back to port P (they named the default port 8000 before)."""
    assert "DARKROOM_PUBLIC_URL" not in system.env
    key = system.create_key()["key"]
    answer = system.post("/api/v5/pix2pix", {**PIX2PIX, "key": key, "steps": 2})
    assert answer["fetch_result"] == f"{system.base_url}/api/v5/fetch/{answer['id']}"
    assert all(link.startswith(system.base_url + "/") for link in answer["future_links"])
    unset = Settings(data_dir=tmp_path)
    assert default_public_url(unset, "0.0.0.0", 18765) == "http://127.0.0.1:18765"
    chosen = Settings(data_dir=tmp_path, public_url="https://images.example")
    assert default_public_url(chosen, "0.0.0.0", 18765) is None


def test_a_production_dashboard_stays_off_unless_a_token_is_set(tmp_path: Path) -> None:
    production = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://db/darkroom")
    laptop = Settings(data_dir=tmp_path, database_url="")

    assert laptop_admin_token(production) == ""
    lines = startup_lines(production, "0.0.0.0", 8000, "")
    assert lines[-1].endswith("Dashboard: off (set DARKROOM_ADMIN_TOKEN to turn it on)")
    assert lines[0].endswith("API:       http://127.0.0.1:8000/")
    # Set, it is on, but its token is not printed where production logs would keep it.
    token = "k3Jq9ZpX2mV7wR4tY8uB1nC6dF0gH5sL"
    configured = production.model_copy(update={"admin_token": token})
    assert laptop_admin_token(configured) == token
    assert token not in "".join(startup_lines(configured, "127.0.0.1", 8000, token))
    # Each laptop run gets a fresh one.
    assert laptop_admin_token(laptop) != laptop_admin_token(laptop)


def test_up_without_the_worker_dependencies_refuses_with_one_line(tmp_path: Path) -> None:
    # diffusers blocked as if it were not installed (None in sys.modules stops its import).
    script = (
        "import sys; sys.modules['diffusers'] = None; from cli.main import main;"
        " sys.exit(main(['up', '--port', '9']))"
    )
    env = {**os.environ, "DARKROOM_DATA_DIR": str(tmp_path / "data"), "DARKROOM_DATABASE_URL": ""}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 1
    assert time.monotonic() - started < 30
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("darkroom up: the worker needs diffusers, which this Python cannot")
    assert "pip install" in line
    assert not (tmp_path / "data" / "darkroom.sqlite3").exists()  # nothing was started
