"""The deployment files agree with the code: services, commands, settings, GPUs, queues, ports.

Docker and Kubernetes are not run here: the files are parsed and checked against the settings,
the packaging and the API app. Flower's command line is run for real against the test Redis.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from api.app import create_app
from darkroom.settings import Settings
from tests.support.system import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SETTING_NAMES = {f"DARKROOM_{name.upper()}" for name in Settings.model_fields}
#: boto3's standard credential variables: the only non-Darkroom variables the tiers get.
AWS_CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
DEFAULTS = Settings.model_construct()
_SUBSTITUTION = re.compile(r"\$\{[A-Z0-9_]+:-([^}]*)\}")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


def services() -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"]
    return found


def with_defaults(value: object) -> str:
    """A compose value as `docker compose` reads it with no variables set."""
    return _SUBSTITUTION.sub(lambda match: match.group(1), str(value))


def manifests() -> list[dict[str, Any]]:
    """Every Kubernetes object under deploy/k8s (the kustomization file aside)."""
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in manifests() if o["kind"] == kind}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    return found


def pod_annotations(workload: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = workload["spec"]["template"]["metadata"].get("annotations", {})
    return found


def config_map() -> dict[str, str]:
    data: dict[str, str] = objects("ConfigMap")["darkroom-config"]["data"]
    return data


def secret() -> dict[str, str]:
    data: dict[str, str] = objects("Secret")["darkroom-secrets"]["stringData"]
    return data


def settings_from(env: dict[str, str]) -> Settings:
    """The Settings that these environment variables make (validated, like at start-up)."""
    fields = {k.removeprefix("DARKROOM_").lower(): v for k, v in env.items() if k in SETTING_NAMES}
    return Settings.model_validate(fields)


# --- docker compose ---


def test_compose_runs_every_tier_with_its_dependencies() -> None:
    found = services()
    expected = {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker"}
    assert expected | {"dispatcher", "flower"} <= set(found)
    assert found["worker"]["command"] == ["darkroom", "worker"]
    assert found["dispatcher"]["command"] == ["darkroom", "dispatcher"]
    assert found["migrate"]["command"] == ["darkroom", "migrate"]
    assert found["api"]["command"][:2] == ["darkroom", "api"]
    for tier in ("api", "worker", "dispatcher"):
        assert found[tier]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, service in services().items():
        if name not in {"migrate", "minio-init"}:
            assert service["healthcheck"]["test"], name


def test_the_worker_reserves_a_gpu_and_no_other_service_does() -> None:
    found = services()
    [device] = found["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["count"] == 1  # one worker process per GPU
    assert "gpu" in device["capabilities"]
    assert [name for name, service in found.items() if "deploy" in service] == ["worker"]


def test_the_worker_may_finish_its_job_when_stopped() -> None:
    grace = re.fullmatch(r"(\d+)([sm])", services()["worker"]["stop_grace_period"])
    assert grace is not None
    assert int(grace[1]) * {"s": 1, "m": 60}[grace[2]] >= 600


def test_every_compose_setting_is_a_real_setting_and_they_validate_together() -> None:
    for name in ("api", "worker", "dispatcher", "migrate"):
        env = {k: with_defaults(v) for k, v in services()[name]["environment"].items()}
        assert {k for k in env if k.startswith("DARKROOM_")} <= SETTING_NAMES, name
        assert {k for k in env if not k.startswith("DARKROOM_")} <= AWS_CREDENTIALS, name
        settings = settings_from(env)
        assert settings.resolved_database_url.startswith("postgresql+psycopg://")
        assert settings.job_queue == DEFAULTS.job_queue


def test_compose_storage_is_the_minio_bucket_that_minio_init_creates() -> None:
    found = services()
    settings = settings_from({k: with_defaults(v) for k, v in compose()["x-darkroom-env"].items()})
    endpoint = urlsplit(settings.s3_endpoint_url)
    assert settings.storage == "s3"
    assert endpoint.hostname == "minio"
    assert f"--address :{endpoint.port}" in " ".join(found["minio"]["command"])
    assert f"mb --ignore-existing local/{settings.s3_bucket}" in found["minio-init"]["command"][0]
    outside = urlsplit(settings.s3_public_endpoint_url)
    assert f"{outside.port}:{endpoint.port}" in found["minio"]["ports"]
    assert with_defaults(compose()["x-darkroom-env"]["AWS_ACCESS_KEY_ID"]) == with_defaults(
        found["minio"]["environment"]["MINIO_ROOT_USER"]
    )


def test_the_healthchecks_probe_the_ports_the_tiers_listen_on() -> None:
    found = services()
    checks = {
        name: " ".join(s["healthcheck"]["test"]) for name, s in found.items() if "healthcheck" in s
    }
    assert "127.0.0.1:8000/health" in checks["api"]
    assert "8000:8000" in found["api"]["ports"]
    port = found["worker"]["environment"]["DARKROOM_WORKER_METRICS_PORT"]
    assert f"127.0.0.1:{port}/metrics" in checks["worker"]
    port = found["dispatcher"]["environment"]["DARKROOM_DISPATCHER_METRICS_PORT"]
    assert f"127.0.0.1:{port}/metrics" in checks["dispatcher"]
    assert "127.0.0.1:5555/healthcheck" in checks["flower"]


def test_flower_watches_the_broker_the_tiers_use() -> None:
    command = services()["flower"]["command"]
    assert command[0] == "celery"
    assert f"--broker={compose()['x-darkroom-env']['DARKROOM_BROKER_URL']}" in command
    assert "flower" in command


def flower_argv(broker_url: str, port: int) -> list[str]:
    """Compose's Flower command line, pointed at `broker_url` and a loopback `port`."""
    swaps = {"--broker=": f"--broker={broker_url}", "--port=": f"--port={port}"}
    argv = []
    for arg in services()["flower"]["command"][1:]:
        prefix = next((p for p in swaps if arg.startswith(p)), None)
        argv.append(swaps[prefix] if prefix else arg)
    return [*argv, "--address=127.0.0.1"]


