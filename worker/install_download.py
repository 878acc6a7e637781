"""Bringing an install's file into its staging folder: an http(s) download through the SSRF
guard (each redirect re-checked), bounded by DARKROOM_MODEL_MAX_BYTES (less for a LoRA, an
embedding or a VAE: `KIND_MAX_BYTES`) and
DARKROOM_MODEL_DOWNLOAD_TIMEOUT_S, its length checked against Content-Length, resumed with a
Range request when a partial file is there (or started over when the server ignores ranges);
or a local file (`darkroom models add PATH`) copied with its prediction-type sidecars. Either way
it answers the SHA-256 and the size, and renews the installer's lease as bytes arrive (`renew`,
the caller's).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from darkroom import outbound
from darkroom.identities import ModelKind
from darkroom.settings import Settings
from darkroom.urlguard import UnsafeURLError, check_url
from worker.install_checks import InstallError

#: Progress callback: (bytes so far, total bytes or None, what is happening).
Progress = Callable[[int, int | None, str], None]
#: Lease callback: (bytes so far, total bytes or None); raises when the install is no longer ours.
Renew = Callable[[int, int | None], None]
MAX_REDIRECTS = 5
CHUNK = 1 << 20
#: A prediction-type sidecar larger than this is no configuration file.
_MAX_SIDECAR_BYTES = 1024 * 1024


#: The largest file an install of each kind other than a model may bring, below
#: DARKROOM_MODEL_MAX_BYTES: LoRAs are under 2 GB (Flux's largest ~1.3 GB), embeddings a few
#: hundred KB, VAEs under 1 GB (SDXL's in float32: 335 MB). An endless or mislabelled download
#: stops there instead of filling the disk up to a checkpoint's allowance.
KIND_MAX_BYTES = {
    ModelKind.LORA: 4 * 1024**3,
    ModelKind.EMBEDDING: 64 * 1024**2,
    ModelKind.VAE: 4 * 1024**3,
}


def max_install_bytes(settings: Settings, kind: ModelKind) -> int:
    """The most bytes an install of `kind` may download."""
    return min(settings.model_max_bytes, KIND_MAX_BYTES.get(kind, settings.model_max_bytes))


class Downloader:
    """Fetches one install's file into a part file, renewing the install's lease as it goes."""

    def __init__(self, settings: Settings, renew: Renew, kind: ModelKind = ModelKind.MODEL) -> None:
        self.settings = settings
        self.renew = renew
        self.max_bytes = max_install_bytes(settings, kind)
        #: How the limit is named in refusals.
        self.limit_name = (
            "DARKROOM_MODEL_MAX_BYTES"
            if self.max_bytes == settings.model_max_bytes
            else f"the {kind.value} limit"
        )

    def fetch(self, source: str, part: Path, progress: Progress) -> tuple[str, int]:
        """The file at `source` in `part` (resumed when a partial one is there): its
        SHA-256 and size."""
        if source.startswith("file://"):  # `darkroom models add PATH`: never from the API
            return self._copy_local(source, part, progress)
        timeout_s = self.settings.model_download_timeout_s
        try:
            with outbound.deadline(timeout_s), outbound.new_client(60.0) as client:
                return self._follow(client, source, part, progress)
        except (httpx.TimeoutException, outbound.DeadlineExceededError):
            raise InstallError(
                f"The download did not complete within {timeout_s:g} s; load it again to retry."
            ) from None
        except httpx.HTTPError as exc:
            raise InstallError(
                f"The download is truncated: the connection ended early ({type(exc).__name__}); "
                "load it again to retry."
            ) from None

    def _copy_local(self, url: str, part: Path, progress: Progress) -> tuple[str, int]:
        """A local file copied into staging (the same checks follow as for a download)."""
        source = Path(unquote(urlsplit(url).path))
        if not source.is_file():
            raise InstallError(f"{source} is no file.")
        total = source.stat().st_size
        if total > self.max_bytes:
            raise InstallError(
                f"The file is larger than {self.max_bytes} bytes ({self.limit_name})."
            )
        copy_sidecars(source, part.parent)
        done = 0
        with source.open("rb") as reader, part.open("wb") as writer:
            while chunk := reader.read(CHUNK):
                writer.write(chunk)
                done += len(chunk)
                progress(done, total, "copy")
                self.renew(done, total)
        return sha256(part), done

    def _follow(
        self, client: httpx.Client, source: str, part: Path, progress: Progress
    ) -> tuple[str, int]:
        url = source
        for _ in range(MAX_REDIRECTS + 1):
            try:
                target = check_url(url, self.settings.url_allowlist).pinned()
            except UnsafeURLError as exc:
                raise InstallError(f"The url cannot be fetched: {exc}.") from None
            location = self._get(client, target, part, progress)
            if location is None:
                return sha256(part), part.stat().st_size
            url = urljoin(url, location)
        raise InstallError("The url redirects too many times.")

    def _get(
        self,
        client: httpx.Client,
        target: Any,
        part: Path,
        progress: Progress,
    ) -> str | None:
        """One GET (ranged when resuming) into `part`; the redirect target, if any."""
        have = part.stat().st_size if part.exists() else 0
        headers = {"range": f"bytes={have}-"} if have else {}
        with outbound.stream(client, "GET", target, headers=headers) as response:
            if response.is_redirect:
                return str(response.headers.get("location", ""))
            if response.status_code == 416 and have:  # the part is already whole
                return None
            if response.status_code not in (200, 206):
                raise InstallError(f"The url answered HTTP {response.status_code}.")
            resumed = response.status_code == 206 and have > 0
            total = _expected_total(response, have if resumed else 0)
            if total is not None and total > self.max_bytes:
                raise InstallError(
                    f"The file is {total} bytes; the limit is {self.max_bytes} ({self.limit_name})."
                )
            self._write(response, part, resumed, total, progress)
        size = part.stat().st_size
        if total is not None and size != total:
            raise InstallError(
                f"The download is truncated: {size} of {total} bytes arrived; load it again to "
                "retry."
            )
        return None

    def _write(
        self,
        response: httpx.Response,
        part: Path,
        resumed: bool,
        total: int | None,
        progress: Progress,
    ) -> None:
        """Append (or write anew) the body to `part`, within the byte limit, renewing the lease."""
        with part.open("ab" if resumed else "wb") as file:
            done = file.tell()
            for chunk in response.iter_raw(CHUNK):
                done += len(chunk)
                if done > self.max_bytes:
                    raise InstallError(
                        f"The file is larger than {self.max_bytes} bytes ({self.limit_name})."
                    )
                file.write(chunk)
                file.flush()
                progress(done, total, "download")
                self.renew(done, total)


def copy_sidecars(source: Path, staging: Path) -> None:
    """A local checkpoint's prediction-type sidecars (`<name>.json`, A1111's `<name>.yaml`),
    copied beside the staged file (`file.<format>`), where `probe_file` reads them."""
    for suffix in (".json", ".yaml"):
        sidecar = source.with_suffix(suffix)
        if sidecar.is_file() and sidecar.stat().st_size <= _MAX_SIDECAR_BYTES:
            shutil.copyfile(sidecar, staging / f"file{suffix}")


def _expected_total(response: httpx.Response, offset: int) -> int | None:
    """The whole file's size: Content-Range's total when resuming, else offset + length."""
    content_range = response.headers.get("content-range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].strip().isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("content-length")
    return offset + int(length) if length and length.isdigit() else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
