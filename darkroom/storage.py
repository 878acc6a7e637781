"""Output storage: the worker writes, the API serves, the sweeper expires.

Shared by the tiers (it needs no image library): files are written atomically, each run of a
job under names of its own (see `services.responses.run_output_filename`), so a stale run never
replaces the file another run delivered. A write that fails raises `StorageError`, whose reason
is safe to show clients. `make_storage` picks the backend from the settings; every tier goes
through it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from darkroom.settings import Settings


class StorageError(Exception):
    """A write the storage refused or could not complete. `reason` says why in words safe to
    show clients (no path, bucket or credential): "no space left on device"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def local_write_error(exc: OSError) -> StorageError:
    """`exc` from a local write, as a StorageError naming only the kind of failure."""
    code = exc.errno
    reason = os.strerror(code).lower() if code else "the file could not be written"
    if code in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    return StorageError(reason)


@dataclass(frozen=True)
class StoredFile:
    """A stored file as a listing shows it: its name, size and when it was written (UTC)."""

    name: str
    size_bytes: int
    modified: datetime


class Storage(Protocol):
    """Where output images live."""

    def save(self, filename: str, data: bytes) -> None:
        """Store `data` as `filename`, atomically: readers see the old object or the new one.
        StorageError if the write fails."""

    def read(self, filename: str) -> bytes:
        """The bytes of a stored file (FileNotFoundError if there is none)."""

    def delete(self, filename: str) -> None:
        """Remove a file (already gone is fine)."""

    def path(self, filename: str) -> Path | None:
        """The local file the API may stream, or None (missing, or not on this machine)."""

    def public_link(self, filename: str) -> str | None:
        """A lasting direct link, or None where only the API serves the file."""

    def presigned_link(self, filename: str, ttl_s: int) -> str | None:
        """A direct link valid for `ttl_s` seconds, or None where only the API serves the file."""

    def remove_partial_writes(self, older_than_s: float) -> int:
        """Delete what writes interrupted by a crash left behind, older than `older_than_s`
        (so no write in progress is touched); how many were removed."""

    def listing(self, prefix: str) -> Iterator[StoredFile]:
        """The complete files whose names start with `prefix` (no write in progress), read
        lazily: for sweeps over files the database may not know."""


def make_storage(settings: Settings) -> Storage:
    """The storage backend the settings select."""
    if settings.storage == "s3":
        from darkroom.s3storage import S3Storage  # boto3 loads only where S3 is configured

        return S3Storage.from_settings(settings)
    return LocalStorage(settings.outputs_dir)


#: The temporary files of writes in progress: renamed into place when complete.
_PARTIAL_PREFIX, _PARTIAL_SUFFIX = ".tmp-", ".part"


class LocalStorage:
    """Files under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Best effort: readers (the API, a webhook payload) need no folder, and a worker's
        # unusable folder shows as a StorageError on its first write, failing that job only.
        with contextlib.suppress(OSError):
            root.mkdir(parents=True, exist_ok=True)

    def save(self, filename: str, data: bytes) -> None:
        """Write `data` as `filename` atomically: readers see the old file or the whole new one.
        StorageError when the folder refuses it (full, read-only, gone)."""
        try:
            self._write(filename, data)
        except OSError as exc:
            raise local_write_error(exc) from exc

    def _write(self, filename: str, data: bytes) -> None:
        """Write to a temporary file, flush it to disk, then rename it into place."""
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=_PARTIAL_PREFIX, suffix=_PARTIAL_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.root / filename)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read(self, filename: str) -> bytes:
        """The bytes of a stored file."""
        return (self.root / filename).read_bytes()

    def path(self, filename: str) -> Path | None:
        """Where a stored file lies, or None if it does not exist."""
        path = self.root / filename
        return path if path.is_file() else None

    def delete(self, filename: str) -> None:
        """Remove a file (already gone is fine)."""
        (self.root / filename).unlink(missing_ok=True)

    def public_link(self, filename: str) -> str | None:
        """None: local files are reachable only through the API."""
        return None

    def presigned_link(self, filename: str, ttl_s: int) -> str | None:
        """None: local files are reachable only through the API."""
        return None

    def listing(self, prefix: str) -> Iterator[StoredFile]:
        """The files named `prefix...` in the folder (temporary files of writes start with a
        dot, so no prefix of a real name matches them)."""
        for path in self.root.glob(f"{glob.escape(prefix)}*"):
            with contextlib.suppress(FileNotFoundError):  # deleted while listed
                stat = path.stat()
                modified = datetime.fromtimestamp(stat.st_mtime, UTC)
                yield StoredFile(path.name, stat.st_size, modified)

    def remove_partial_writes(self, older_than_s: float) -> int:
        """Delete temporary files of writes a killed worker never renamed into place."""
        cutoff = time.time() - older_than_s
        removed = 0
        for partial in self.root.glob(f"{_PARTIAL_PREFIX}*{_PARTIAL_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):  # another sweeper got there first
                if partial.stat().st_mtime < cutoff:
                    partial.unlink()
                    removed += 1
        return removed
