"""The links that answers carry to output files, for the configured storage and link mode.

With DARKROOM_OUTPUT_LINKS=api every link is the API's /outputs/ route, which streams a local
file or redirects to the bucket. With `public` or `presigned` (S3 only) answers link straight to
the bucket or CDN. A temporary output's presigned link never outlives the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from darkroom.settings import Settings
from darkroom.storage import Storage, make_storage
from db.models import utcnow


def output_url(public_url: str, filename: str) -> str:
    """The API's link to an output file: it works for every backend and link mode."""
    return f"{public_url}/outputs/{filename}"


@dataclass(frozen=True)
class OutputLinks:
    """Builds output links; a presigned one is signed when the answer is built."""

    public_url: str
    mode: Literal["api", "public", "presigned"]
    ttl_s: int
    storage: Storage

    @classmethod
    def from_settings(cls, settings: Settings, storage: Storage | None = None) -> OutputLinks:
        """The links the settings ask for, on `storage` (by default the configured one)."""
        return cls(
            public_url=settings.public_url,
            mode=settings.output_links,
            ttl_s=settings.presign_ttl_s,
            storage=storage or make_storage(settings),
        )

    def link(self, filename: str, expires_at: datetime | None = None) -> str:
        """The link an answer gives for a stored file that expires at `expires_at` (or never)."""
        if self.mode == "api":
            return output_url(self.public_url, filename)
        # An expired temporary output keeps the API link, which answers 410 Gone.
        return self.direct(filename, expires_at) or output_url(self.public_url, filename)

    def direct(self, filename: str, expires_at: datetime | None = None) -> str | None:
        """A link straight to storage, or None (local storage, or the output has expired)."""
        if self.mode == "public":
            return self.storage.public_link(filename)
        ttl_s = self.ttl_for(expires_at)
        return self.storage.presigned_link(filename, ttl_s) if ttl_s >= 1 else None

    def ttl_for(self, expires_at: datetime | None) -> int:
        """Seconds a presigned link may live: the TTL, cut short by the output's expiry."""
        if expires_at is None:
            return self.ttl_s
        remaining = (expires_at - utcnow()).total_seconds()
        return max(0, min(self.ttl_s, math.floor(remaining)))
