"""All of Darkroom's configuration, in one typed place, read from DARKROOM_* variables.

Two profiles share this class. With nothing set, the embedded profile keeps everything under
`data_dir`: a SQLite database, a filesystem Celery broker and the output files. Production sets
`DARKROOM_DATABASE_URL=postgresql+psycopg://...` and `DARKROOM_BROKER_URL=redis://...`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
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

    # --- performance: fast path and batching ---

    # --- storage backends ---

    # --- observability ---

    # --- routing: model affinity ---

    # --- progress and sync wait ---

    # --- operators: dashboard ---

    @field_validator("url_allowlist", "webhook_schedule_s", mode="before")
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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
