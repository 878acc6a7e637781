"""Fetch by id: the processing, success or failed shape of one of the caller's jobs.

Like a submit, a fetch may wait for the job to end (`Prefer: wait=N`): a long poll.

Most fetches are polls of a queued or running job by a key seen in the last few seconds: those
are answered on the event loop (`PollReads`: the key from the cache, one async read, the queue
view from its cache), with no thread-pool hop. Everything else (a key to look up, a finished
or missing job, a stale queue view, SQLite, a failed read) takes the threaded path.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy.orm import Session

from api.auth import Work, cached_key, get_key_cache, keyed
from api.deps import BodyDep, SettingsDep, presented_key
from api.errors import ApiError
from api.middleware import ServiceBusy
from api.schemas import FetchRequest
from api.schemas.answers import ErrorAnswer, JobAnswer
from api.schemas.examples import ANSWER_EXAMPLES, INVALID_KEY
from api.waiting import (
    ReadAnswer,
    applied_preference,
    get_waiter,
    requested_wait,
    wait_for_outcome,
)
from darkroom.settings import Settings
from db.async_read import AsyncReadPool
from db.models import ApiKey, Job, JobState
from db.repositories import jobs
from db.repositories.jobs import JobPoll, PolledJob, QueueView
from db.session import read_scope
from services import eta
from services.links import OutputLinks
from services.responses import failed_body, processing_body, success_body

router = APIRouter(tags=["fetch"])

Answer = dict[str, Any]

#: How every job endpoint's answers are documented (the shapes in api.schemas.answers).
JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": JobAnswer,
        "description": "The job's processing, success or failed shape.",
        "content": {
            "application/json": {
                "examples": {name: {"value": value} for name, value in ANSWER_EXAMPLES.items()}
            }
        },
    },
    401: {
        "model": ErrorAnswer,
        "description": "Invalid Api Key",
        "content": {"application/json": {"example": INVALID_KEY}},
    },
    404: {"model": ErrorAnswer, "description": "No such job for this key"},
    422: {"model": ErrorAnswer, "description": "Invalid fields, each with its messages"},
    503: {"model": ErrorAnswer, "description": "The database cannot be reached"},
}

#: What a client may send to wait for the result, in every job endpoint's description.
WAIT_HELP = (
    "Optional sync wait: send the header `Prefer: wait=N` (RFC 7240) or a body field"
    " `wait: N` to keep the request open up to N seconds (at most DARKROOM_SYNC_WAIT_MAX_S):"
    " the answer is the success or failed shape as soon as the job ends, or the processing"
    " shape when N seconds pass first. The answer then carries `Preference-Applied: wait=N`."
)


def fetch_job(session: Session, settings: Settings, key: ApiKey, job_id: int) -> Answer:
    """The current shape of job `job_id`; another key's job answers exactly like a missing one."""
    job = jobs.poll_job_for_key(session, job_id, key.id)
    if job is None:
        raise ApiError(404, f"No request with id {job_id}.")
    if job.state == JobState.SUCCESS:
        return _success_answer(settings, job)
    if job.state == JobState.FAILED:
        return failed_body(job)
    return _processing_answer(settings, QUEUE_VIEWS.get(session, settings, job.id), job)


#: Answers with `base64: yes` outputs a process builds at once. Each holds its PNGs about
#: three times over while it is built (the files, their base64, the JSON body: ~45 MB for four
#: 1024x1024 samples), and every API thread could be building one; `AnswerBytesLimit` bounds
#: them once built, this while they are built. A probe's 150 slow readers of such a job took
#: the API to 1.1 GB with only the first.
BASE64_BUILDS_AT_ONCE = 4
BASE64_BUILDS = threading.BoundedSemaphore(BASE64_BUILDS_AT_ONCE)
#: How long a fetch waits for a turn to build one before it is told the service is busy.
BASE64_BUILD_WAIT_S = 0.5


def _success_answer(settings: Settings, job: Job) -> Answer:
    """A finished job's answer; one with base64 outputs waits for one of BASE64_BUILDS."""
    links = OutputLinks.from_settings(settings)
    if not job.params.get("base64_output"):
        return success_body(job, links, links.storage.read)
    if not BASE64_BUILDS.acquire(timeout=BASE64_BUILD_WAIT_S):
        raise ServiceBusy()
    try:
        return success_body(job, links, links.storage.read)
    finally:
        BASE64_BUILDS.release()


