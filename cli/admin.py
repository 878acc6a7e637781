"""Operator commands: `darkroom keys ...`, `darkroom webhooks ...` and `darkroom jobs ...`.

Each prints one JSON object per line, so the output is readable and scriptable; the last line
of `keys create` and `keys rotate-secret` holds the secret values, shown only then. `jobs list`
and `jobs show` print for people (a table, a timeline) unless given `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from cli.output import print_row, text_table
from darkroom.identities import Operation
from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.models import ApiKey, JobRequeue, JobState
from db.repositories import keys, operator, webhooks
from db.session import session_scope
from services import job_events, job_views
from services import jobs as job_service
from services import keys as api_keys
from services import webhooks as services_webhooks
from services.links import output_url

#: Columns of `jobs list`: header and the summary field each shows.
LIST_COLUMNS = ("ID", "STATE", "OPERATION", "KEY", "CREATED", "ATTEMPTS", "OUTPUTS", "WEBHOOK")


def _key_row(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.key_prefix,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "admin": key.admin,
    }


def keys_create(args: argparse.Namespace, settings: Settings) -> int:
    """Create an API key (--admin: it may also manage the server); the last line printed is
    `{"key": ..., "webhook_secret": ..., "admin": ...}`."""
    with session_scope(settings.resolved_database_url) as session:
        issued = api_keys.create(session, args.name, admin=args.admin)
        secret = issued.row.webhook_secret
    print_row({"key": issued.plaintext, "webhook_secret": secret, "admin": args.admin})
    return 0


def keys_list(_args: argparse.Namespace, settings: Settings) -> int:
    """List keys (never their values: only a prefix is stored in clear)."""
    with session_scope(settings.resolved_database_url) as session:
        for key in keys.list_keys(session):
            print_row(_key_row(key))
    return 0


def _find_key(session: Session, ref: str) -> ApiKey | None:
    """The key named on the command line, or None after saying so."""
    key = keys.find_key(session, ref)
    if key is None:
        print_row({"error": f"no key {ref}"})
    return key


def keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    """Revoke a key by id or prefix."""
    try:
        with session_scope(settings.resolved_database_url) as session:
            print_row(_key_row(api_keys.revoke(session, args.key)))
    except api_keys.KeyNotFoundError as missing:
        print_row({"error": str(missing)})
        return 1
    return 0


def keys_rotate_secret(args: argparse.Namespace, settings: Settings) -> int:
    """New webhook secret; the old one co-signs for --grace-hours (default 24)."""
    grace = timedelta(hours=args.grace_hours)
    try:
        with session_scope(settings.resolved_database_url) as session:
            key, secret = api_keys.rotate_secret(session, args.key, grace)
            row = {
                "id": key.id,
                "webhook_secret": secret,
                "previous_valid_until": key.previous_secret_until,
            }
    except api_keys.KeyNotFoundError as missing:
        print_row({"error": str(missing)})
        return 1
    print_row(row)
    return 0


def webhooks_failed(_args: argparse.Namespace, settings: Settings) -> int:
    """List deliveries that gave up."""
    with session_scope(settings.resolved_database_url) as session:
        for delivery in webhooks.failed_deliveries(session):
            print_row(
                {
                    "id": delivery.id,
                    "job_id": delivery.job_id,
                    "webhook_id": delivery.message_id,
                    "url": delivery.url,
                    "attempts": delivery.attempt_count,
                    "last_error": delivery.last_error,
                    "finished_at": delivery.finished_at,
                }
            )
    return 0


def webhooks_replay(args: argparse.Namespace, settings: Settings) -> int:
    """Send failed deliveries again (same webhook-id): one by --id, or --all."""
    with session_scope(settings.resolved_database_url) as session:
        chosen = services_webhooks.replay(
            session, make_celery(settings), settings, None if args.all else args.id
        )
        replayed = [{"replayed": d.id, "webhook_id": d.message_id} for d in chosen]
    for row in replayed:
        print_row(row)
    if not chosen:
        print_row({"error": "no failed delivery matched"})
        return 1
    return 0


def jobs_list(args: argparse.Namespace, settings: Settings) -> int:
    """List the newest jobs, optionally only of one --state, --operation or --key."""
    with session_scope(settings.resolved_database_url) as session:
        key = _find_key(session, args.key) if args.key else None
        if args.key and key is None:
            return 1
        key_id = None if key is None else key.id
        wanted = operator.JobFilter(args.state, args.operation, key_id, args.limit)
        found = operator.list_jobs(session, wanted)
        rows = job_views.job_summaries(session, found, _link(settings))
    if args.json:
        for row in rows:
            print_row(row)
    else:
        print(text_table(LIST_COLUMNS, [_list_cells(row) for row in rows]))
    return 0


def jobs_show(args: argparse.Namespace, settings: Settings) -> int:
    """A job's parameters, meta, timeline (runs, requeues, webhook attempts) and outputs."""
    with session_scope(settings.resolved_database_url) as session:
        record = operator.job_record(session, args.id)
        view = None if record is None else job_views.job_detail(record, _link(settings))
    if view is None:
        print_row({"error": f"no job {args.id}"})
        return 1
    if args.json:
        print_row(view)
    else:
        print("\n".join(_detail_lines(view)))
    return 0


