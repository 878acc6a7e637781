"""The hosted API's response shapes, built from a job row.

Shared by the API (submit and fetch answers) and the worker (the webhook payload is frozen when
the job ends), so a client sees the same fields whichever way the result reaches it.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any

from darkroom.identities import Operation
from db.models import Job, JobOutput, JobState, utcnow
from db.repositories.jobs import PolledJob
from services.links import OutputLinks, output_url

#: Reads a stored output file by name (for `base64: yes` answers).
ReadFile = Callable[[str], bytes]

PROCESSING_MESSAGE = "Your request is being processed. Fetch the result with the fetch_result URL."
# Legacy clients validate `tip` as a required string of the processing shape.
PROCESSING_TIP = (
    "Poll fetch_result, wait for the webhook, or send the header `Prefer: wait=N` to get the"
    " result in the answer when it is ready within N seconds."
)

#: Where each endpoint family's clients poll for a job (`{id}` is the job id).
FETCH_PATHS = {
    "v5": "/api/v5/fetch/{id}",
    "v6": "/api/v6/image_editing/fetch/{id}",
    "enterprise": "/api/v1/enterprise/fetch/{id}",
    "v3": "/api/v3/fetch/{id}",
    "v6_images": "/api/v6/images/fetch/{id}",
    "enterprise_images": "/api/v1/enterprise/images/fetch/{id}",
    "v7": "/api/v7/images/fetch/{id}",
    # OpenAI-style edits answer synchronously; a job that outlives the wait is fetched here.
    "openai": "/api/v1/enterprise/fetch/{id}",
}


def output_filename(job: PolledJob, index: int) -> str:
    """The public name of a job's `index`-th image: unguessable, the same whichever run wins.
    `future_links` and API links use it; the API route serves the winning run's file."""
    return f"{job.file_prefix}-{index}.png"


def run_output_filename(job: Job, index: int, run_id: str) -> str:
    """The name one run of a job stores its `index`-th image under (`run_id` is unique to that
    run: its claim's attempt and a random part), so that a stale run never replaces the file
    of the run that won; only the winner's names are recorded in `job_outputs`."""
    return f"{job.file_prefix}-{index}-{run_id}.png"


def is_run_output(filename: str, file_prefix: str, attempt: int) -> bool:
    """Whether `filename` is an image that a run of the job named `file_prefix` stored under
    its claim's `attempt` (the run id starts with the attempt: `{attempt}-{random hex}`)."""
    pattern = rf"{re.escape(file_prefix)}-\d+-{attempt}-[0-9a-f]+\.png"
    return re.fullmatch(pattern, filename) is not None


def processing_body(job: PolledJob, public_url: str, eta: float) -> dict[str, Any]:
    """The answer for an accepted or running job (queued work is reported as processing too).

    `progress` is the denoising progress, 0 to 1 (0 while queued); `eta` is in seconds.
    """
    samples = int(job.params.get("samples", 1))
    message = PROCESSING_MESSAGE
    # A requeued job keeps its last run's progress until a worker claims it again.
    running = job.state == JobState.PROCESSING
    progress = min(max(job.progress or 0.0, 0.0), 1.0) if running else 0.0
    return {
        "status": "processing",
        "id": job.id,
        "eta": round(eta, 2),
        "progress": round(progress, 3),
        "message": message,
        "messege": message,
        "tip": PROCESSING_TIP,
        "fetch_result": public_url + FETCH_PATHS[job.endpoint].format(id=job.id),
        "future_links": [output_url(public_url, output_filename(job, i)) for i in range(samples)],
        "output": [],
        "track_id": job.params.get("track_id"),
        "meta": job.meta,
    }


def success_body(job: Job, links: OutputLinks, read: ReadFile) -> dict[str, Any]:
    """The answer for a finished job.

    v5 pix2pix keeps its page's quirk: `output` is one string (clients of the v6 alias read a
    list). With `base64: yes` (enterprise img2img) `output` holds the PNGs as base64 strings;
    `proxy_links` always holds the links.
    """
    outputs = _sorted(job.outputs)
    urls = [_output_link(links, job, out) for out in outputs]
    output: list[str] | str = urls
    gone = 0
    if job.params.get("base64_output"):
        output = _base64_outputs(outputs, read)
        gone = len(outputs) - len(output)
    elif job.operation == Operation.PIX2PIX and job.endpoint == "v5":
        output = urls[0] if urls else ""
    body: dict[str, Any] = {
        "status": "success",
        "generationTime": job.generation_time,
        "id": job.id,
        "output": output,
        "proxy_links": urls,
        "track_id": job.params.get("track_id"),
        "meta": job.meta,
    }
    if gone:
        body["message"] = EXPIRED_BASE64_MESSAGE.format(count=gone)
    return body


#: The success answer's note when `temp: yes` outputs were deleted before a base64 fetch.
EXPIRED_BASE64_MESSAGE = (
    "{count} temporary output(s) expired and were deleted, so `output` leaves them out;"
    " `temp: yes` outputs are kept for a limited time."
)


def _base64_outputs(outputs: list[JobOutput], read: ReadFile) -> list[str]:
    """The outputs' PNGs as base64, leaving out those that expired (the sweeper deletes a
    temporary output's file once it expires, so a late fetch must not depend on it)."""
    now = utcnow()
    encoded = []
    for out in outputs:
        if out.deleted_at is not None or (out.expires_at is not None and out.expires_at <= now):
            continue
        try:
            encoded.append(base64.b64encode(read(out.filename)).decode())
        except FileNotFoundError:  # deleted between the sweeper's check and ours
            continue
    return encoded


def _output_link(links: OutputLinks, job: Job, out: JobOutput) -> str:
    """An output's link: through the API, by its public name (the one `future_links`
    promised); straight to storage, by the stored object's name."""
    if links.mode == "api":
        return output_url(links.public_url, output_filename(job, out.index))
    return links.link(out.filename, out.expires_at)


def failed_body(job: Job) -> dict[str, Any]:
    """The answer for a job that failed; `message` says why, never with a traceback."""
    message = job.error or "The job failed."
    return {
        "status": "failed",
        "id": job.id,
        "message": message,
        "messege": message,
        "track_id": job.params.get("track_id"),
    }


def webhook_body(job: Job, links: OutputLinks, read: ReadFile) -> dict[str, Any]:
    """The webhook payload of a terminal job: the success fields, or the failure fields."""
    if job.state == JobState.SUCCESS:
        body = success_body(job, links, read)
        return {key: body[key] for key in _WEBHOOK_SUCCESS_KEYS}
    return failed_body(job)


_WEBHOOK_SUCCESS_KEYS = ("status", "id", "output", "generationTime", "track_id", "meta")


def _sorted(outputs: list[JobOutput]) -> list[JobOutput]:
    return sorted(outputs, key=lambda out: out.index)