def _processing_answer(settings: Settings, view: QueueView, job: PolledJob) -> Answer:
    """A queued or running job's answer, its eta from `view`."""
    seconds = eta.eta_from(eta.snapshot_for(view, job), job)
    return processing_body(job, settings.public_url, seconds)


class QueueViews:
    """The last `QueueView` of each database, shared by this process's polls for
    DARKROOM_ETA_CACHE_S: a poll of a queued job then costs one indexed read, not four.
    Per database URL, because one process (the tests') may serve several."""

    def __init__(self) -> None:
        self._views: dict[str, tuple[float, QueueView]] = {}
        #: Until when a poll that found the view stale is re-reading it, per database URL.
        self._refreshing: dict[str, float] = {}
        self._lock = threading.Lock()

    def fresh(self, settings: Settings) -> QueueView | None:
        """The view if it is at most `eta_cache_s` old; needs no session (nor a thread)."""
        with self._lock:
            entry = self._views.get(settings.resolved_database_url)
        return entry[1] if entry is not None and entry[0] > time.monotonic() else None

    def for_event_loop(self, settings: Settings) -> QueueView | None:
        """A view for a poll answered on the event loop (`PollReads`): the fresh one; the last
        one while another poll re-reads it on the threaded path (so the polls in flight when
        it expires do not all take that path and all re-read it); None for the first poll to
        find it stale, which then re-reads it. Its claim lapses after `eta_cache_s` (that poll
        may need no view: a finished job), so a view is at most about twice that old."""
        url = settings.resolved_database_url
        now = time.monotonic()
        with self._lock:
            entry = self._views.get(url)
            if entry is None:
                return None
            expires, view = entry
            if expires > now or self._refreshing.get(url, 0.0) > now:
                return view
            self._refreshing[url] = now + settings.eta_cache_s
            return None

    def get(self, session: Session, settings: Settings, anchor_id: int) -> QueueView:
        """A view at most `eta_cache_s` old, read in `session` when there is none."""
        url = settings.resolved_database_url
        view = self.fresh(settings)
        if view is not None:
            return view
        view = jobs.queue_view(session, anchor_id)
        if settings.eta_cache_s > 0:
            with self._lock:
                self._views[url] = (time.monotonic() + settings.eta_cache_s, view)
        return view


QUEUE_VIEWS = QueueViews()


class PollReads:
    """Polls of queued and running jobs answered on the event loop (module docstring).

    Only what the threaded path would answer the same way is answered here: a key the cache
    vouches for (so a revoked key stops within DARKROOM_API_KEY_CACHE_S, as on the threaded
    path), the job read with `api_key_id` in its WHERE (another key's job is never read), the
    shared queue view (`QueueViews.for_event_loop`). None sends the request down the threaded
    path, which decides."""

    def __init__(self, pool: AsyncReadPool) -> None:
        self.pool = pool
        self._sql = pool.compile(jobs.POLL_QUERY)
        #: Polls answered here, not on the threaded path: for tests and operators.
        self.answered = 0

    @classmethod
    def for_settings(cls, settings: Settings) -> PollReads | None:
        """Reads over their own small pool, on Postgres when DARKROOM_DB_POLL_POOL_SIZE > 0."""
        url = settings.resolved_database_url
        if settings.db_poll_pool_size <= 0 or not AsyncReadPool.usable_for(url):
            return None
        return cls(AsyncReadPool(url, settings.db_poll_pool_size, settings.db_pool_timeout_s))

    async def answer(
        self, settings: Settings, key: ApiKey | None, job_id: int
    ) -> tuple[Answer, ApiKey] | None:
        """The answer to `key`'s poll of `job_id`, or None: take the threaded path."""
        if key is None or not 1 <= job_id <= jobs.MAX_JOB_ID:
            return None
        view = QUEUE_VIEWS.for_event_loop(settings)
        if view is None:
            return None
        row = await self.pool.fetch_one(self._sql, {"job_id": job_id, "api_key_id": key.id})
        if row is None:  # not this key's job (the threaded path answers the 404), or no read
            return None
        job = JobPoll.from_row(row)
        if job.state not in (JobState.QUEUED, JobState.PROCESSING):
            return None  # a finished job's answer needs its outputs or its error
        self.answered += 1
        return _processing_answer(settings, view, job), key


