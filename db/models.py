"""The tables. The job row is the contract between the API tier and the workers."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from darkroom.identities import Family, ModelKind, Operation


def utcnow() -> datetime:
    """Timezone-aware now; every timestamp in the database is UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that comes back timezone-aware on SQLite too (which drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetimes are refused: use db.models.utcnow()")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    """Declarative base for all Darkroom tables."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSON}


class JobState(enum.StrEnum):
    """A job's life: queued -> processing -> success | failed."""

    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCESS = "success"
    FAILED = "failed"


TERMINAL_STATES = (JobState.SUCCESS, JobState.FAILED)


class DeliveryState(enum.StrEnum):
    """A webhook delivery: pending (due at next_attempt_at) -> delivered | failed."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


def _enum_column(enum_type: type[enum.StrEnum]) -> Enum:
    """A portable VARCHAR enum that stores the members' values ('queued'), not their names."""
    return Enum(
        enum_type,
        native_enum=False,
        length=20,
        values_callable=lambda members: [member.value for member in members],
    )


class ApiKey(Base):
    """A client's key. Only the key's SHA-256 is stored; the webhook secret signs its webhooks."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    webhook_secret: Mapped[str] = mapped_column(String(200))
    # During a rotation the old secret keeps signing beside the new one until this time, so
    # receivers can switch over without rejecting a webhook (Standard Webhooks allows both).
    previous_webhook_secret: Mapped[str | None] = mapped_column(String(200), default=None)
    previous_secret_until: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # May call the server-management endpoints (/api/v1/enterprise/system_details, ...).
    admin: Mapped[bool] = mapped_column(default=False, server_default=false())

    def signing_secrets(self, now: datetime) -> list[str]:
        """The secrets that sign a webhook sent at `now`: the current one, and during a
        rotation the previous one."""
        secrets = [self.webhook_secret]
        if (
            self.previous_webhook_secret
            and self.previous_secret_until
            and now < self.previous_secret_until
        ):
            secrets.append(self.previous_webhook_secret)
        return secrets


class Job(Base):
    """One accepted request. `params` holds the validated request; `meta` what the run used."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    operation: Mapped[Operation] = mapped_column(_enum_column(Operation))
    endpoint: Mapped[str] = mapped_column(String(40))
    state: Mapped[JobState] = mapped_column(
        _enum_column(JobState), default=JobState.QUEUED, index=True
    )
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    file_prefix: Mapped[str] = mapped_column(String(64), unique=True)
    track_id: Mapped[str | None] = mapped_column(String(200), default=None)
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    generation_time: Mapped[float | None] = mapped_column(Float, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # Set by a cancel of a running job; its worker checks it between denoising steps.
    cancel_requested_at: Mapped[datetime | None] = mapped_column(default=None)
    # Denoising progress of a running job, 0..1, written by its worker at most twice a second.
    progress: Mapped[float | None] = mapped_column(Float, default=None)
    # Jobs with equal keys can run as one batch (same model, size, steps, scheduler, adapters).
    batch_key: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    # The broker queue the job's id was published to (model-affinity routing may pick one).
    queue_name: Mapped[str | None] = mapped_column(String(200), default=None)

    outputs: Mapped[list[JobOutput]] = relationship(
        back_populates="job", order_by="JobOutput.index", lazy="selectin"
    )


class JobOutput(Base):
    """One output image of a job; (job_id, index) is unique so a re-run cannot add a second set."""

    __tablename__ = "job_outputs"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_job_outputs_job_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    filename: Mapped[str] = mapped_column(String(200), unique=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    nsfw: Mapped[bool] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # `temp: yes` outputs: the link works until expires_at; the sweeper deletes the file then.
    expires_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)

    job: Mapped[Job] = relationship(back_populates="outputs")


class WebhookDelivery(Base):
    """The one webhook of a finished job. The payload is frozen so every attempt is identical."""

    __tablename__ = "webhook_deliveries"
    # The claim's index (migration 0013): due pending rows, oldest first, without walking the
    # finished ones, which keep their last next_attempt_at.
    __table_args__ = (
        Index(
            "ix_webhook_deliveries_pending_due",
            "next_attempt_at",
            postgresql_where=text("state = 'pending'"),
            sqlite_where=text("state = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # A job's webhook (one per job), or a model install's (job_id None, model_install_id set).
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), unique=True, default=None
    )
    model_install_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_installs.id", ondelete="CASCADE"), index=True, default=None
    )
    # The key whose secrets sign it (the job's key, or the key that asked for the install).
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    message_id: Mapped[str] = mapped_column(String(64), unique=True)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    state: Mapped[DeliveryState] = mapped_column(
        _enum_column(DeliveryState), default=DeliveryState.PENDING, index=True
    )
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    job: Mapped[Job | None] = relationship()
    attempts: Mapped[list[WebhookAttempt]] = relationship(
        back_populates="delivery", order_by="WebhookAttempt.id"
    )


class WebhookAttempt(Base):
    """One POST of a delivery: when, what came back, how long it took."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    latency_ms: Mapped[float] = mapped_column(Float)
    response_excerpt: Mapped[str | None] = mapped_column(Text, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)

    delivery: Mapped[WebhookDelivery] = relationship(back_populates="attempts")


class JobRequeue(Base):
    """A requeue of a job (an operator's, or the system's when a run's lease ran out: the
    sweeper's, or a worker's takeover), and what the run it replaced left behind."""

    __tablename__ = "job_requeues"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    requeued_at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    previous_state: Mapped[JobState] = mapped_column(_enum_column(JobState))
    previous_error: Mapped[str | None] = mapped_column(Text, default=None)
    previous_attempts: Mapped[int] = mapped_column(Integer)
    previous_started_at: Mapped[datetime | None] = mapped_column(default=None)
    previous_finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # The replaced run's webhook delivery with its attempts: webhook_deliveries holds one row
    # per job, and the next outcome needs a delivery of its own (new webhook-id and payload).
    previous_webhook: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class IdempotencyKey(Base):
    """A client's `Idempotency-Key` and the job its first request created: a retry with the
    same key and body answers that job instead of creating another (kept 24 hours)."""

    __tablename__ = "idempotency_keys"
    # Scoped per API key: one tenant's key never collides with or reveals another's. The
    # unique constraint is also what makes two concurrent first requests create one job.
    __table_args__ = (
        UniqueConstraint("api_key_id", "key", name="uq_idempotency_keys_api_key_id_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    # SHA-256 of the endpoint and the body (less the credentials): a reuse with another body
    # is refused instead of answering a job that does not match the request.
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class InstallState(enum.StrEnum):
    """A model install: queued -> downloading -> ready | failed."""

    QUEUED = "queued"
    DOWNLOADING = "downloading"
    READY = "ready"
    FAILED = "failed"


class ModelInstall(Base):
    """A model, LoRA, embedding or VAE brought by `load_model` (or `darkroom models add`): where
    from, how far it got, and what was found. The installer claims queued rows with a lease."""

    __tablename__ = "model_installs"
    # One install per id and kind: a second load of the same id joins or is refused.
    __table_args__ = (UniqueConstraint("kind", "model_id", name="uq_model_installs_kind_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[ModelKind] = mapped_column(_enum_column(ModelKind))
    model_id: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(Text)  # an http(s) URL or a Hub repo id
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    api_key_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), default=None
    )
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    state: Mapped[InstallState] = mapped_column(
        _enum_column(InstallState), default=InstallState.QUEUED, index=True
    )
    error: Mapped[str | None] = mapped_column(Text, default=None)
    family: Mapped[Family | None] = mapped_column(_enum_column(Family), default=None)
    format: Mapped[str | None] = mapped_column(String(20), default=None)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class JobPreview(Base):
    """The latest preview image of a running job (one row per job, overwritten every few
    steps, dropped by the sweeper once the job ends): a few KB projected from its latents."""

    __tablename__ = "job_previews"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    image: Mapped[bytes] = mapped_column(LargeBinary)
    media_type: Mapped[str] = mapped_column(String(40))
    step: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ProgressDelivery(Base):
    """One opt-in `start` or `progress` webhook of a job: signed like the terminal one,
    attempted once by the dispatcher and recorded here, never retried after an answer (only
    a claim whose dispatcher died before recording one is taken again)."""

    __tablename__ = "progress_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(16))
    message_id: Mapped[str] = mapped_column(String(64), unique=True)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    # pending (due), sending (claimed until lease_until), delivered or failed (attempted)
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    # While `sending`: when the claim ends (database clock); past it, the row is claimable again.
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    duration_ms: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempted_at: Mapped[datetime | None] = mapped_column(default=None)


class Upload(Base):
    """An image stored by base64_to_url / upload_image: its link works until `expires_at`
    (the life of a `temp: yes` output), then the sweeper deletes the file."""

    __tablename__ = "uploads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    filename: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), default=None
    )
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
