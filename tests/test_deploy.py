"""The deployment files agree with the code: services, commands, settings, GPU reservation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from darkroom.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


def test_compose_runs_every_tier_with_its_dependencies() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "dispatcher"} <= set(services)
    assert services["worker"]["command"] == ["darkroom", "worker"]
    assert services["dispatcher"]["command"] == ["darkroom", "dispatcher"]
    assert services["migrate"]["command"] == ["darkroom", "migrate"]


def test_the_worker_reserves_a_gpu_and_the_api_does_not() -> None:
    services = compose()["services"]
    [device] = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert "deploy" not in services["api"]


def test_every_compose_setting_is_a_real_setting() -> None:
    env = compose()["x-darkroom-env"]
    fields = {f"DARKROOM_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields
    assert env["DARKROOM_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_the_api_image_installs_no_torch() -> None:
    installs = [
        line for line in (DEPLOY / "Dockerfile.api").read_text().splitlines() if "pip" in line
    ]
    assert installs
    assert not any("torch" in line or "[worker]" in line for line in installs)
    assert "torch==2.13.0" in (DEPLOY / "Dockerfile.worker").read_text()