def job_reader(settings: Settings, key: ApiKey, job_id: int) -> ReadAnswer:
    """Reads the job's current answer in a session of its own, closed at once."""

    def read() -> Answer:
        with read_scope(settings.resolved_database_url) as session:
            return fetch_job(session, settings, key, job_id)

    return read


async def answer_or_wait(
    request: Request, response: Response, answer: Answer, *, wait_s: float, key: ApiKey
) -> Answer:
    """`answer`, or with a sync wait the job's answer once it ends or the wait is over. When
    this process already holds DARKROOM_SYNC_WAIT_MAX_CONCURRENT waits, `answer` at once."""
    if wait_s <= 0:
        return answer
    waiter = get_waiter(request)
    with waiter.slot() as may_wait:
        if not may_wait:
            return answer  # no Preference-Applied: the client learns it did not wait
        response.headers["Preference-Applied"] = applied_preference(wait_s)
        if answer.get("status") != "processing":
            return answer
        settings: Settings = request.app.state.settings
        read = job_reader(settings, key, int(answer["id"]))
        return await wait_for_outcome(waiter, int(answer["id"]), wait_s, read)


def _fetch_as(settings: Settings, job_id: int) -> Work[tuple[Answer, ApiKey]]:
    """The work of a fetch: the answer, and the key for a wait's later re-reads."""

    def work(session: Session, key: ApiKey) -> tuple[Answer, ApiKey]:
        return fetch_job(session, settings, key, job_id), key

    return work


async def _fetch(
    request: Request, response: Response, body: dict[str, Any], settings: Settings, job_id: int
) -> Answer:
    """Answer on the event loop (`PollReads`) or authenticate and read in one thread-pool hop
    and one short session; then maybe wait (holding no connection and no thread)."""
    presented = presented_key(request, body)
    reads: PollReads | None = request.app.state.poll_reads
    polled = None
    if reads is not None:
        polled = await reads.answer(settings, cached_key(get_key_cache(request), presented), job_id)
    if polled is None:
        polled = await keyed(request, presented, _fetch_as(settings, job_id), read_only=True)
    answer, key = polled
    wait_s = requested_wait(request, body, settings)  # after the key: a 401 comes first
    return await answer_or_wait(request, response, answer, wait_s=wait_s, key=key)


async def fetch_by_path(
    job_id: int, request: Request, response: Response, body: BodyDep, settings: SettingsDep
) -> Answer:
    """`POST .../fetch/{id}` with body `{key}`."""
    return await _fetch(request, response, body, settings, job_id)


async def fetch_by_body(
    request: Request, response: Response, body: BodyDep, settings: SettingsDep
) -> Answer:
    """`POST .../fetch` with body `{key, request_id}`."""
    parsed = FetchRequest.model_validate(body)
    if parsed.request_id is None:
        raise ApiError(422, {"request_id": ["The request_id field is required."]})
    return await _fetch(request, response, body, settings, parsed.request_id)


#: Fetch by id in the path: the documented paths, then aliases that clients of the hosted API
#: call (evidence in docs/CLIENTS.md), served alike but left out of the OpenAPI document.
BY_PATH = (
    "/api/v6/image_editing/fetch/{job_id}",
    "/api/v5/fetch/{job_id}",
    "/api/v3/fetch/{job_id}",
    "/api/v1/enterprise/fetch/{job_id}",
)
BY_PATH_ALIASES = (
    "/api/v1/enterprise/image_editing/fetch/{job_id}",
    "/api/v6/images/fetch/{job_id}",
    "/api/v1/enterprise/images/fetch/{job_id}",
)
#: Fetch with `{key, request_id}` in the body.
BY_BODY = ("/api/v1/enterprise/fetch",)
BY_BODY_ALIASES = ("/api/v6/images/fetch",)

for _path in (*BY_PATH, *BY_PATH_ALIASES):
    router.add_api_route(
        _path,
        fetch_by_path,
        methods=["POST"],
        summary="Fetch a job by id",
        description=WAIT_HELP,
        response_model=None,
        responses=JOB_RESPONSES,
        include_in_schema=_path in BY_PATH,
    )

for _path in (*BY_BODY, *BY_BODY_ALIASES):
    router.add_api_route(
        _path,
        fetch_by_body,
        methods=["POST"],
        summary="Fetch a job by request_id",
        description=WAIT_HELP,
        response_model=None,
        responses=JOB_RESPONSES,
        include_in_schema=_path in BY_BODY,
    )
