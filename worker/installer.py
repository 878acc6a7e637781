"""The model installer: claims an install, runs its steps, records its outcome.

Its own process (`darkroom installer`, started by `darkroom up`), never a GPU worker: a download
of several GB must not hold a GPU. Its queue is the `model_installs` table: it claims the oldest
queued install with a lease (renewed while it works, on the database's clock: `Installer.renew`
as bytes arrive, `Installer.leased` from a thread through steps that report no progress), so
there is no broker message to lose, and an installer killed mid-download leaves a row that the
next claim picks up once the lease has passed; the partial file under `.installing/<n>/` is
resumed. An install that killed its installer `install_max_attempts` times fails.

Each install, in a staging folder under the models folder (same file system, so the last step
is one atomic rename):
1. download (`worker.install_download`: SSRF guard, size and time limits, Range resume, SHA-256),
   or a Hub snapshot for a repo id;
2. verify (`worker.install_checks`: safetensors or a `.ckpt` loaded `weights_only`, the family
   read from the tensor names, a LoRA's or embedding's keys recognised);
3. convert (`worker.install_convert`: a single-file checkpoint once to a diffusers folder with
   its local configuration folder);
4. rename into place, record the outcome and queue the key's webhook in one transaction
   (`services.install_outcomes`), then ring the dispatcher.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from celery import Celery

from darkroom import families
from darkroom.families import UnrecognisedModelError
from darkroom.identities import ModelKind
from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.models import InstallState
from db.repositories import models as repo
from db.session import session_scope
from services import install_outcomes, model_folder
from services import models as service
from services import webhooks as webhook_service
from services.install_outcomes import Found
from worker.install_checks import InstallError
from worker.install_convert import verify_and_build
from worker.install_download import Downloader, Progress
from worker.leases import renewing

log = logging.getLogger(__name__)

#: Seconds between lease renewals while downloading or converting.
RENEW_EVERY_S = 2.0
PART = "download.part"


class InstallGoneError(Exception):
    """The install was deleted (or taken over) while this installer worked on it."""


@dataclass
class Claim:
    """One claimed install: what it is, and the lease this installer keeps renewing."""

    install_id: int
    kind: ModelKind
    model_id: str
    source: str
    options: dict[str, Any]
    attempts: int
    last_renewal: float = 0.0


class Installer:
    """Claims and runs installs until stopped (the `darkroom installer` process)."""

    def __init__(self, settings: Settings, broker: Celery | None) -> None:
        self.settings = settings
        self.broker = broker

    def run(self, stop: threading.Event) -> None:
        """Install whatever is queued, one at a time, until `stop` is set."""
        log.info("installer ready")
        while not stop.is_set():
            try:
                worked = self.run_one()
            except Exception:  # the database is down, say: try again shortly
                log.exception("installer: could not claim an install")
                worked = False
            if not worked:
                stop.wait(self.settings.install_poll_s)

    def run_one(self, install_id: int | None = None, progress: Progress | None = None) -> bool:
        """Claim one install (the oldest, or `install_id`) and run it; False if none was due."""
        claim = self._claim(install_id)
        if claim is None:
            return False
        self.install(claim, progress)
        return True

    def _claim(self, install_id: int | None) -> Claim | None:
        with session_scope(self.settings.resolved_database_url) as session:
            claimed = repo.claim_install(
                session, lease_s=self.settings.install_lease_s, install_id=install_id
            )
            install = repo.get_install_by_id(session, claimed) if claimed is not None else None
            if install is None:
                return None
            return Claim(
                install.id,
                install.kind,
                install.model_id,
                install.source,
                dict(install.options or {}),
                install.attempts,
                time.monotonic(),
            )

    def install(self, claim: Claim, progress: Progress | None = None) -> None:
        """Run one claimed install to its outcome (ready or failed), webhook queued."""
        staging = service.models_root(self.settings) / model_folder.STAGING / str(claim.install_id)
        message: str | None = None
        try:
            if claim.attempts > self.settings.install_max_attempts:
                raise InstallError(
                    f"The installer stopped {claim.attempts - 1} times while loading this "
                    "model; it was given up."
                )
            found = self._install(claim, staging, progress or _quiet)
        except InstallGoneError:
            log.info("install %s was deleted meanwhile; stopping", claim.install_id)
            shutil.rmtree(staging, ignore_errors=True)
            return
        except InstallError as refused:
            message = str(refused)
        except Exception as exc:  # a bug or the disk: the client still gets an answer
            log.exception("install %s failed", claim.install_id)
            message = f"The model could not be installed ({type(exc).__name__})."
        shutil.rmtree(staging, ignore_errors=True)
        if message is None:
            self._complete(claim, found, staging)
        else:
            failure = message
            self._finish(
                lambda s: install_outcomes.fail(s, self.settings, claim.install_id, failure)
            )

    def _complete(self, claim: Claim, found: Found, staging: Path) -> None:
        """Record a placed install as ready; if delete_model removed its row between the last
        lease renewal and the rename, what was placed is no install's: it goes too."""
        gone = False

        def record(session: Any) -> int | None:
            nonlocal gone
            install = repo.get_install_by_id(session, claim.install_id)
            gone = install is None
            return install_outcomes.complete(session, self.settings, claim.install_id, found)

        self._finish(record)
        if gone:
            log.info("install %s was deleted as it finished; removing it", claim.install_id)
            _take_away(service.target_path(self.settings, claim.kind, claim.model_id), staging)

    def _finish(self, record: Callable[[Any], int | None]) -> None:
        """Record the outcome (and its webhook) in one transaction; the outbox rings the
        dispatcher once it commits (without a broker, the sweeper sends the delivery)."""
        with session_scope(self.settings.resolved_database_url) as session:
            delivery_id = record(session)
            if self.broker is not None:
                webhook_service.publish(session, self.broker, self.settings, delivery_id)

    def renew(self, claim: Claim, done: int, total: int | None, force: bool = False) -> None:
        """Extend the lease (at most every RENEW_EVERY_S); InstallGoneError if the row went away."""
        now = time.monotonic()
        every_s = min(RENEW_EVERY_S, self.settings.install_lease_s / 3)  # well inside the lease
        if not force and now - claim.last_renewal < every_s:
            return
        claim.last_renewal = now
        with session_scope(self.settings.resolved_database_url) as session:
            alive = repo.renew_lease(
                session,
                claim.install_id,
                lease_s=self.settings.install_lease_s,
                bytes_done=done,
                size=total,
            )
        if not alive:
            raise InstallGoneError()

    def leased(self, claim: Claim, done: int) -> AbstractContextManager[None]:
        """Keep the claim's lease renewed from a thread while the block runs a step that reports
        no progress (a conversion, a Hub snapshot): otherwise a step longer than the lease lets
        another installer claim the install meanwhile. A deletion seen here stops the thread;
        the block's next renewal raises InstallGoneError."""

        def renew() -> bool:
            try:
                self.renew(claim, done, done or None, force=True)
            except InstallGoneError:
                return False
            return True

        every_s = min(RENEW_EVERY_S, self.settings.install_lease_s / 3)
        return renewing(renew, every_s, f"lease-{claim.install_id}")

    # --- the steps ------------------------------------------------------------------------

    def _install(self, claim: Claim, staging: Path, progress: Progress) -> Found:
        """Download, verify, convert and place; what was installed."""
        staging.mkdir(parents=True, exist_ok=True)
        target = service.target_path(self.settings, claim.kind, claim.model_id)
        if target.exists():
            raise InstallError(f"{claim.model_id!r} already exists in the models folder.")
        if service.is_hub_id(claim.source):
            return self._install_hub(claim, staging, target, progress)
        part = staging / PART
        downloader = Downloader(self.settings, partial(self.renew, claim), claim.kind)
        digest, size = downloader.fetch(claim.source, part, progress)
        with self.leased(claim, size):  # converting a large checkpoint takes minutes
            found, built = verify_and_build(
                self.settings,
                claim.kind,
                claim.options,
                part,
                staging,
                progress,
                lambda size_now: self.renew(claim, size_now, size_now, force=True),
            )
        self.renew(claim, size, size, force=True)  # still ours, just before the rename
        _place(built, target)
        return Found(found[0], found[1], size, digest)

    def _install_hub(self, claim: Claim, staging: Path, target: Path, progress: Progress) -> Found:
        """A Hugging Face repo (a diffusers folder) downloaded to staging, checked, placed."""
        from huggingface_hub import snapshot_download

        folder = staging / "hub"
        progress(0, None, "download")
        revision = claim.options.get("revision")
        try:
            with self.leased(claim, 0):  # a snapshot reports no progress of its own
                snapshot_download(
                    claim.source,
                    revision=revision if revision not in ("fp16", "fp32") else None,
                    local_dir=str(folder),
                    allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
                )
        except Exception as exc:
            raise InstallError(
                f"The Hub repo {claim.source!r} could not be downloaded: {type(exc).__name__}"
            ) from None
        shutil.rmtree(folder / ".cache", ignore_errors=True)
        if claim.kind == ModelKind.VAE:
            if not (folder / "config.json").is_file():
                raise InstallError(f"{claim.source} is no VAE folder (no config.json).")
            family = None
        else:
            try:
                family = families.detect_folder(folder)
            except UnrecognisedModelError as exc:
                raise InstallError(f"Unknown model family: {exc}") from None
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        self.renew(claim, size, size, force=True)
        _place(folder, target)
        return Found(family, "diffusers", size, None)


def _place(built: Path, target: Path) -> None:
    """Rename the verified file or folder into place: one atomic step, refused if taken."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise InstallError(f"{target.name} appeared in the models folder meanwhile.")
    os.rename(built, target)


def _take_away(target: Path, staging: Path) -> None:
    """Move `target` out of the models folder in one rename, then delete it."""
    trash = staging.with_name(f"{staging.name}-deleted")
    try:
        os.rename(target, trash)
    except FileNotFoundError:
        return
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def _quiet(_done: int, _total: int | None, _stage: str) -> None:
    """No progress display."""


def install_state(settings: Settings, install_id: int) -> InstallState | None:
    """An install's state now (for callers waiting on one)."""
    with session_scope(settings.resolved_database_url) as session:
        install = repo.get_install_by_id(session, install_id)
        return install.state if install is not None else None


def create_installer_app(settings: Settings) -> Installer:
    """The installer of `settings`, ringing the dispatcher through the broker when there is one."""
    broker = make_celery(settings)
    return Installer(settings, broker)
