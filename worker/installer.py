"""The model installer: downloads, verifies, converts and places what load_model asked for.

Its own process (`darkroom installer`, started by `darkroom up`), never a GPU worker: a download
of several GB must not hold a GPU. Its queue is the `model_installs` table: it claims the oldest
queued install with a lease (renewed while it works, on the database's clock), so there is no
broker message to lose, and an installer killed mid-download leaves a row that the next claim
picks up once the lease has passed; the partial file under `.installing/<n>/` is resumed with
an HTTP Range request (or started over when the server ignores ranges). An install that killed
its installer `install_max_attempts` times fails.

Each install, in a staging folder under the models folder (same file system, so the last step
is one atomic rename):
1. download through the SSRF guard (each redirect re-checked), bounded by DARKROOM_MODEL_MAX_BYTES
   and DARKROOM_MODEL_DOWNLOAD_TIMEOUT_S, its length checked against Content-Length, its SHA-256
   recorded; or a Hub snapshot for a repo id;
2. verify: a safetensors header or a torch zip archive (a `.ckpt`'s pickle is loaded with
   `weights_only=True`, which refuses any pickled code), the family read from the tensor names,
   a LoRA's or embedding's keys recognised;
3. convert a single-file checkpoint once to a diffusers folder (`from_single_file` with the
   local configuration folder `darkroom.families.probe_file` names: `configs/<family>/`, or
   `configs/sd2/` for SD 2.x's OpenCLIP files; the scheduler given the prediction type that
   the request's `prediction_type` or the file's sidecar declares; then `save_pretrained`), so
   the folder runs exactly as the single file would and workers' cold starts read the fast
   format;
4. rename into place, record the outcome and queue the key's webhook in one transaction, then
   ring the dispatcher.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from celery import Celery

from darkroom import families, outbound
from darkroom.families import UnrecognisedModelError
from darkroom.identities import Family, ModelKind
from darkroom.model_ids import SINGLE_FILE_CONFIGS
from darkroom.queue import make_celery
from darkroom.settings import Settings
from darkroom.urlguard import UnsafeURLError, check_url
from db.models import InstallState
from db.repositories import models as repo
from db.session import session_scope
from services import install_outcomes, model_folder
from services import models as service
from services import webhooks as webhook_service
from services.install_outcomes import Found

log = logging.getLogger(__name__)

#: Progress callback: (bytes so far, total bytes or None, what is happening).
Progress = Callable[[int, int | None, str], None]
MAX_REDIRECTS = 5
CHUNK = 1 << 20
#: Seconds between lease renewals while downloading or converting.
RENEW_EVERY_S = 2.0
PART = "download.part"
#: A prediction-type sidecar larger than this is no configuration file.
_MAX_SIDECAR_BYTES = 1024 * 1024


class InstallError(Exception):
    """An install that cannot succeed; the message is safe to show the client."""


class InstallGoneError(Exception):
    """The install was deleted (or taken over) while this installer worked on it."""


@dataclass
class Claim:
    """One claimed install: what it is, and the lease this installer keeps renewing."""

    install_id: int
    kind: str
    model_id: str
    source: str
    options: dict[str, Any]
    attempts: int
    last_renewal: float = 0.0


class Installer:
    """Claims and runs installs until stopped (the `darkroom installer` process)."""

    def __init__(self, settings: Settings, broker: Celery | None) -> None:
        self.settings = settings
        self.broker = broker

    def run(self, stop: threading.Event) -> None:
        """Install whatever is queued, one at a time, until `stop` is set."""
        log.info("installer ready")
        while not stop.is_set():
            try:
                worked = self.run_one()
            except Exception:  # the database is down, say: try again shortly
                log.exception("installer: could not claim an install")
                worked = False
            if not worked:
                stop.wait(self.settings.install_poll_s)

    def run_one(self, install_id: int | None = None, progress: Progress | None = None) -> bool:
        """Claim one install (the oldest, or `install_id`) and run it; False if none was due."""
        claim = self._claim(install_id)
        if claim is None:
            return False
        self.install(claim, progress)
        return True

    def _claim(self, install_id: int | None) -> Claim | None:
        with session_scope(self.settings.resolved_database_url) as session:
            claimed = repo.claim_install(
                session, lease_s=self.settings.install_lease_s, install_id=install_id
            )
            install = repo.get_install_by_id(session, claimed) if claimed is not None else None
            if install is None:
                return None
            return Claim(
                install.id,
                install.kind,
                install.model_id,
                install.source,
                dict(install.options or {}),
                install.attempts,
                time.monotonic(),
            )

    def install(self, claim: Claim, progress: Progress | None = None) -> None:
        """Run one claimed install to its outcome (ready or failed), webhook queued."""
        staging = service.models_root(self.settings) / model_folder.STAGING / str(claim.install_id)
        message: str | None = None
        try:
            if claim.attempts > self.settings.install_max_attempts:
                raise InstallError(
                    f"The installer stopped {claim.attempts - 1} times while loading this "
                    "model; it was given up."
                )
            found = self._install(claim, staging, progress or _quiet)
        except InstallGoneError:
            log.info("install %s was deleted meanwhile; stopping", claim.install_id)
            shutil.rmtree(staging, ignore_errors=True)
            return
        except InstallError as refused:
            message = str(refused)
        except Exception as exc:  # a bug or the disk: the client still gets an answer
            log.exception("install %s failed", claim.install_id)
            message = f"The model could not be installed ({type(exc).__name__})."
        shutil.rmtree(staging, ignore_errors=True)
        if message is None:
            self._complete(claim, found, staging)
        else:
            failure = message
            self._finish(
                lambda s: install_outcomes.fail(s, self.settings, claim.install_id, failure)
            )

    def _complete(self, claim: Claim, found: Found, staging: Path) -> None:
        """Record a placed install as ready; if delete_model removed its row between the last
        lease renewal and the rename, what was placed is no install's: it goes too."""
        gone = False

        def record(session: Any) -> int | None:
            nonlocal gone
            install = repo.get_install_by_id(session, claim.install_id)
            gone = install is None
            return install_outcomes.complete(session, self.settings, claim.install_id, found)

        self._finish(record)
        if gone:
            log.info("install %s was deleted as it finished; removing it", claim.install_id)
            _take_away(service.target_path(self.settings, claim.kind, claim.model_id), staging)

    def _finish(self, record: Callable[[Any], int | None]) -> None:
        """Record the outcome (and its webhook) in one transaction; the outbox rings the
        dispatcher once it commits (without a broker, the sweeper sends the delivery)."""
        with session_scope(self.settings.resolved_database_url) as session:
            delivery_id = record(session)
            if self.broker is not None:
                webhook_service.publish(session, self.broker, self.settings, delivery_id)

    def renew(self, claim: Claim, done: int, total: int | None, force: bool = False) -> None:
        """Extend the lease (at most every RENEW_EVERY_S); InstallGoneError if the row went away."""
        now = time.monotonic()
        every_s = min(RENEW_EVERY_S, self.settings.install_lease_s / 3)  # well inside the lease
        if not force and now - claim.last_renewal < every_s:
            return
        claim.last_renewal = now
        with session_scope(self.settings.resolved_database_url) as session:
            alive = repo.renew_lease(
                session,
                claim.install_id,
                lease_s=self.settings.install_lease_s,
                bytes_done=done,
                size=total,
            )
        if not alive:
            raise InstallGoneError()

    @contextmanager
    def leased(self, claim: Claim, done: int) -> Iterator[None]:
        """Keep the claim's lease renewed from a thread while the block runs a step that reports
        no progress (a conversion, a Hub snapshot): otherwise a step longer than the lease lets
        another installer claim the install meanwhile. A deletion seen here stops the thread;
        the block's next renewal raises InstallGoneError."""
        stop = threading.Event()
        every_s = min(RENEW_EVERY_S, self.settings.install_lease_s / 3)

        def beat() -> None:
            while not stop.wait(every_s):
                try:
                    self.renew(claim, done, done or None, force=True)
                except InstallGoneError:
                    return
                except Exception:  # the database blinked: the next beat tries again
                    log.exception("install %s: could not renew the lease", claim.install_id)

        thread = threading.Thread(target=beat, name=f"lease-{claim.install_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # --- the steps ------------------------------------------------------------------------

    def _install(self, claim: Claim, staging: Path, progress: Progress) -> Found:
        """Download, verify, convert and place; what was installed."""
        staging.mkdir(parents=True, exist_ok=True)
        target = service.target_path(self.settings, claim.kind, claim.model_id)
        if target.exists():
            raise InstallError(f"{claim.model_id!r} already exists in the models folder.")
        if service.is_hub_id(claim.source):
            return self._install_hub(claim, staging, target, progress)
        part = staging / PART
        digest, size = self._download(claim, part, progress)
        with self.leased(claim, size):  # converting a large checkpoint takes minutes
            found, built = self._verify_and_build(claim, part, staging, progress)
        self.renew(claim, size, size, force=True)  # still ours, just before the rename
        _place(built, target)
        return Found(found[0], found[1], size, digest)

    def _download(self, claim: Claim, part: Path, progress: Progress) -> tuple[str, int]:
        """The file at the claim's URL in `part` (resumed when a partial one is there): its
        SHA-256 and size."""
        if claim.source.startswith("file://"):  # `darkroom models add PATH`: never from the API
            return self._copy_local(claim, part, progress)
        timeout_s = self.settings.model_download_timeout_s
        try:
            with outbound.deadline(timeout_s), outbound.new_client(60.0) as client:
                return self._follow(client, claim, part, progress)
        except (httpx.TimeoutException, outbound.DeadlineExceededError):
            raise InstallError(
                f"The download did not complete within {timeout_s:g} s; load it again to retry."
            ) from None
        except httpx.HTTPError as exc:
            raise InstallError(
                f"The download is truncated: the connection ended early ({type(exc).__name__}); "
                "load it again to retry."
            ) from None

    def _copy_local(self, claim: Claim, part: Path, progress: Progress) -> tuple[str, int]:
        """A local file copied into staging (the same checks follow as for a download)."""
        source = Path(unquote(urlsplit(claim.source).path))
        if not source.is_file():
            raise InstallError(f"{source} is no file.")
        total = source.stat().st_size
        if total > self.settings.model_max_bytes:
            raise InstallError(f"The file is larger than {self.settings.model_max_bytes} bytes.")
        _copy_sidecars(source, part.parent)
        done = 0
        with source.open("rb") as reader, part.open("wb") as writer:
            while chunk := reader.read(CHUNK):
                writer.write(chunk)
                done += len(chunk)
                progress(done, total, "copy")
                self.renew(claim, done, total)
        return _sha256(part), done

    def _follow(
        self, client: httpx.Client, claim: Claim, part: Path, progress: Progress
    ) -> tuple[str, int]:
        url = claim.source
        for _ in range(MAX_REDIRECTS + 1):
            try:
                target = check_url(url, self.settings.url_allowlist).pinned()
            except UnsafeURLError as exc:
                raise InstallError(f"The url cannot be fetched: {exc}.") from None
            location = self._get(client, target, claim, part, progress)
            if location is None:
                return _sha256(part), part.stat().st_size
            url = urljoin(url, location)
        raise InstallError("The url redirects too many times.")

    def _get(
        self,
        client: httpx.Client,
        target: Any,
        claim: Claim,
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
            if total is not None and total > self.settings.model_max_bytes:
                raise InstallError(
                    f"The file is {total} bytes; the limit is {self.settings.model_max_bytes} "
                    "(DARKROOM_MODEL_MAX_BYTES)."
                )
            self._write(response, part, claim, resumed, total, progress)
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
        claim: Claim,
        resumed: bool,
        total: int | None,
        progress: Progress,
    ) -> None:
        """Append (or write anew) the body to `part`, within the byte limit, renewing the lease."""
        limit = self.settings.model_max_bytes
        with part.open("ab" if resumed else "wb") as file:
            done = file.tell()
            for chunk in response.iter_raw(CHUNK):
                done += len(chunk)
                if done > limit:
                    raise InstallError(
                        f"The file is larger than {limit} bytes (DARKROOM_MODEL_MAX_BYTES)."
                    )
                file.write(chunk)
                file.flush()
                progress(done, total, "download")
                self.renew(claim, done, total)

    def _verify_and_build(
        self, claim: Claim, part: Path, staging: Path, progress: Progress
    ) -> tuple[tuple[str | None, str], Path]:
        """((family, format), the file or folder to rename into place)."""
        file_format = sniff_format(part)
        wanted = claim.options.get("model_format")
        if wanted in ("safetensors", "ckpt") and wanted != file_format:
            raise InstallError(f"model_format says {wanted}, but the file is a {file_format}.")
        named = staging / f"file.{file_format}"
        part.rename(named)
        if file_format == "ckpt":
            check_pickle(named)
        if claim.kind == ModelKind.LORA:
            return (check_lora(named), file_format), _as_safetensors(named)
        if claim.kind == ModelKind.EMBEDDING:
            return (check_embedding(named), file_format), _as_safetensors(named, embedding=True)
        if claim.kind == ModelKind.VAE:
            return (None, file_format), self._convert_vae(named, staging)
        probed = self._probe(claim, named)
        progress(0, None, "convert")
        folder = self._convert(claim, named, probed, staging)
        return (probed.family, file_format), folder

    def _probe(self, claim: Claim, path: Path) -> families.SingleFile:
        """The checkpoint's family (which must be the one load_model_v2 named, if any), its
        configuration folder and its declared prediction type, as a worker loading the single
        file would find them (`darkroom.families.probe_file`)."""
        try:
            probed = families.probe_file(path)
        except UnrecognisedModelError as exc:
            raise InstallError(f"Unknown model family: {exc}") from None
        wanted = claim.options.get("family")
        if wanted and wanted != probed.family:
            title = families.family(probed.family).title
            raise InstallError(
                f"model_category names {families.family(wanted).title}, but the file is a "
                f"{title} checkpoint."
            )
        declared = claim.options.get("prediction_type")  # the request's word beats a sidecar's
        if declared:
            probed = families.SingleFile(probed.family, probed.config, str(declared))
        return probed

    def _convert(
        self, claim: Claim, path: Path, probed: families.SingleFile, staging: Path
    ) -> Path:
        """The single file as a diffusers folder, built with its local configuration folder."""
        import diffusers

        family = probed.family
        root = service.models_root(self.settings)
        config = root / SINGLE_FILE_CONFIGS / probed.config
        if not (config / "model_index.json").is_file():
            raise InstallError(
                f"The file is a {families.family(family).title} checkpoint, but its "
                f"configuration folder {SINGLE_FILE_CONFIGS}/{probed.config}/ is missing from "
                "the models folder (nothing is downloaded at load time)."
            )
        pipeline_class = getattr(diffusers, families.family(family).img2img_pipeline)
        options: dict[str, Any] = {"local_files_only": True}
        if claim.options.get("upcast_attention"):
            options["upcast_attention"] = True
        try:
            pipe = pipeline_class.from_single_file(str(path), config=str(config), **options)
        except Exception as exc:
            raise InstallError(
                f"The checkpoint does not load as a {families.family(family).title} model: "
                f"{type(exc).__name__}: {str(exc)[:300]}"
            ) from None
        _declare_prediction_type(pipe, probed.prediction_type)
        self.renew(claim, path.stat().st_size, path.stat().st_size, force=True)
        folder = staging / "diffusers"
        pipe.save_pretrained(str(folder), safe_serialization=True)
        return folder

    def _convert_vae(self, path: Path, staging: Path) -> Path:
        """A VAE single file (original or diffusers naming) as an AutoencoderKL folder."""
        import diffusers

        config = service.models_root(self.settings) / SINGLE_FILE_CONFIGS / Family.SD / "vae"
        if not (config / "config.json").is_file():
            raise InstallError(
                f"Loading a VAE needs {SINGLE_FILE_CONFIGS}/sd/vae/config.json in the models "
                "folder (its configuration; nothing is downloaded at load time)."
            )
        try:
            vae = diffusers.AutoencoderKL.from_single_file(
                str(path), config=str(config), local_files_only=True
            )
        except Exception as exc:
            raise InstallError(
                f"The file does not load as a VAE: {type(exc).__name__}: {str(exc)[:300]}"
            ) from None
        folder = staging / "vae"
        vae.save_pretrained(str(folder), safe_serialization=True)
        return folder

    def _install_hub(self, claim: Claim, staging: Path, target: Path, progress: Progress) -> Found:
        """A Hugging Face repo (a diffusers folder) downloaded to staging, checked, placed."""
        from huggingface_hub import snapshot_download

        folder = staging / "hub"
        progress(0, None, "download")
        revision = claim.options.get("revision")
        try:
            with self.leased(claim, 0):  # a snapshot reports no progress of its own
                snapshot_download(
                    claim.source,
                    revision=revision if revision not in ("fp16", "fp32") else None,
                    local_dir=str(folder),
                    allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
                )
        except Exception as exc:
            raise InstallError(
                f"The Hub repo {claim.source!r} could not be downloaded: {type(exc).__name__}"
            ) from None
        shutil.rmtree(folder / ".cache", ignore_errors=True)
        if claim.kind == ModelKind.VAE:
            if not (folder / "config.json").is_file():
                raise InstallError(f"{claim.source} is no VAE folder (no config.json).")
            family = None
        else:
            try:
                family = families.detect_folder(folder)
            except UnrecognisedModelError as exc:
                raise InstallError(f"Unknown model family: {exc}") from None
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        self.renew(claim, size, size, force=True)
        _place(folder, target)
        return Found(family, "diffusers", size, None)


# --- checks -------------------------------------------------------------------------------


def sniff_format(path: Path) -> str:
    """`safetensors` or `ckpt` from the file's first bytes; InstallError for anything else."""
    with path.open("rb") as file:
        head = file.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "ckpt"
    if len(head) >= 9 and head[8:9] == b"{":
        (length,) = struct.unpack("<Q", head[:8])
        if 2 <= length <= path.stat().st_size:
            return "safetensors"
    shown = head[:12].decode("ascii", errors="replace")
    raise InstallError(
        f"The url did not give a model: a .safetensors or .ckpt file was expected, got "
        f"{path.stat().st_size} bytes starting {shown!r}."
    )


def check_pickle(path: Path) -> None:
    """Refuse a `.ckpt` whose pickle holds anything but tensors: `weights_only` loads only
    tensors and plain containers, and raises at the first other global (never running it)."""
    import pickle

    import torch

    try:
        torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise InstallError(
            "The checkpoint was refused: its pickle holds code or objects other than tensors "
            f"(it was not run). {str(exc).splitlines()[0][:200]}"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError) as exc:
        raise InstallError(f"The checkpoint is no readable torch archive: {exc}") from None


def _tensor_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file, or of a `.ckpt`/`.pt` loaded weights_only."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as opened:
            return list(opened.keys())
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return list(_flatten(state))


def _flatten(state: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict of tensors as dotted names."""
    flat: dict[str, Any] = {}
    if isinstance(state, dict):
        for key, value in state.items():
            flat |= _flatten(value, f"{prefix}{key}.")
    else:
        flat[prefix.rstrip(".")] = state
    return flat


def check_lora(path: Path) -> str | None:
    """A LoRA in diffusers/PEFT (`lora_A`/`lora_B`) or kohya (`lora_down`/`lora_up`) format;
    its family when the keys tell it (SDXL's second text encoder), else None."""
    names = _tensor_names(path)
    markers = ("lora_A", "lora_B", "lora_down", "lora_up", ".lora.", "lora_linear_layer")
    if not any(marker in name for name in names for marker in markers):
        raise InstallError(
            f"The file holds {len(names)} tensors but no LoRA layers (lora_A/lora_B or "
            "kohya's lora_down/lora_up)."
        )
    if any(name.startswith(("transformer.", "lora_transformer_")) for name in names):
        return Family.FLUX
    if any("text_encoder_2" in name or name.startswith("lora_te2_") for name in names):
        return Family.SDXL
    return None


def check_embedding(path: Path) -> str:
    """A textual-inversion embedding: SDXL's `clip_l` + `clip_g`, or SD's vectors (A1111's
    `string_to_param` or one named tensor); its family."""
    names = _tensor_names(path)
    if {"clip_l", "clip_g"} <= set(names):
        return Family.SDXL
    if any(name.startswith("string_to_param") for name in names) or 1 <= len(names) <= 4:
        return Family.SD
    raise InstallError(
        f"The file holds {len(names)} tensors: no textual-inversion embedding (expected "
        "clip_l and clip_g, string_to_param, or a few vectors)."
    )


def _as_safetensors(path: Path, embedding: bool = False) -> Path:
    """A LoRA or embedding as a safetensors file (a `.ckpt`/`.pt` is re-saved, weights only).

    An A1111 / textual-inversion `.pt` embedding keeps only its vectors, as A1111's own
    safetensors embeddings do (`emb_params`): its `string_to_token` (a tensor in the original
    textual-inversion code) would otherwise be a second tensor that no loader expects."""
    if path.suffix == ".safetensors":
        return path
    import torch
    from safetensors.torch import save_file

    state = _flatten(torch.load(str(path), map_location="cpu", weights_only=True))
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    vectors = [v for k, v in tensors.items() if k.startswith("string_to_param.")]
    if embedding and len(vectors) == 1:
        tensors = {"emb_params": vectors[0]}
    out = path.with_suffix(".safetensors")
    save_file(tensors, str(out))
    return out


def _copy_sidecars(source: Path, staging: Path) -> None:
    """A local checkpoint's prediction-type sidecars (`<name>.json`, A1111's `<name>.yaml`),
    copied beside the staged file (`file.<format>`), where `probe_file` reads them."""
    for suffix in (".json", ".yaml"):
        sidecar = source.with_suffix(suffix)
        if sidecar.is_file() and sidecar.stat().st_size <= _MAX_SIDECAR_BYTES:
            shutil.copyfile(sidecar, staging / f"file{suffix}")


def _declare_prediction_type(pipe: Any, declared: str | None) -> None:
    """Give the converted pipeline's scheduler the declared prediction type (as the worker's
    cache does for a single file): saved in its scheduler config, the folder then runs as the
    file does. None: the configuration folder's scheduler config stands."""
    scheduler = pipe.scheduler
    if declared is not None and scheduler.config.get("prediction_type") != declared:
        pipe.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=declared)


def _expected_total(response: httpx.Response, offset: int) -> int | None:
    """The whole file's size: Content-Range's total when resuming, else offset + length."""
    content_range = response.headers.get("content-range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].strip().isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("content-length")
    return offset + int(length) if length and length.isdigit() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _place(built: Path, target: Path) -> None:
    """Rename the verified file or folder into place: one atomic step, refused if taken."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise InstallError(f"{target.name} appeared in the models folder meanwhile.")
    os.rename(built, target)


def _take_away(target: Path, staging: Path) -> None:
    """Move `target` out of the models folder in one rename, then delete it."""
    trash = staging.with_name(f"{staging.name}-deleted")
    try:
        os.rename(target, trash)
    except FileNotFoundError:
        return
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def _quiet(_done: int, _total: int | None, _stage: str) -> None:
    """No progress display."""


def install_state(settings: Settings, install_id: int) -> InstallState | None:
    """An install's state now (for callers waiting on one)."""
    with session_scope(settings.resolved_database_url) as session:
        install = repo.get_install_by_id(session, install_id)
        return install.state if install is not None else None


def create_installer_app(settings: Settings) -> Installer:
    """The installer of `settings`, ringing the dispatcher through the broker when there is one."""
    broker = make_celery(settings)
    return Installer(settings, broker)
