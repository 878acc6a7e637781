"""The worker's and the dispatcher's app factories: importing builds nothing, building twice
stacks nothing, and `darkroom worker --models` reaches the worker as settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from celery.utils.dispatch import Signal
from celery.worker.control import Panel

from cli.main import _parser, worker_settings
from darkroom.queue import DELIVER_WEBHOOK_TASK, RUN_JOB_TASK, make_celery
from darkroom.settings import Settings
from services.server import CLEAR_CACHE_COMMAND, NSFW_CHECK_COMMAND
from tests.support.system import free_port, settings_env
from worker.dispatcher_app import create_dispatcher_app
from worker.gpu_app import READY_HOOK, SHUTDOWN_HOOK, SHUTTING_DOWN_HOOK, create_worker_app

SIGNALS = (
    setup_logging,
    task_prerun,
    task_postrun,
    worker_init,
    worker_ready,
    worker_shutting_down,
    worker_shutdown,
)

#: Run in a fresh interpreter: what importing both app modules built, then what asking the
#: Celery command line's way (`-A worker.dispatcher_app`) for `app` built.
IMPORT_PROBE = """
import json, logging
root_handlers = list(logging.getLogger().handlers)
import worker.dispatcher_app, worker.gpu_app
from celery import _state, signals
from prometheus_client import REGISTRY
from darkroom.metrics import GpuMemoryCollector
hooks = [signals.setup_logging, signals.task_prerun, signals.worker_init, signals.worker_ready]
found = {
    "apps": len(_state._apps),
    "receivers": sum(len(signal.receivers) for signal in hooks),
    "root_handlers_changed": logging.getLogger().handlers != root_handlers,
    "gpu_collector": any(isinstance(c, GpuMemoryCollector) for c in REGISTRY._collector_to_names),
}
app = worker.dispatcher_app.app
found["command_line_app"] = [app.main, app is worker.dispatcher_app.app, len(_state._apps)]
print(json.dumps(found))
"""


@pytest.fixture
def restored_hooks() -> Iterator[None]:
    """Put Celery's process-wide signals and control commands back as they were: the apps
    built here must not leave hooks behind for later tests in this process."""
    receivers = {signal: list(signal.receivers) for signal in SIGNALS}
    commands = {name: Panel.data.get(name) for name in (CLEAR_CACHE_COMMAND, NSFW_CHECK_COMMAND)}
    yield
    for signal, saved in receivers.items():
        signal.receivers[:] = saved
        signal.sender_receivers_cache.clear()
    for name, command in commands.items():
        if command is None:
            Panel.data.pop(name, None)
        else:
            Panel.data[name] = command


def _under(signal: Signal, uid: str) -> int:
    """How many receivers `signal` holds under the dispatch id `uid`."""
    return sum(1 for (key, _sender), _receiver in signal.receivers if key == uid)


def test_importing_the_apps_builds_nothing(settings: Settings, tmp_path: Path) -> None:
    env = settings_env(settings, tmp_path / "data")
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])

    assert found["apps"] == 0  # no Celery app
    assert found["receivers"] == 0  # no logging install, no metrics exporter, no worker hooks
    assert not found["root_handlers_changed"]
    assert not found["gpu_collector"]
    # The probe sees an app once one is built: Flower's `-A worker.dispatcher_app` gets one.
    assert found["command_line_app"] == ["darkroom-dispatcher", True, 1]


def test_building_twice_replaces_the_hooks_instead_of_adding(
    settings: Settings, restored_hooks: None
) -> None:
    ported = settings.model_copy(
        update={"worker_metrics_port": free_port(), "dispatcher_metrics_port": free_port()}
    )
    first = create_worker_app(ported)
    counts = {signal: len(signal.receivers) for signal in SIGNALS}
    second = create_worker_app(ported)
    dispatcher = create_dispatcher_app(ported)
    create_dispatcher_app(ported)

    assert {signal: len(signal.receivers) for signal in SIGNALS} == counts
    for signal, uid in (
        (worker_ready, READY_HOOK),
        (worker_shutting_down, SHUTTING_DOWN_HOOK),
        (worker_shutdown, SHUTDOWN_HOOK),
        (setup_logging, "darkroom.logs.setup"),
        (worker_init, "darkroom.metrics.serve"),
    ):
        assert _under(signal, uid) == 1, uid
    # The newest worker's hooks are the ones that run.
    worker_shutting_down.send(sender="test@host", sig="SIGTERM", how="Warm", exitcode=0)
    assert second.affinity._stopped.is_set()
    assert not first.affinity._stopped.is_set()
    assert second.app is not first.app
    assert second.runtime.cache is not first.runtime.cache
    # Each task is registered on its own app only (not shared with every app in the process).
    assert RUN_JOB_TASK in second.app.tasks
    assert DELIVER_WEBHOOK_TASK in dispatcher.app.tasks
    assert RUN_JOB_TASK not in dispatcher.app.tasks
    other = make_celery(ported)
    assert not {RUN_JOB_TASK, DELIVER_WEBHOOK_TASK} & set(other.tasks)


def test_models_option_reaches_the_worker_settings_not_the_environment(
    settings: Settings, restored_hooks: None
) -> None:
    environment = dict(os.environ)
    args = _parser().parse_args(["worker", "--models", "tiny-a, tiny-b,"])

    worker = create_worker_app(worker_settings(args, settings))

    assert worker.settings.worker_models == ["tiny-a", "tiny-b"]
    assert worker.affinity.settings.worker_models == ["tiny-a", "tiny-b"]
    assert dict(os.environ) == environment
    assert settings.worker_models == []  # the settings passed in are not modified
    unset = worker_settings(_parser().parse_args(["worker"]), settings)
    assert unset is settings
