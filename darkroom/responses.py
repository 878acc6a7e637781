"""The hosted API's response shapes, built from a job row.

Shared by the API (submit and fetch answers) and the worker (the webhook payload is frozen when
the job ends), so a client sees the same fields whichever way the result reaches it.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from db.models import Job, JobOutput, JobState, Operation

#: Reads a stored output file by name (for `base64: yes` answers).
ReadFile = Callable[[str], bytes]

PROCESSING_MESSAGE = "Your request is being processed. Fetch the result with the fetch_result URL."

#: Where each endpoint family's clients poll for a job (`{id}` is the job id).
FETCH_PATHS = {
    "v5": "/api/v5/fetch/{id}",
    "v6": "/api/v6/image_editing/fetch/{id}",
    "enterprise": "/api/v1/enterprise/fetch/{id}",
}


def output_filename(job: Job, index: int) -> str:
    """The file name of a job's `index`-th image: unguessable, stable across re-runs."""
    return f"{job.file_prefix}-{index}.png"


def output_url(public_url: str, filename: str) -> str:
    """The public link of an output file."""
    return f"{public_url}/outputs/{filename}"


def processing_body(job: Job, public_url: str, eta: float) -> dict[str, Any]:
    """The answer for an accepted or running job (queued work is reported as processing too)."""
    samples = int(job.params.get("samples", 1))
    message = PROCESSING_MESSAGE
    return {
        "status": "processing",
        "id": job.id,
        "eta": round(eta, 2),
        "message": message,
        "messege": message,
        "fetch_result": public_url + FETCH_PATHS[job.endpoint].format(id=job.id),
        "future_links": [output_url(public_url, output_filename(job, i)) for i in range(samples)],
        "output": [],
        "track_id": job.params.get("track_id"),
        "meta": job.meta,
    }


def success_body(job: Job, public_url: str, read: ReadFile) -> dict[str, Any]:
    """The answer for a finished job.

    pix2pix keeps its page's quirk: `output` is one string. With `base64: yes` (enterprise
    img2img) `output` holds the PNGs as base64 strings; `proxy_links` always holds the links.
    """
    outputs = _sorted(job.outputs)
    links = [output_url(public_url, out.filename) for out in outputs]
    output: list[str] | str = links
    if job.params.get("base64_output"):
        output = [base64.b64encode(read(out.filename)).decode() for out in outputs]
    elif job.operation == Operation.PIX2PIX:
        output = links[0] if links else ""
    return {
        "status": "success",
        "generationTime": job.generation_time,
        "id": job.id,
        "output": output,
        "proxy_links": links,
        "track_id": job.params.get("track_id"),
        "meta": job.meta,
    }


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


def webhook_body(job: Job, public_url: str, read: ReadFile) -> dict[str, Any]:
    """The webhook payload of a terminal job: the success fields, or the failure fields."""
    if job.state == JobState.SUCCESS:
        body = success_body(job, public_url, read)
        return {key: body[key] for key in _WEBHOOK_SUCCESS_KEYS}
    return failed_body(job)


_WEBHOOK_SUCCESS_KEYS = ("status", "id", "output", "generationTime", "track_id", "meta")


def _sorted(outputs: list[JobOutput]) -> list[JobOutput]:
    return sorted(outputs, key=lambda out: out.index)
