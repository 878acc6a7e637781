"""The dispatcher's Celery app: consumes webhook delivery ids on their own queue.

It runs a thread pool (`darkroom dispatcher`), so one slow receiver holds one thread for at
most the attempt timeout, and never a GPU. It imports no torch.

Importing this module builds nothing: `create_dispatcher_app(settings)` builds the app. The
Celery command line (`celery -A worker.dispatcher_app flower`, see
docs/OBSERVABILITY.md) finds `app`, built from the environment's settings when first asked for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from celery import Celery

from darkroom.logs import install_celery_logging
from darkroom.metrics import serve_metrics_in_worker
from darkroom.queue import DELIVER_WEBHOOK_TASK, make_celery
from darkroom.settings import Settings, get_settings
from worker.webhooks.dispatcher import deliver


@dataclass(frozen=True)
class DispatcherApp:
    """The dispatcher: its Celery app (each attempt takes its thread's HTTP client for the
    receiver's host: `worker.webhooks.dispatcher.attempt`)."""

    app: Celery


def create_dispatcher_app(settings: Settings) -> DispatcherApp:
    """Build the dispatcher for `settings`: its app, delivery task, logging and metrics hooks."""
    app = make_celery(settings, "darkroom-dispatcher")
    install_celery_logging(settings.log_format, settings.log_level)
    serve_metrics_in_worker(settings.dispatcher_metrics_port, settings.metrics_host)
    # Acknowledge deliveries on receipt. The delivery row (its lease and due time) is what keeps
    # a webhook safe: if this process dies mid-attempt the sweeper publishes it again. Late acks
    # would add nothing, and kombu's restore of unacked messages on a broker disconnect crashes
    # the whole worker (kombu 5.7: AttributeError in the Redis transport's _connparams), sweeper
    # included.
    app.conf.task_acks_late = False
    app.conf.task_reject_on_worker_lost = False

    # On this app only (`shared=False`): other apps built in the process do not get the task.
    @app.task(name=DELIVER_WEBHOOK_TASK, shared=False)
    def deliver_webhook_task(delivery_id: int) -> None:
        """Thin shell: everything happens in worker.webhooks.dispatcher.deliver."""
        deliver(delivery_id, settings)

    return DispatcherApp(app=app)


@functools.cache
def _command_line_dispatcher() -> DispatcherApp:
    """The dispatcher the Celery command line gets, from the environment's settings; once."""
    return create_dispatcher_app(get_settings())


def __getattr__(name: str) -> Celery:
    """`app`, built on first access, for `celery -A worker.dispatcher_app`; nothing at import."""
    if name == "app":
        return _command_line_dispatcher().app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
