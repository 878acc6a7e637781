"""All of Darkroom's configuration, in one typed place, read from DARKROOM_* variables.

Two profiles share this class. With nothing set, the embedded profile keeps everything under
`data_dir`: a SQLite database, a filesystem Celery broker and the output files. Production sets
`DARKROOM_DATABASE_URL=postgresql+psycopg://...` and `DARKROOM_BROKER_URL=redis://...`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Default webhook retry delays in seconds: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_WEBHOOK_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


def _split_commas(value: object) -> object:
    """Let list settings arrive as one comma-separated environment variable."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Darkroom's settings; every field can be set as DARKROOM_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="DARKROOM_", extra="ignore")

    data_dir: Path = Path("./darkroom-data")
    database_url: str = ""
    broker_url: str = ""
    public_url: str = "http://127.0.0.1:8000"

    # "public": output links work for whoever holds them (the hosted API's CDN behaviour);
    # "key": a download must carry the owning key (Authorization: Bearer or ?key=).
    output_access: Literal["public", "key"] = "public"

    model_preset: str = ""
    models_dir: Path | None = None
    url_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)

    job_queue: str = "darkroom.jobs"
    webhook_queue: str = "darkroom.webhooks"
    job_max_attempts: int = Field(default=3, ge=1)
    job_lease_s: float = Field(default=120.0, gt=0)
    outbox_grace_s: float = Field(default=5.0, ge=0)
    sweep_interval_s: float = Field(default=1.0, gt=0)
    republish_after_s: float = Field(default=300.0, gt=0)
    visibility_timeout_s: int = Field(default=4 * 3600, gt=0)

    webhook_schedule_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_SCHEDULE)
    )
    webhook_jitter: float = Field(default=0.1, ge=0, le=1)
    webhook_timeout_s: float = Field(default=15.0, gt=0)
    webhook_concurrency: int = Field(default=8, ge=1)

    max_active_jobs_per_key: int = Field(default=100, ge=1)
    max_jobs_per_minute_per_key: int = Field(default=120, ge=1)
    max_queue_depth: int = Field(default=5000, ge=1)

    image_max_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    image_fetch_timeout_s: float = Field(default=20.0, gt=0)
    # Model installs (load_model, `darkroom models add`, the `darkroom installer` process).
    model_max_bytes: int = Field(default=64 * 1024**3, gt=0)
    model_download_timeout_s: float = Field(default=6 * 3600.0, gt=0)
    install_lease_s: float = Field(default=60.0, gt=0)  # an installer's claim, renewed as it runs
    install_poll_s: float = Field(default=1.0, gt=0, le=60)
    install_max_attempts: int = Field(default=3, ge=1)
    # A worker's in-memory LoRA state dicts (worker/models/lora_cache.py); 0 turns it off.
    lora_cache_bytes: int = Field(default=2 * 1024**3, ge=0)

    # --- performance: fast path and batching ---
    # Weights' dtype; "auto": float16 on CUDA, float32 on the CPU (see docs/PERFORMANCE.md).
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    # CUDA only: channels_last memory format and fused QKV projections in the UNet and VAE.
    fast_path: bool = True
    # CUDA only: "unet" compiles each Stable Diffusion UNet with torch.compile, warmed up at load.
    compile: Literal["off", "unet"] = "off"
    compile_cache_dir: Path | None = None  # default: <data_dir>/compile-cache
    # Jobs run as one batch at most; 0: 8 on CUDA, 1 (no batching) on the CPU.
    max_batch: int = Field(default=0, ge=0)
    # Samples in one pipeline call at most; on CUDA measured memory may allow fewer.
    max_batch_samples: int = Field(default=32, ge=1)
    # How long the first job of a batch waits for compatible jobs to arrive (0: not at all).
    batch_window_ms: int = Field(default=0, ge=0)
    # CUDA: the share of GPU memory that models and activations may use together.
    gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    # Overlap a batch's CPU work with the next batch's pipeline call (worker.overlap); false:
    # each batch is stored and recorded before the next one is claimed (benchmark baseline).
    worker_pipeline: bool = True
    # zlib level of output PNGs, 0-9, lossless at every level (worker/png.py): 0 stores, 1
    # deflates with ISA-L, 17-23x less CPU than 6 for files 0.95-1.6x as large; 2-9 use
    # Pillow's encoder, and 6 writes what Darkroom wrote before (docs/PERFORMANCE.md, "PNG").
    png_compress_level: int = Field(default=1, ge=0, le=9)
    # benchmarks/saturation.py only: a generator that returns ready images after this many ms
    # per call instead of running diffusion. Honoured only with bench_fake_generator also true;
    # set in the worker's environment, never reachable from a request.
    bench_fake_generator_ms: int = Field(default=0, ge=0)
    bench_fake_generator: bool = False
    bench_generator_log: Path | None = None  # where the fake generator appends its busy spans

    # --- storage backends ---
    # "local": files under data_dir/outputs; "s3": an S3-compatible bucket (credentials come
    # from the standard AWS variables and chain, never from DARKROOM_* settings).
    storage: Literal["local", "s3"] = "local"
    s3_bucket: str = ""
    s3_endpoint_url: str = ""  # empty: AWS itself; e.g. http://minio:9000
    s3_region: str = ""  # empty: the AWS chain's region
    s3_prefix: str = ""  # prepended to every object key, e.g. "outputs/"
    # The endpoint as clients reach it, when it differs from the one the services use (links
    # are signed for their host, so a presigned link must name the outside address).
    s3_public_endpoint_url: str = ""
    s3_public_url: str = ""  # base of public links (a CDN); empty: the bucket's own URL
    # "api": links go through the API's /outputs/ route (key checks, 410 after expiry);
    # "public": straight to the bucket or CDN; "presigned": signed links valid presign_ttl_s.
    output_links: Literal["api", "public", "presigned"] = "api"
    presign_ttl_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _check_storage(self) -> Settings:
        """Refuse storage settings that cannot work together, naming the variables."""
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("DARKROOM_STORAGE=s3 needs DARKROOM_S3_BUCKET.")
        if self.output_links != "api" and self.storage != "s3":
            raise ValueError(
                f"DARKROOM_OUTPUT_LINKS={self.output_links} needs DARKROOM_STORAGE=s3."
            )
        if self.output_links != "api" and self.output_access == "key":
            raise ValueError(
                "DARKROOM_OUTPUT_ACCESS=key needs DARKROOM_OUTPUT_LINKS=api: "
                "links that bypass the API cannot check the key."
            )
        return self

    # --- observability ---
    # "auto": JSON lines, unless stderr is a terminal (then text, so `darkroom up` stays
    # readable); "json" or "text" force one.
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Each worker and dispatcher process serves its own /metrics on this port (0: off).
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    dispatcher_metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"  # the exporters' bind address; 0.0.0.0 in containers
    metrics_token: str = ""  # when set, the API's /metrics needs `Authorization: Bearer <it>`
    # Bound on each broker and database probe of a scrape of the API's /metrics.
    metrics_probe_timeout_s: float = Field(default=0.5, gt=0, le=10)

    # --- routing: model affinity ---
    # Send a job to a worker that already holds its model (Redis broker only; see
    # docs/SCALING.md). Off, or with the embedded filesystem broker: one general queue.
    affinity_routing: bool = True
    # Models this worker loads at start, e.g. "my-sd,pix2pix:,img_mixer:owner/decoder".
    worker_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # A worker's advertisement of its models lives this long unless renewed (every third).
    affinity_ttl_s: float = Field(default=15.0, gt=0)
    # Bound on the API's Redis lookup at submit; past it the job goes to the general queue.
    affinity_lookup_timeout_s: float = Field(default=0.1, gt=0)
    # A model queue may hold this many more messages than the general queue and still win.
    affinity_queue_slack: int = Field(default=4, ge=0)
    # A job left this long in a model queue that no live worker consumes goes to the general one.
    affinity_stranded_after_s: float = Field(default=30.0, gt=0)

    # --- progress and sync wait ---
    # Longest a request may wait for its job (`Prefer: wait=N` or body `wait`); 0: never wait.
    sync_wait_max_s: float = Field(default=60.0, ge=0, le=600)
    # Postgres: a waiting request re-reads its job this often even without a notification,
    # a safety net should one be lost. SQLite has no notifications: waits poll this often.
    sync_wait_recheck_s: float = Field(default=5.0, gt=0)
    sync_wait_poll_s: float = Field(default=0.5, gt=0)

    # --- storage faults (docs/RELIABILITY.md, "Fencing and storage faults") ---
    # Tries of one output write (disk full, read-only, S3 error) before the job fails saying
    # its images could not be stored; the pause doubles from `storage_retry_backoff_s`.
    storage_write_attempts: int = Field(default=4, ge=1, le=20)
    storage_retry_backoff_s: float = Field(default=0.5, ge=0, le=10)

    # --- API tier under load and hostile clients (sized together: docs/OPERATIONS.md) ---
    # Sync waits one API process holds at once; past it a request answers "processing" at once.
    sync_wait_max_concurrent: int = Field(default=200, ge=0)
    # Threads that run blocking request work (anyio's limiter); each holds one connection at most.
    api_threads: int = Field(default=40, ge=1, le=1000)
    # Database connections per process: the pool and its overflow; threads <= size + overflow.
    db_pool_size: int = Field(default=10, ge=1)
    db_pool_overflow: int = Field(default=30, ge=0)
    # A request that finds every connection busy this long answers 503 with Retry-After.
    db_pool_timeout_s: float = Field(default=2.0, gt=0)
    # Postgres connections per API process for polls answered on the event loop (api/routes/
    # fetch.py: PollReads), on top of the pool; 0 sends every poll through the thread pool.
    db_poll_pool_size: int = Field(default=4, ge=0, le=100)
    # How long a valid key is trusted without a lookup: also how late a revocation takes effect.
    api_key_cache_s: float = Field(default=5.0, ge=0)
    # Requests in progress per process (not /health, not sync waits); past it 503 with
    # Retry-After at once. It bounds queueing: 256 requests of ~4 ms are about one second.
    api_max_in_flight: int = Field(default=256, ge=1)
    # Open connections per process; past it a new one is answered 503 and closed.
    api_max_connections: int = Field(default=4096, ge=1)
    # Bytes of large answers (1 MiB or more in one piece: base64 outputs) being written at once
    # per process; past it such an answer is 503 with Retry-After.
    api_max_answer_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    # A request's head (line and headers) must arrive within this; its body within the other.
    api_header_timeout_s: float = Field(default=10.0, gt=0)
    api_body_timeout_s: float = Field(default=60.0, gt=0)
    # A response the client stops reading (its socket buffer full) for this long: closed.
    api_write_timeout_s: float = Field(default=30.0, gt=0)
    # An idle keep-alive connection is closed after this.
    api_keep_alive_s: float = Field(default=5.0, gt=0)
    # Connections the kernel queues before the API accepts them.
    api_backlog: int = Field(default=2048, ge=1)

    # --- live progress: GET /api/v1/jobs/{id}/events (server-sent events, docs/CLIENTS.md) ---
    # Streams one API process serves at once; past it 503 with Retry-After.
    events_max_streams: int = Field(default=100, ge=0)
    # A stream ends after this (an `event: timeout`); the client reconnects if it still cares.
    events_max_s: float = Field(default=600.0, gt=0)
    # How often a stream reads its job (one short session each); the job's end wakes it early.
    events_poll_s: float = Field(default=0.5, ge=0.1)
    # A comment line this often keeps proxies from closing a quiet stream.
    events_heartbeat_s: float = Field(default=15.0, gt=0)
    # A running job's preview (latents projected to a small JPEG, no VAE pass) every this many
    # denoising steps, shown by its `progress` events; 0: no previews (worker/previews.py).
    preview_every_steps: int = Field(default=5, ge=0, le=10_000)
    # Opt-in `progress` webhooks (webhook_events_filter): at most one per job this often, and
    # at most this many per job; attempted once, never retried (services/progress_events.py).
    progress_webhook_every_s: float = Field(default=5.0, ge=0.5, le=3600)
    progress_webhook_max: int = Field(default=20, ge=0, le=1000)

    # --- recovery: lost messages and database outages (docs/RELIABILITY.md) ---
    # Every sweep compares the broker's messages with the jobs and deliveries waiting in the
    # database; one published longer ago than this (the database's clock) and absent from the
    # broker was lost and is sent again. `republish_after_s` still applies to a message a
    # consumer took and never acknowledged (a worker that died before claiming it).
    lost_message_grace_s: float = Field(default=2.0, gt=0)
    # A worker whose claim cannot reach the database waits this long, then returns the message
    # to its queue instead of acknowledging it.
    claim_retry_delay_s: float = Field(default=1.0, gt=0, le=30)
    # A worker that cannot record a finished job (the database is down) retries this long,
    # with back-off, while it still holds the images; past it the job's lease decides.
    finish_retry_s: float = Field(default=60.0, ge=0)

    # --- webhook dispatcher loop (worker/webhooks/loop.py, docs/PERFORMANCE.md) ---
    # With Postgres and Redis, `darkroom dispatcher` claims due deliveries from the database in
    # batches (the webhook queue's messages only wake it); off: one Celery task per delivery.
    webhook_loop: bool = True
    # With nothing to do and no message, the loop looks for due deliveries this often.
    webhook_poll_s: float = Field(default=0.5, gt=0, le=30)
    # A polled job's eta reads the queue (queued ids, running jobs, recent durations) at most this
    # often per API process and database; the answers in between share that read. 0: every poll.
    eta_cache_s: float = Field(default=1.0, ge=0, le=10)

    # --- operators: dashboard ---
    # Bearer token of /dashboard and /admin/api/...; empty turns both off (they answer 404).
    admin_token: str = Field(default="", repr=False)

    @field_validator("admin_token")
    @classmethod
    def _refuse_weak_admin_token(cls, value: str) -> str:
        """Refuse short or placeholder tokens: the dashboard shows every key's jobs."""
        words = ("change", "example", "placeholder", "secret", "password", "admin", "token")
        weak = len(value) < 24 or len(set(value)) < 8 or any(w in value.lower() for w in words)
        if value and weak:
            raise ValueError(
                "DARKROOM_ADMIN_TOKEN is too weak: use 24 or more random characters, "
                "e.g. `openssl rand -hex 32`"
            )
        return value

    # --- model ids from clients (docs/SECURITY.md) ---
    # Hugging Face repo ids (owner/name) that requests may name as model, LoRA, VAE or
    # embedding, and that workers may download. Any other id must be installed under
    # models_dir; the built-in default pipelines and the safety checker are always allowed.
    hub_models: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("hub_models", mode="before")
    @classmethod
    def _parse_hub_models(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("url_allowlist", "webhook_schedule_s", "worker_models", mode="before")
    @classmethod
    def _parse_lists(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite under the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'darkroom.sqlite3').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        """The broker URL, defaulting to kombu's filesystem transport (embedded profile)."""
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        """Where the embedded filesystem broker keeps its messages."""
        return (self.data_dir / "broker").resolve()

    @property
    def outputs_dir(self) -> Path:
        """Where output images are written."""
        return (self.data_dir / "outputs").resolve()

    @property
    def tiny_models_dir(self) -> Path:
        """Where the tiny preset writes the models it builds."""
        return (self.data_dir / "tiny-models").resolve()

    @property
    def is_embedded_broker(self) -> bool:
        """True when the broker is the filesystem transport under the data directory."""
        return self.resolved_broker_url.startswith("filesystem://")

    @property
    def delivers_by_loop(self) -> bool:
        """Whether `darkroom dispatcher` runs the delivery loop (worker/webhooks/loop.py), which
        needs SKIP LOCKED (Postgres) and a queue it can wait on (Redis); otherwise one Celery
        task per delivery. With the loop, a webhook queue message is only a doorbell."""
        postgres = self.resolved_database_url.startswith("postgresql")
        return self.webhook_loop and postgres and not self.is_embedded_broker


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