def test_flowers_command_line_starts_and_answers_its_healthcheck(
    redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    log_path = tmp_path / "flower.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", *flower_argv(redis_url, port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        answer = _wait_for_ok(f"http://127.0.0.1:{port}/healthcheck", timeout=30)
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert answer == "OK", log_path.read_text(errors="replace")


def _wait_for_ok(url: str, timeout: float) -> str:
    """The body of the first answer from `url`, or "" if none came in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return httpx.get(url, timeout=2).raise_for_status().text
        except httpx.TransportError:
            time.sleep(0.3)
    return ""


# --- images ---


def pip_lines(dockerfile: str) -> list[str]:
    lines = (DEPLOY / dockerfile).read_text().splitlines()
    return [line for line in lines if "pip install" in line]


def test_the_api_image_installs_no_torch() -> None:
    installs = pip_lines("Dockerfile.api")
    assert installs
    assert not any("torch" in line or "[worker]" in line for line in installs)


def test_the_worker_image_is_cuda_with_pinned_torch() -> None:
    text = (DEPLOY / "Dockerfile.worker").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", text, re.MULTILINE)
    assert any("torch==2.13.0" in line for line in pip_lines("Dockerfile.worker"))
    assert any("'.[worker]'" in line for line in pip_lines("Dockerfile.worker"))


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_images_copy_every_package_that_pip_installs(dockerfile: str) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (DEPLOY / dockerfile).read_text(), re.M))
    assert packages <= copied


def test_files_the_packages_read_at_run_time_are_installed() -> None:
    """A non-Python file in a package must be package data, or `pip install .` drops it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data: dict[str, list[str]] = pyproject["tool"]["setuptools"].get("package-data", {})
    for package in ("api", "darkroom", "db", "worker"):
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and path.suffix not in {".py", ".pyc", ".pyi", ".typed"}:
                relative = path.relative_to(ROOT / package).as_posix()
                patterns = package_data.get(package, [])
                assert any(Path(relative).match(p) for p in patterns), f"{package}/{relative}"


def test_compose_builds_the_images_that_kubernetes_runs() -> None:
    found = services()
    built = {
        found[n]["image"].split(":")[0]: found[n]["build"]["dockerfile"]
        for n in found
        if "build" in found[n]
    }
    assert built == {
        "darkroom-api": "deploy/Dockerfile.api",
        "darkroom-worker": "deploy/Dockerfile.worker",
    }
    kustomized = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]
    assert {image["name"] for image in kustomized} == set(built)


# --- Kubernetes ---


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(on_disk)


def test_every_object_lives_in_the_darkroom_namespace() -> None:
    for obj in manifests():
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "darkroom", obj["metadata"]["name"]


def test_each_workload_runs_its_tier_from_the_right_image() -> None:
    deployments = objects("Deployment")
    expected = {
        "darkroom-api": ("darkroom-api", ["darkroom", "api"]),
        "darkroom-worker": ("darkroom-worker", ["darkroom", "worker"]),
        "darkroom-dispatcher": ("darkroom-api", ["darkroom", "dispatcher"]),
    }
    for name, (image, command) in expected.items():
        [container] = containers(deployments[name])
        assert container["image"].split(":")[0] == image
        assert container["command"][:2] == command
    [migrate] = containers(objects("Job")["darkroom-migrate"])
    assert migrate["image"].split(":")[0] == "darkroom-api"
    assert migrate["command"] == ["darkroom", "migrate"]


def test_only_workers_request_a_gpu_and_each_exactly_one() -> None:
    for name, workload in {**objects("Deployment"), **objects("Job")}.items():
        for container in containers(workload):
            resources = container.get("resources", {})
            gpus = {
                part.get("nvidia.com/gpu")
                for part in (resources.get("requests", {}), resources.get("limits", {}))
            }
            assert gpus == ({1} if name == "darkroom-worker" else {None}), name


def test_workers_get_time_to_finish_a_running_job() -> None:
    worker = objects("Deployment")["darkroom-worker"]["spec"]
    assert worker["template"]["spec"]["terminationGracePeriodSeconds"] >= 600
    assert worker["strategy"]["rollingUpdate"]["maxSurge"] == 0
    budgets = objects("PodDisruptionBudget")
    assert budgets["darkroom-worker"]["spec"]["maxUnavailable"] == 1


def test_disruption_budgets_and_services_select_real_pods() -> None:
    deployments = objects("Deployment")
    labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for name, budget in objects("PodDisruptionBudget").items():
        assert budget["spec"]["selector"]["matchLabels"] == labels[name]
    for name, service in objects("Service").items():
        assert service["spec"]["selector"] == labels[name]
        ports = {p["name"] for c in containers(deployments[name]) for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


def test_kubernetes_settings_are_real_and_validate_together() -> None:
    env = {**config_map(), **secret()}
    for workload in {**objects("Deployment"), **objects("Job")}.values():
        for container in containers(workload):
            env |= {var["name"]: var["value"] for var in container.get("env", [])}
    assert {k for k in env if k.startswith("DARKROOM_")} <= SETTING_NAMES
    assert {k for k in env if not k.startswith("DARKROOM_")} <= AWS_CREDENTIALS
    settings = settings_from(env)
    assert settings.job_queue == DEFAULTS.job_queue
    assert settings.webhook_queue == DEFAULTS.webhook_queue
    assert settings.storage == "s3"


def test_keda_scales_the_worker_deployment_on_the_jobs_queue() -> None:
    [scaled] = objects("ScaledObject").values()
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "darkroom-worker")
    assert scaled["spec"]["minReplicaCount"] >= 1
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    broker = urlsplit(config_map()["DARKROOM_BROKER_URL"])
    assert trigger["metadata"]["listName"] == config_map()["DARKROOM_JOB_QUEUE"]
    assert trigger["metadata"]["listName"] == DEFAULTS.job_queue
    assert trigger["metadata"]["address"] == f"{broker.hostname}:{broker.port}"
    assert trigger["metadata"]["databaseIndex"] == broker.path.strip("/")
    assert int(trigger["metadata"]["listLength"]) >= 1


def test_flower_in_kubernetes_watches_the_broker() -> None:
    [flower] = containers(objects("Deployment")["darkroom-flower"])
    assert f"--broker={config_map()['DARKROOM_BROKER_URL']}" in flower["command"]


def test_prometheus_annotations_name_the_metrics_ports() -> None:
    for name, deployment in objects("Deployment").items():
        if name == "darkroom-flower":
            continue
        scrape = pod_annotations(deployment)
        assert scrape["prometheus.io/scrape"] == "true", name
        assert scrape["prometheus.io/path"] == "/metrics", name
        ports = {p["containerPort"] for c in containers(deployment) for p in c["ports"]}
        assert int(scrape["prometheus.io/port"]) in ports, name
    for name, variable in (
        ("darkroom-worker", "DARKROOM_WORKER_METRICS_PORT"),
        ("darkroom-dispatcher", "DARKROOM_DISPATCHER_METRICS_PORT"),
    ):
        deployment = objects("Deployment")[name]
        [container] = containers(deployment)
        env = {var["name"]: var["value"] for var in container["env"]}
        assert env[variable] == pod_annotations(deployment)["prometheus.io/port"]
    assert config_map()["DARKROOM_METRICS_HOST"] == "0.0.0.0"


def test_the_api_serves_the_paths_that_probes_and_prometheus_use(settings: Settings) -> None:
    deployment = objects("Deployment")["darkroom-api"]
    [api] = containers(deployment)
    assert api["command"][-1] == str(api["ports"][0]["containerPort"])
    probes = (api["readinessProbe"], api["livenessProbe"])
    paths = {probe["httpGet"]["path"] for probe in probes}
    paths.add(pod_annotations(deployment)["prometheus.io/path"])
    with TestClient(create_app(settings)) as client:
        for path in sorted(paths):
            assert client.get(path).status_code == 200, path
