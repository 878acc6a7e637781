"""The files of a dead run: one home for deleting what a run of a job stored but never recorded.

A run names its images for its claim's attempt (`services.responses.run_output_filename`) and
records them (job_outputs rows) only at the end; a run that dies in between leaves files that
no row names. Whoever ends that attempt for good deletes them: the sweeper when it hands the job
back (`worker.sweeper`), or a worker whose claim takes the expired job over directly, its
message redelivered before the sweeper looked (`worker.jobs`).
"""

from __future__ import annotations

import logging
import threading

from darkroom.settings import Settings
from darkroom.storage import Storage
from db.repositories import jobs
from db.session import session_scope
from services.responses import is_run_output

log = logging.getLogger(__name__)


def delete_unrecorded_files(
    settings: Settings, storage: Storage, file_prefix: str, attempt: int
) -> None:
    """Delete the images that the run of claim `attempt` of the job named `file_prefix` stored
    and never recorded: named for that claim, and named by no job_outputs row. Lists the job's
    own files only; another claim's run names its files otherwise. Call it once that attempt
    can no longer record (its claim was handed back or taken over, and committed). Best effort:
    a file left here is left as before."""
    try:
        names = [
            stored.name
            for stored in storage.listing(f"{file_prefix}-")
            if is_run_output(stored.name, file_prefix, attempt)
        ]
        if not names:
            return
        with session_scope(settings.resolved_database_url) as session:
            unrecorded = [name for name in names if jobs.get_output(session, name) is None]
        for name in unrecorded:
            storage.delete(name)
    except Exception:  # storage or database trouble: the job itself goes on
        log.warning("could not delete the files of a dead run of %s", file_prefix, exc_info=True)


def delete_unrecorded_files_soon(
    settings: Settings, storage: Storage, file_prefix: str, attempt: int
) -> threading.Thread:
    """`delete_unrecorded_files` from a thread, off the path of the generation that follows
    (listing S3 takes round trips); the thread, for a caller that waits."""
    thread = threading.Thread(
        target=delete_unrecorded_files,
        args=(settings, storage, file_prefix, attempt),
        name=f"dead-run-{file_prefix[:8]}",
        daemon=True,
    )
    thread.start()
    return thread
