"""The `darkroom` command: run the tiers, apply migrations, manage keys.

Tier commands import their tier only when run, so `darkroom api` never loads torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence

from cli import admin
from cli import models as model_commands
from darkroom.heap import freeze_startup_objects
from darkroom.logs import configure_logging, resolve_format
from darkroom.settings import Settings, get_settings

Command = Callable[[argparse.Namespace, Settings], int]


def _node(args: argparse.Namespace, tier: str) -> str:
    """A Celery node name unique on this host, so several workers can share a machine."""
    return str(args.name or f"{tier}-{os.getpid()}@%h")


def _celery_argv(settings: Settings, *argv: str) -> list[str]:
    """`celery worker` arguments; with JSON logs no banner, so every line of output is JSON."""
    quiet = ["--quiet"] if resolve_format(settings.log_format) == "json" else []
    return [*quiet, "worker", *argv, "-l", settings.log_level]


def cmd_migrate(_args: argparse.Namespace, settings: Settings) -> int:
    """Bring the database to the newest schema."""
    from db.migrate import upgrade_to_head

    upgrade_to_head(settings.resolved_database_url)
    return 0


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the HTTP API."""
    from api.app import create_app
    from api.server import serve

    app = create_app(settings)
    freeze_startup_objects()  # darkroom/heap.py: no full collection walks the imports again
    # Read deadlines, connection cap and open-files limit: api/server.py.
    serve(app, settings, args.host, args.port)
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run a GPU worker: solo pool (no fork after CUDA), one job at a time."""
    from darkroom.logs import adopt_library_loggers

    adopt_library_loggers()  # before the worker's imports write their first warnings
    from worker.gpu_app import create_worker_app

    settings = worker_settings(args, settings)
    app = create_worker_app(settings).app
    app.worker_main(
        _celery_argv(settings, "-P", "solo", "-Q", settings.job_queue, "-n", _node(args, "worker"))
    )
    return 0


def worker_settings(args: argparse.Namespace, settings: Settings) -> Settings:
    """The worker's settings: `--models`, when given, replaces DARKROOM_WORKER_MODELS."""
    if args.models is None:
        return settings
    return settings.model_copy(update={"worker_models": args.models})


def _model_list(value: str) -> list[str]:
    """`--models a, b` as a list, split as the variable is (empty parts dropped)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def cmd_workers(_args: argparse.Namespace, settings: Settings) -> int:
    """List the live workers: the models each advertises, its cold loads per model, jobs run."""
    from dataclasses import asdict

    from services.routing import live_workers, routing_enabled

    if not routing_enabled(settings):
        print(json.dumps({"error": "model-affinity routing is off: it needs a Redis broker"}))
        return 1
    for worker in live_workers(settings):
        print(json.dumps(asdict(worker)))
    return 0


def cmd_dispatcher(args: argparse.Namespace, settings: Settings) -> int:
    """Run the webhook dispatcher (thread pool) and the sweeper beside it: the database-driven
    loop with Postgres and Redis (unless DARKROOM_WEBHOOK_LOOP=false), else Celery tasks."""
    from worker.dispatcher_app import create_dispatcher_app
    from worker.sweeper import run_sweeper
    from worker.webhooks.progress import run_progress_sender

    dispatcher = create_dispatcher_app(settings)
    freeze_startup_objects()  # darkroom/heap.py: no full collection walks the imports again
    stop = threading.Event()
    loop = settings.delivers_by_loop
    sweeper = threading.Thread(
        target=run_sweeper,
        args=(settings, dispatcher.app, stop),
        kwargs={"deliveries": not loop},  # the loop finds due deliveries without messages
        name="sweeper",
        daemon=True,
    )
    sweeper.start()
    # Progress webhooks (start, progress) have a thread and rows of their own: never retried,
    # they never wait in the terminal deliveries' queue nor hold its threads.
    threading.Thread(
        target=run_progress_sender,
        args=(settings, stop),
        name="progress-webhooks",
        daemon=True,
    ).start()
    try:
        if loop:
            _run_delivery_loop(args, settings, stop)
        else:
            concurrency = str(settings.webhook_concurrency)
            argv = ["-P", "threads", "-c", concurrency, "-Q", settings.webhook_queue]
            dispatcher.app.worker_main(
                _celery_argv(settings, *argv, "-n", _node(args, "dispatcher"))
            )
    finally:
        stop.set()
    return 0


def _run_delivery_loop(args: argparse.Namespace, settings: Settings, stop: threading.Event) -> None:
    """The loop in this thread until SIGTERM or SIGINT; attempts under way are recorded."""
    from darkroom.metrics import serve_metrics
    from worker.webhooks.loop import run_loop

    configure_logging(settings.log_format, settings.log_level)
    # httpx logs every request at INFO: a second JSON line per delivery, saying less than the
    # attempt's own line (status, ids), at a cost the loop's throughput notices.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if settings.dispatcher_metrics_port:  # no Celery worker starts, so its hook never runs
        serve_metrics(settings.dispatcher_metrics_port, settings.metrics_host)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    node = _node(args, "dispatcher").replace("%h", socket.gethostname())
    logging.getLogger("darkroom.dispatcher").info("%s ready.", node)
    run_loop(settings, stop)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """Migrate, then run API, worker and dispatcher until SIGINT/SIGTERM."""
    from cli import supervisor

    missing = supervisor.missing_worker_modules()
    if missing:
        print(supervisor.missing_modules_line(missing), file=sys.stderr)
        return 1
    token = supervisor.laptop_admin_token(settings)
    if token:  # the tiers read their settings from the environment
        os.environ["DARKROOM_ADMIN_TOKEN"] = token
    public_url = supervisor.default_public_url(settings, args.host, args.port)
    if public_url:
        os.environ["DARKROOM_PUBLIC_URL"] = public_url
    lines = supervisor.startup_lines(settings, args.host, args.port, token)
    cmd_migrate(args, settings)
    return supervisor.run_all(args.host, args.port, lambda: print(*lines, sep="\n", flush=True))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="darkroom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, handler in (("up", cmd_up), ("api", cmd_api)):
        tier = sub.add_parser(name, help=handler.__doc__)
        tier.add_argument("--host", default="127.0.0.1")
        tier.add_argument("--port", type=int, default=8000)
        tier.set_defaults(handler=handler)
    for name, handler in (("worker", cmd_worker), ("dispatcher", cmd_dispatcher)):
        tier = sub.add_parser(name, help=handler.__doc__)
        tier.add_argument("--name", default=None, help="Celery node name (default: unique)")
        if handler is cmd_worker:
            models_help = "models to load at start, e.g. my-sd,pix2pix: (DARKROOM_WORKER_MODELS)"
            tier.add_argument("--models", type=_model_list, default=None, help=models_help)
        tier.set_defaults(handler=handler)
    sub.add_parser("workers", help=cmd_workers.__doc__).set_defaults(handler=cmd_workers)
    sub.add_parser("migrate", help=cmd_migrate.__doc__).set_defaults(handler=cmd_migrate)
    admin.add_parsers(sub)
    model_commands.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `darkroom` command."""
    args = _parser().parse_args(argv)
    handler: Command = args.handler
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    return handler(args, settings)


if __name__ == "__main__":
    sys.exit(main())
