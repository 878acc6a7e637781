"""The `darkroom` command: run the tiers, apply migrations, manage keys.

Tier commands import their tier only when run, so `darkroom api` never loads torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence

from darkroom import admin
from darkroom.settings import Settings, get_settings

Command = Callable[[argparse.Namespace, Settings], int]


def _node(args: argparse.Namespace, tier: str) -> str:
    """A Celery node name unique on this host, so several workers can share a machine."""
    return str(args.name or f"{tier}-{os.getpid()}@%h")


def cmd_migrate(_args: argparse.Namespace, settings: Settings) -> int:
    """Bring the database to the newest schema."""
    from db.migrate import upgrade_to_head

    upgrade_to_head(settings.resolved_database_url)
    return 0


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the HTTP API."""
    import uvicorn

    from api.app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run a GPU worker: solo pool (no fork after CUDA), one job at a time."""
    from worker.gpu_app import app

    app.worker_main(
        [
            "worker",
            "-P",
            "solo",
            "-Q",
            settings.job_queue,
            "-n",
            _node(args, "worker"),
            "-l",
            "INFO",
        ]
    )
    return 0


def cmd_dispatcher(args: argparse.Namespace, settings: Settings) -> int:
    """Run the webhook dispatcher (thread pool) and the sweeper beside it."""
    from worker.dispatcher_app import app
    from worker.sweeper import run_sweeper

    stop = threading.Event()
    sweeper = threading.Thread(
        target=run_sweeper, args=(settings, app, stop), name="sweeper", daemon=True
    )
    sweeper.start()
    concurrency = str(settings.webhook_concurrency)
    argv = ["worker", "-P", "threads", "-c", concurrency, "-Q", settings.webhook_queue]
    try:
        app.worker_main([*argv, "-n", _node(args, "dispatcher"), "-l", "INFO"])
    finally:
        stop.set()
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """Migrate, then run API, worker and dispatcher until SIGINT/SIGTERM."""
    from darkroom.supervisor import run_all

    cmd_migrate(args, settings)
    return run_all(args.host, args.port)


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
        tier.set_defaults(handler=handler)
    sub.add_parser("migrate", help=cmd_migrate.__doc__).set_defaults(handler=cmd_migrate)
    admin.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `darkroom` command."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = _parser().parse_args(argv)
    handler: Command = args.handler
    return handler(args, get_settings())


if __name__ == "__main__":
    sys.exit(main())
