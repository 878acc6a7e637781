"""`darkroom models list|inspect|add|remove` and `darkroom installer`.

`add` is load_model's code (services.models.request_install, then the installer's steps), run
in this process with a progress bar on a terminal; when a running installer (`darkroom up`)
takes the install first, `add` follows its progress instead. A local file is installed the same
way as a download: copied into the staging folder, verified, converted, renamed into place.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cli.output import text_table
from darkroom.identities import ModelKind
from darkroom.settings import Settings
from db.models import InstallState
from db.session import session_scope
from services import models

#: `--type` values and the install kinds they name (the hosted API's model_type spellings too).
TYPES = {
    "model": ModelKind.MODEL,
    "custom_ckpt": ModelKind.MODEL,
    "huggingface": ModelKind.MODEL,
    "lora": ModelKind.LORA,
    "embedding": ModelKind.EMBEDDING,
    "embeddings": ModelKind.EMBEDDING,
    "vae": ModelKind.VAE,
}
LIST_COLUMNS = ("MODEL_ID", "TYPE", "STATE", "FAMILY", "FORMAT", "SIZE")
BAR_WIDTH = 30


def cmd_installer(_args: argparse.Namespace, settings: Settings) -> int:
    """Run the model installer: downloads, verifies and converts what load_model asks for."""
    from worker.installer import create_installer_app

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    create_installer_app(settings).run(stop)
    return 0


def models_list(_args: argparse.Namespace, settings: Settings) -> int:
    """Every model, LoRA, embedding and VAE, installed or installing."""
    with session_scope(settings.resolved_database_url) as session:
        rows = models.list_all(session, settings)
    print(text_table(LIST_COLUMNS, [_cells(row) for row in rows]))
    return 0


def models_inspect(args: argparse.Namespace, settings: Settings) -> int:
    """One model: family, format, size, state, where its files are, which workers hold it."""
    try:
        with session_scope(settings.resolved_database_url) as session:
            found = models.verify(session, settings, args.id)
    except models.InstallRefusedError as refused:
        print(json.dumps({"error": str(refused)}))
        return 1
    found["files"] = _files(settings, found["model_type"], args.id)
    found["workers"] = _holding_workers(settings, args.id)
    print(json.dumps(found, indent=2, default=str))
    return 0


def models_add(args: argparse.Namespace, settings: Settings) -> int:
    """Install a model, LoRA, embedding or VAE from a URL, a Hub repo id or a local file."""
    from worker.installer import Installer

    kind = TYPES[args.type]
    source = args.source
    if Path(source).is_file():
        source = Path(source).resolve().as_uri()
    else:
        try:
            models.check_source(source, kind)
        except models.InstallRefusedError as refused:
            return _error(str(refused))
    try:
        models.check_model_id(args.id, kind)
        request = models.InstallRequest(kind, args.id, source, {"model_type": args.type})
        with session_scope(settings.resolved_database_url) as session:
            started = models.request_install(session, settings, request, None)
    except models.InstallRefusedError as refused:
        return _error(str(refused))
    bar = ProgressBar() if sys.stderr.isatty() else None
    ran = Installer(settings, None).run_one(started.install_id, bar.show if bar else None)
    if not ran:  # a running installer took it: follow it
        _follow(settings, started.install_id, bar)
    if bar is not None:
        bar.end()
    with session_scope(settings.resolved_database_url) as session:
        found = models.verify(session, settings, args.id)
    print(json.dumps(found, default=str))
    return 0 if found["model_status"] == InstallState.READY.value else 1


def models_remove(args: argparse.Namespace, settings: Settings) -> int:
    """Remove a model (its files and its record); refused while queued jobs use it."""
    try:
        with session_scope(settings.resolved_database_url) as session:
            removed = models.delete(session, settings, args.id)
    except models.InstallRefusedError as refused:
        return _error(str(refused))
    print(json.dumps({"model_id": args.id, "removed": removed}))
    return 0


def _follow(settings: Settings, install_id: int, bar: ProgressBar | None) -> None:
    """Wait for an install another installer runs, showing its progress."""
    from db.repositories import models as repo

    while True:
        with session_scope(settings.resolved_database_url) as session:
            install = repo.get_install_by_id(session, install_id)
            if install is None or install.state in (InstallState.READY, InstallState.FAILED):
                return
            done, total = install.bytes_done, install.size_bytes
        if bar is not None:
            bar.show(done, total, "download")
        time.sleep(0.5)


class ProgressBar:
    """One line on stderr, redrawn: stage, bar, bytes."""

    def show(self, done: int, total: int | None, stage: str) -> None:
        """Draw the bar for `done` of `total` bytes (a spinner-free count when unknown)."""
        if total:
            filled = int(BAR_WIDTH * min(done / total, 1.0))
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            text = f"\r{stage:9} [{bar}] {done / 2**20:8.1f}/{total / 2**20:.1f} MiB"
        else:
            text = f"\r{stage:9} {done / 2**20:8.1f} MiB"
        sys.stderr.write(text)
        sys.stderr.flush()

    def end(self) -> None:
        """Finish the line."""
        sys.stderr.write("\n")


def _error(message: str) -> int:
    print(json.dumps({"error": message}))
    return 1


def _files(settings: Settings, kind: ModelKind, model_id: str) -> list[str]:
    """The files and folders that hold the model."""
    if settings.models_dir is None:
        return []
    target = models.target_path(settings, kind, model_id)
    candidates = [target, target.with_name(target.name + ".safetensors")]
    return [str(path) for path in candidates if path.exists()]


def _holding_workers(settings: Settings, model_id: str) -> list[str]:
    """The live workers that advertise the model as resident (needs the Redis broker)."""
    from services.routing import live_workers, routing_enabled

    if not routing_enabled(settings):
        return []
    try:
        workers = live_workers(settings)
    except Exception:  # the broker is down: say nothing rather than fail the inspect
        return []
    return [w.name for w in workers if any(model_id in key for key in w.models)]


def _cells(row: dict[str, Any]) -> list[str]:
    size = row.get("size_bytes")
    return [
        str(row["model_id"]),
        str(row["model_type"]),
        str(row["model_status"]),
        str(row.get("family") or "-"),
        str(row.get("format") or "-"),
        f"{size / 2**20:.1f} MiB" if size else "-",
    ]


def add_parsers(sub: Any) -> None:
    """`darkroom installer` and `darkroom models ...`."""
    sub.add_parser("installer", help=cmd_installer.__doc__).set_defaults(handler=cmd_installer)
    group = sub.add_parser("models", help="list, inspect, add and remove models").add_subparsers(
        dest="action", required=True
    )
    group.add_parser("list", help=models_list.__doc__).set_defaults(handler=models_list)
    for name, handler in (("inspect", models_inspect), ("remove", models_remove)):
        command = group.add_parser(name, help=handler.__doc__)
        command.add_argument("id")
        command.set_defaults(handler=handler)
    add = group.add_parser("add", help=models_add.__doc__)
    add.add_argument("source", help="an http(s) URL, a Hub repo id (owner/name) or a local file")
    add.add_argument("--id", required=True, help="the model_id to install it under")
    add.add_argument("--type", choices=sorted(TYPES), default="model")
    add.set_defaults(handler=models_add)
