"""Cross-request batching: the batch key, claim-many, and batches of real jobs on the tiny models.

Jobs of one test share a model id of their own: under the tiny preset every id runs the same
tiny model, but it is part of the batch key, so a batch never takes another test's jobs from the
shared database.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from darkroom.identities import Operation
from darkroom.jobspec import JobSpec, batch_key
from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.models import Job, JobState, utcnow
from db.repositories import jobs
from db.repositories.keys import IssuedKey, create_key
from db.session import session_factory, session_scope
from services.outcomes import CANCELED_MESSAGE
from tests.support.rows import job_row, queued_job
from tests.support.servers import ImageServer
from worker.batching import StopBatch, generate_batch
from worker.jobs import WorkerRuntime, run_job
from worker.models.cache import ModelCache
from worker.pipelines.request import GenerationRequest

#: The largest difference of one pixel channel (0..255) allowed between a batched image and the
#: same job run alone: they differ only in the summation order of batched kernels.
PIXEL_TOLERANCE = 2
LONG_PROMPT = "a lighthouse on a cliff above a stormy sea, " * 4  # > 75 tokens: two windows


def _spec(**fields: Any) -> JobSpec:
    base: dict[str, Any] = {
        "operation": Operation.IMG2IMG,
        "prompt": "a red barn",
        "init_images": ["http://127.0.0.1:1/a.png"],
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance_scale": 7.0,
        "seed": 1,
        **fields,
    }
    return JobSpec(**base)


# --- the batch key -------------------------------------------------------------------------

#: Fields that differ per sample or per job: jobs that differ only in these share a call.
PER_JOB = {
    "prompt": "a blue boat",
    "negative_prompt": "fog",
    "seed": 99,
    "samples": 3,
    "init_images": ["http://127.0.0.1:1/b.png"],
    "clip_skip": 2,
    "safety_checker": True,
    "safety_checker_type": "blur",
    "base64_output": True,
    "temp": True,
    "track_id": 7,
}
#: Fields one call shares: a different value makes a different key.
SHARED = {
    "model_id": "other-model",
    "width": 128,
    "height": 128,
    "steps": 5,
    "guidance_scale": 7.5,
    "strength": 0.5,
    "scheduler": "EulerDiscreteScheduler",
    "use_karras_sigmas": True,
    "algorithm_type": "dpmsolver++",
    "loras": [{"name": "lora-a", "strength": 0.5}],
    "vae": "vae-x",
    "embeddings": ["emb-one"],
    "tomesd": True,
}


@pytest.mark.parametrize(("name", "value"), PER_JOB.items())
def test_per_job_fields_do_not_change_the_batch_key(name: str, value: Any) -> None:
    assert batch_key(_spec(**{name: value})) == batch_key(_spec())


@pytest.mark.parametrize(("name", "value"), SHARED.items())
def test_shared_fields_change_the_batch_key(name: str, value: Any) -> None:
    assert batch_key(_spec(**{name: value})) != batch_key(_spec())


def test_batch_key_reads_only_the_fields_of_its_operation() -> None:
    pix2pix = {"operation": Operation.PIX2PIX}
    assert batch_key(_spec(**pix2pix, strength=0.2)) == batch_key(_spec(**pix2pix))
    assert batch_key(_spec(**pix2pix, image_guidance_scale=2.0)) != batch_key(_spec(**pix2pix))
    assert batch_key(_spec(image_guidance_scale=2.0)) == batch_key(_spec())
    assert batch_key(_spec(**pix2pix)) != batch_key(_spec())


def test_the_mixer_never_batches_and_keys_are_short_hex() -> None:
    mixer = _spec(operation=Operation.IMG_MIXER, image_weights=[1.0])
    assert batch_key(mixer) is None
    key = batch_key(_spec())
    assert key is not None
    assert len(key) == 32
    int(key, 16)


# --- claim-many on Postgres ----------------------------------------------------------------


def _row(session: Any, key_id: int, batch: str | None, **values: Any) -> int:
    row = {"operation": Operation.IMG2IMG, "endpoint": "v1", "batch_key": batch, **values}
    return job_row(session, key_id, **row).id


def _claim(session: Any, leader: int, limit: int, key: str = "k") -> list[int]:
    found = jobs.claim_batch_companions(
        session, leader_id=leader, batch_key=key, limit=limit, lease_s=60, max_attempts=3
    )
    return [job.id for job in found]


def test_claim_many_takes_only_compatible_queued_jobs_oldest_first(own_pg_url: str) -> None:
    with session_scope(own_pg_url) as session:
        key_id = create_key(session, "batch").row.id
        leader = _row(session, key_id, "k")
        jobs.claim_job(session, leader, lease_s=60, max_attempts=3)
        first, second, third = (_row(session, key_id, "k") for _ in range(3))
        live = utcnow() + timedelta(minutes=5)
        _row(session, key_id, "other")  # incompatible
        _row(session, key_id, None)  # never batched
        _row(session, key_id, "k", state=JobState.PROCESSING, lease_until=live)  # held elsewhere
        _row(session, key_id, "k", state=JobState.PROCESSING, lease_until=utcnow())  # orphan
        _row(session, key_id, "k", state=JobState.FAILED)
        _row(session, key_id, "k", cancel_requested_at=utcnow())
        _row(session, key_id, "k", attempts=3)  # out of attempts

    with session_scope(own_pg_url) as session:
        assert _claim(session, leader, limit=2) == [first, second]
    with session_scope(own_pg_url) as session:
        assert _claim(session, leader, limit=5) == [third]
        assert _claim(session, leader, limit=5) == []
        taken = session.get(Job, first)
        assert taken is not None
        assert taken.state == JobState.PROCESSING
        assert taken.attempts == 1
        assert taken.lease_until is not None
        assert taken.lease_until > utcnow() + timedelta(seconds=50)
        # The job's own message arrives later: the ordinary claim refuses it.
        outcome, _job = jobs.claim_job(session, first, lease_s=60, max_attempts=3)
        assert outcome == jobs.ClaimOutcome.BUSY


def test_two_workers_collecting_at_once_take_disjoint_jobs_without_waiting(
    own_pg_url: str,
) -> None:
    with session_scope(own_pg_url) as session:
        key_id = create_key(session, "batch").row.id
        queued = [_row(session, key_id, "k") for _ in range(5)]
    factory = session_factory(own_pg_url)
    with factory() as one, factory() as two:
        mine = _claim(one, leader=0, limit=2)  # locked, not committed yet
        # Without SKIP LOCKED the second worker would wait for the first: fail fast instead.
        two.execute(text("SET LOCAL lock_timeout = '2s'"))
        theirs = _claim(two, leader=0, limit=5)
        one.commit()
        two.commit()
    assert mine == queued[:2]
    assert theirs == queued[2:]


def test_a_batch_renews_the_leases_of_its_running_jobs_only(own_pg_url: str) -> None:
    with session_scope(own_pg_url) as session:
        key_id = create_key(session, "batch").row.id
        soon = utcnow() + timedelta(seconds=1)
        running = _row(session, key_id, "k", state=JobState.PROCESSING, lease_until=soon)
        ended = _row(session, key_id, "k", state=JobState.SUCCESS, lease_until=soon)
    with session_scope(own_pg_url) as session:  # both claimed by this run (attempts 0 here)
        assert jobs.extend_leases(session, {running: 0, ended: 0}, 600) == 1
    with session_scope(own_pg_url) as session:
        renewed, kept = session.get(Job, running), session.get(Job, ended)
        assert renewed is not None
        assert kept is not None
        assert renewed.lease_until is not None
        assert renewed.lease_until > utcnow() + timedelta(minutes=9)
        assert kept.lease_until == soon


# --- batches of real jobs ------------------------------------------------------------------


def _runtime(
    settings: Settings, tiny_settings: Settings, cache: ModelCache, max_batch: int
) -> WorkerRuntime:
    shared = settings.model_copy(
        update={"data_dir": tiny_settings.data_dir, "max_batch": max_batch}
    )
    return WorkerRuntime(settings=shared, broker=make_celery(shared), cache=cache)


@pytest.fixture
def batching(settings: Settings, tiny_settings: Settings, model_cache: ModelCache) -> WorkerRuntime:
    """A worker that runs up to 8 jobs as one batch."""
    return _runtime(settings, tiny_settings, model_cache, max_batch=8)


@pytest.fixture
def alone(settings: Settings, tiny_settings: Settings, model_cache: ModelCache) -> WorkerRuntime:
    """A worker that runs one job at a time."""
    return _runtime(settings, tiny_settings, model_cache, max_batch=1)


def _job(runtime: WorkerRuntime, key: IssuedKey, **fields: Any) -> int:
    spec = JobSpec(**fields)
    return queued_job(
        runtime.settings, key.row.id, spec=spec, endpoint="v1", batch_key=batch_key(spec)
    )


def _load(runtime: WorkerRuntime, job_id: int) -> Job:
    with session_scope(runtime.settings.resolved_database_url) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _pixels(runtime: WorkerRuntime, job: Job) -> list[np.ndarray[Any, Any]]:
    outputs = runtime.settings.outputs_dir
    result = []
    for output in sorted(job.outputs, key=lambda o: o.index):
        with Image.open(outputs / output.filename) as image:
            result.append(np.asarray(image.convert("RGB"), dtype=np.int16))
    return result


def _compatible(image_server: ImageServer, model_id: str) -> list[dict[str, Any]]:
    """Four img2img jobs that may share a call: prompts, seeds, samples, images all differ."""
    common = {"operation": Operation.IMG2IMG, "model_id": model_id, "width": 64, "height": 64}
    common |= {"steps": 4, "guidance_scale": 7.0, "strength": 0.75}
    return [
        {
            **common,
            "prompt": "a red barn",
            "seed": 11,
            "samples": 2,
            "init_images": [image_server.url("/red.png")],
        },
        {
            **common,
            "prompt": "a blue boat",
            "negative_prompt": "fog",
            "seed": 5,
            "init_images": [image_server.url("/blue.png")],
        },
        {
            **common,
            "prompt": "green fields",
            "seed": 7,
            "clip_skip": 2,
            "init_images": [image_server.url("/green.jpg")],
        },
        {
            **common,
            "prompt": LONG_PROMPT,
            "seed": 3,
            "init_images": [image_server.url("/wide.png")],
        },
    ]


def test_jobs_run_as_one_batch_give_the_images_each_gives_alone(
    batching: WorkerRuntime, alone: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer
) -> None:
    batch_model, alone_model = f"batch-{uuid.uuid4().hex[:8]}", f"alone-{uuid.uuid4().hex[:8]}"
    batched = [_job(batching, api_key, **f) for f in _compatible(image_server, batch_model)]
    single = [_job(alone, api_key, **f) for f in _compatible(image_server, alone_model)]

    run_job(batched[0], batching)  # the first job's message: it takes the other three along
    states = [_load(batching, job_id).state for job_id in batched]
    for job_id in single:
        run_job(job_id, alone)

    assert states == [JobState.SUCCESS] * 4
    worst = 0
    for mine, theirs in zip(batched, single, strict=True):
        together, by_itself = _load(batching, mine), _load(alone, theirs)
        assert together.attempts == 1
        assert [o.seed for o in together.outputs] == [o.seed for o in by_itself.outputs]
        for a, b in zip(_pixels(batching, together), _pixels(alone, by_itself), strict=True):
            worst = max(worst, int(np.abs(a - b).max()))
    print(f"largest pixel difference, batched vs alone: {worst}")
    assert worst <= PIXEL_TOLERANCE
    # The companions' own messages arrive later and change nothing.
    run_job(batched[1], batching)
    assert _load(batching, batched[1]).attempts == 1


def test_a_job_with_a_bad_image_or_refused_options_fails_alone_in_its_batch(
    batching: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer
) -> None:
    good, other = _compatible(image_server, f"bad-{uuid.uuid4().hex[:8]}")[:2]
    ids = [
        _job(batching, api_key, **good),
        _job(batching, api_key, **{**other, "init_images": [image_server.url("/missing.png")]}),
        _job(batching, api_key, **{**other, "clip_skip": 9}),  # refused by the pipeline check
        _job(batching, api_key, **other),
    ]

    run_job(ids[0], batching)

    first, missing, refused, last = (_load(batching, job_id) for job_id in ids)
    assert (first.state, last.state) == (JobState.SUCCESS, JobState.SUCCESS)
    assert len(first.outputs) == 2
    assert missing.state == JobState.FAILED
    assert missing.error == "Unable to fetch image from provided URL: HTTP 404"
    assert refused.state == JobState.FAILED
    assert refused.error == "clip_skip must be between 1 and 8."
    assert missing.outputs == refused.outputs == []


def test_canceling_one_job_of_a_running_batch_fails_it_alone(
    batching: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer
) -> None:
    long = {"width": 512, "height": 512, "steps": 50, "strength": 1.0}
    fields = _compatible(image_server, f"cancel-{uuid.uuid4().hex[:8]}")[1:3]
    kept, canceled = (_job(batching, api_key, **{**f, **long}) for f in fields)
    seen: dict[int, float] = {}

    def cancel_once_both_progress() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and min(seen.get(i, 0.0) for i in (kept, canceled)) == 0:
            for job_id in (kept, canceled):
                seen[job_id] = _load(batching, job_id).progress or 0.0
            time.sleep(0.02)
        with session_scope(batching.settings.resolved_database_url) as session:
            jobs.request_cancel(session, canceled)

    canceler = threading.Thread(target=cancel_once_both_progress)
    canceler.start()
    run_job(kept, batching)
    canceler.join(timeout=60)

    assert min(seen.values()) > 0, "both jobs of the batch record progress"
    done, stopped = _load(batching, kept), _load(batching, canceled)
    assert done.state == JobState.SUCCESS
    assert len(done.outputs) == 1
    assert stopped.state == JobState.FAILED
    assert stopped.error == CANCELED_MESSAGE
    assert stopped.outputs == []
    assert not list(batching.settings.outputs_dir.glob(f"{stopped.file_prefix}-*"))


# --- the batch runner on its own ------------------------------------------------------------


def _request(prompt: str, seeds: tuple[int, ...], **fields: Any) -> GenerationRequest:
    base: dict[str, Any] = {
        "operation": Operation.IMG2IMG,
        "model_id": None,
        "prompt": prompt,
        "negative_prompt": "",
        "images": (Image.new("RGB", (64, 64), (200, 30, 30)),),
        "image_weights": (),
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance_scale": 7.0,
        "seeds": seeds,
        **fields,
    }
    return GenerationRequest(**base)


def test_a_call_that_fails_is_split_until_the_failing_request_is_alone(
    tiny_settings: Settings, model_cache: ModelCache
) -> None:
    # A seed beyond 64 bits cannot seed a torch.Generator: it breaks the whole pipeline call.
    requests = [_request("a", (1,)), _request("b", (2**70,)), _request("c", (3,), width=56)]
    requests.insert(2, _request("d", (4, 5)))

    outcomes = generate_batch(requests, model_cache, tiny_settings)

    assert isinstance(outcomes[1], ValueError)
    assert "Overflow" in str(outcomes[1])
    for index in (0, 2, 3):
        result = outcomes[index]
        assert not isinstance(result, Exception), result
        assert len(result.images) == len(requests[index].seeds)
        assert result.images[0].size == (requests[index].width, requests[index].height)


def test_a_stop_from_the_step_hook_ends_the_call_at_once(
    tiny_settings: Settings, model_cache: ModelCache
) -> None:
    calls: list[tuple[list[int], int, int]] = []

    def stop(running: list[int], done: int, total: int) -> None:
        calls.append((running, done, total))
        raise StopBatch

    requests = [_request("a", (1,)), _request("b", (2,))]
    outcomes = generate_batch(requests, model_cache, tiny_settings, stop)

    assert len(calls) == 1, "the call ends at the first step"
    assert calls[0][:2] == ([0, 1], 1)
    assert all(isinstance(outcome, StopBatch) for outcome in outcomes)
