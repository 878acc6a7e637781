"""Output storage in an S3-compatible bucket (AWS S3, MinIO, R2, ...), through boto3.

Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY,
a profile, an instance or pod role), never from Darkroom's settings. A PUT replaces an object
whole, so saves are atomic without a temporary name. A PUT that fails raises StorageError
naming the service's error code, never the bucket or the key.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from darkroom.settings import Settings
from darkroom.storage import StorageError, StoredFile

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PNG = "image/png"


@lru_cache(maxsize=16)
def s3_client(endpoint_url: str, region: str, *, signed: bool = True) -> S3Client:
    """A client for one endpoint, made once: building one loads botocore's service model.

    boto3 clients are safe to share between threads. Timeouts are short so that a dead
    endpoint fails a save or a fetch within seconds instead of a minute.
    """
    config = Config(
        signature_version="s3v4" if signed else UNSIGNED,
        connect_timeout=5,
        read_timeout=30,
        retries={"mode": "standard", "max_attempts": 3},
    )
    session = boto3.session.Session()  # the default session is not thread-safe
    return session.client(
        "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config
    )


class S3Storage:
    """Objects named `{prefix}{filename}` in one bucket."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str = "",
        region: str = "",
        link_endpoint_url: str = "",
        public_url: str = "",
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.client = s3_client(endpoint_url, region)
        # Links are signed for the endpoint as clients reach it: the signature covers the host.
        link_endpoint = link_endpoint_url or endpoint_url
        self.link_client = s3_client(link_endpoint, region)
        self.plain_client = s3_client(link_endpoint, region, signed=False)
        self.public_url = public_url.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        """The bucket, endpoints and link base that the settings name."""
        return cls(
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            link_endpoint_url=settings.s3_public_endpoint_url,
            public_url=settings.s3_public_url,
        )

    def key(self, filename: str) -> str:
        """The object key of an output file."""
        return self.prefix + filename

    def save(self, filename: str, data: bytes) -> None:
        """PUT the PNG: the object is replaced whole, never seen half-written. StorageError if
        the service refuses it or cannot be reached (after boto3's own retries)."""
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self.key(filename), Body=data, ContentType=PNG
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code") or "an error")
            raise StorageError(f"the storage service answered {code}") from exc
        except BotoCoreError as exc:
            raise StorageError("the storage service could not be reached") from exc

    def read(self, filename: str) -> bytes:
        """The bytes of a stored object; FileNotFoundError like a missing local file."""
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key(filename))
        except self.client.exceptions.NoSuchKey as missing:
            raise FileNotFoundError(f"s3://{self.bucket}/{self.key(filename)}") from missing
        return answer["Body"].read()

    def delete(self, filename: str) -> None:
        """Remove an object (S3 answers a missing one like a deleted one)."""
        self.client.delete_object(Bucket=self.bucket, Key=self.key(filename))

    def path(self, filename: str) -> Path | None:
        """None: objects are not on this machine's disk."""
        return None

    def remove_partial_writes(self, older_than_s: float) -> int:
        """Nothing to remove: a PUT stores the whole object or nothing."""
        return 0

    def listing(self, prefix: str) -> Iterator[StoredFile]:
        """The objects named `{self.prefix}{prefix}...`, a page of 1,000 at a time."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.key(prefix)
        )
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"][len(self.prefix) :]
                yield StoredFile(name, item["Size"], item["LastModified"].astimezone(UTC))

    def public_link(self, filename: str) -> str:
        """The object's plain URL: under DARKROOM_S3_PUBLIC_URL, or the bucket's own URL."""
        if self.public_url:
            return f"{self.public_url}/{quote(self.key(filename))}"
        params = {"Bucket": self.bucket, "Key": self.key(filename)}
        return self.plain_client.generate_presigned_url("get_object", Params=params)

    def presigned_link(self, filename: str, ttl_s: int) -> str:
        """A GET link signed now, valid for `ttl_s` seconds (computed locally, no request)."""
        params = {"Bucket": self.bucket, "Key": self.key(filename)}
        return self.link_client.generate_presigned_url("get_object", Params=params, ExpiresIn=ttl_s)