def jobs_cancel(args: argparse.Namespace, settings: Settings) -> int:
    """Cancel as the API does: a queued job fails at once, a running one at its next step."""
    try:
        with session_scope(settings.resolved_database_url) as session:
            canceled = job_service.cancel(session, make_celery(settings), settings, args.id)
    except job_service.RefusedError as refused:
        print_row({"error": str(refused)})
        return 1
    webhook = canceled.delivery_id
    print_row(
        {"id": args.id, "state": canceled.state.value, "cancel_requested": True, "webhook": webhook}
    )
    return 0


def jobs_watch(args: argparse.Namespace, settings: Settings) -> int:
    """Follow a job: its place in the queue, a progress bar while it runs, then its outcome
    (the webhook's payload, as JSON); exits 0 on success, 1 on failure."""
    shown: job_events.JobEvent | None = None
    tty = sys.stdout.isatty()
    while True:
        with session_scope(settings.resolved_database_url) as session:
            event = job_events.read_event(session, settings, args.id, None)
        if event is None:
            print_row({"error": f"no job {args.id}"})
            return 1
        if event != shown:
            shown = event
            if event.terminal:
                print("\n" if tty else "", end="")
                print_row(event.data)
                return 0 if event.name == "success" else 1
            line = progress_line(event)
            print(f"\r{line:<72}" if tty else line, end="" if tty else "\n", flush=True)
        time.sleep(args.interval)


def progress_line(event: job_events.JobEvent, width: int = 30) -> str:
    """One line for a queued or running job: its place, or a bar with step k of n."""
    data = event.data
    if event.name == "queued":
        return f"job {data['id']} queued: position {data['position']}, eta {data['eta']:.0f} s"
    filled = round(data["progress"] * width)
    bar = "#" * filled + "-" * (width - filled)
    return (
        f"job {data['id']} [{bar}] {data['progress']:4.0%} step {data['step']}/{data['steps']}"
        f" eta {data['eta']:.0f} s"
    )


def jobs_requeue(args: argparse.Namespace, settings: Settings) -> int:
    """Put a failed job, or a stuck running one, back in the queue with fresh attempts."""
    broker = make_celery(settings)
    try:
        with session_scope(settings.resolved_database_url) as session:
            record, receipt = job_service.requeue(
                session, broker, settings, args.id, force=args.force, reason=args.reason
            )
            replaced = _requeue_row(record)
    except job_service.RefusedError as refused:
        print_row({"error": str(refused)})
        return 1
    print_row({"id": args.id, "state": "queued", "published": bool(receipt.sent), **replaced})
    return 0


def _requeue_row(record: JobRequeue) -> dict[str, Any]:
    """What `jobs requeue` reports about the run it replaced."""
    hook = record.previous_webhook
    return {
        "previous_state": record.previous_state.value,
        "previous_attempts": record.previous_attempts,
        "superseded_webhook": None if hook is None else hook["webhook_id"],
    }


def _link(settings: Settings) -> job_views.Link:
    """Output links as clients see them, through the API."""
    return lambda filename: output_url(settings.public_url, filename)


def _list_cells(row: dict[str, Any]) -> list[str]:
    """One `jobs list` table row."""
    key = row["key"] or {}
    hook = row["webhook"]
    return [
        str(row["id"]),
        row["state"],
        row["operation"],
        str(key.get("prefix", "-")),
        str(row["created_at"])[:19],
        str(row["attempts"]),
        str(len(row["outputs"])),
        "-" if hook is None else f"{hook['state']}/{hook['attempts']}",
    ]


def _detail_lines(view: dict[str, Any]) -> list[str]:
    """`jobs show` for people: a header, then parameters, inputs, meta, timeline, outputs."""
    key = view["key"] or {}
    running = view["state"] == "processing" and view["progress"] is not None
    progress = f"{view['progress']:.0%}" if running else "-"
    lines = [
        f"job {view['id']}  {view['operation']} ({view['endpoint']})  {view['state']}  "
        f"key {key.get('id')} {key.get('name')} ({key.get('prefix')})",
        f"attempts {view['attempts']}  progress {progress}  track_id {view['track_id']}",
    ]
    if view["error"]:
        lines.append(f"error: {view['error']}")
    lines.append("params")
    lines += [f"  {name}: {value}" for name, value in view["params"].items()]
    lines.append("inputs")
    lines += [
        f"  {image['url']}" if image["kind"] == "url" else f"  inline image, {image['chars']} chars"
        for image in view["inputs"]
    ]
    lines.append(f"meta {json.dumps(view['meta'], default=str)}")
    lines.append("timeline")
    lines += [
        f"  {event['at'][:23]}  {event['event']:<17} {event['detail']}".rstrip()
        for event in view["timeline"]
    ]
    lines.append("outputs")
    lines += [
        f"  {out['url']}  {out['width']}x{out['height']}  seed {out['seed']}"
        for out in view["outputs"]
    ]
    return lines


def add_parsers(sub: Any) -> None:
    """Attach the `keys`, `webhooks` and `jobs` command groups to the main parser."""
    _add_key_parsers(sub)
    _add_webhook_parsers(sub)
    _add_job_parsers(sub)


def _add_key_parsers(sub: Any) -> None:
    group = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True
    )
    create = group.add_parser("create", help=keys_create.__doc__)
    create.add_argument("--name", required=True)
    create.add_argument(
        "--admin", action="store_true", help="may call the server-management endpoints"
    )
    create.set_defaults(handler=keys_create)
    group.add_parser("list", help=keys_list.__doc__).set_defaults(handler=keys_list)
    for name, handler in (("revoke", keys_revoke), ("rotate-secret", keys_rotate_secret)):
        command = group.add_parser(name, help=handler.__doc__)
        command.add_argument("key", help="key id or prefix")
        command.set_defaults(handler=handler)
        if handler is keys_rotate_secret:
            command.add_argument("--grace-hours", type=float, default=24.0)


def _add_webhook_parsers(sub: Any) -> None:
    hooks = sub.add_parser("webhooks", help="inspect and replay webhook deliveries")
    actions = hooks.add_subparsers(dest="action", required=True)
    actions.add_parser("failed", help=webhooks_failed.__doc__).set_defaults(handler=webhooks_failed)
    replay = actions.add_parser("replay", help=webhooks_replay.__doc__)
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int)
    which.add_argument("--all", action="store_true")
    replay.set_defaults(handler=webhooks_replay)


def _add_job_parsers(sub: Any) -> None:
    group = sub.add_parser("jobs", help="inspect, cancel and requeue jobs").add_subparsers(
        dest="action", required=True
    )
    listing = group.add_parser("list", help=jobs_list.__doc__)
    listing.add_argument("--state", type=JobState, choices=list(JobState))
    listing.add_argument("--operation", type=Operation, choices=list(Operation))
    listing.add_argument("--key", help="key id or prefix")
    listing.add_argument("--limit", type=int, default=50, help="the newest N (default 50)")
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    listing.set_defaults(handler=jobs_list)
    watch = group.add_parser("watch", help=jobs_watch.__doc__)
    watch.add_argument("id", type=int, help="job id")
    watch.add_argument("--interval", type=float, default=0.5, help="seconds between reads")
    watch.set_defaults(handler=jobs_watch)
    for name, handler in (("show", jobs_show), ("cancel", jobs_cancel), ("requeue", jobs_requeue)):
        command = group.add_parser(name, help=handler.__doc__)
        command.add_argument("id", type=int, help="job id")
        command.set_defaults(handler=handler)
        if handler is jobs_show:
            command.add_argument("--json", action="store_true", help="JSON instead of text")
        if handler is jobs_requeue:
            command.add_argument("--force", action="store_true", help="even if its worker is live")
            command.add_argument("--reason", help="kept in the requeue record")
