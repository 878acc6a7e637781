"""Turning a verified download into what is renamed into place: a LoRA or an embedding as a
safetensors file, a VAE single file as an AutoencoderKL folder, and a model single file converted
once to a diffusers folder (`from_single_file` with the local configuration folder that
`darkroom.families.probe_file` names: `configs/<family>/`, or `configs/sd2/` for SD 2.x's
OpenCLIP files; the scheduler given the prediction type that the request's `prediction_type` or
the file's sidecar declares; then `save_pretrained`), so the folder runs exactly as the single
file would and workers' cold starts read the fast format. Nothing is downloaded at load time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from darkroom import families
from darkroom.families import UnrecognisedModelError
from darkroom.identities import Family, ModelKind
from darkroom.model_ids import SINGLE_FILE_CONFIGS, single_file_config_problem
from darkroom.settings import Settings
from services import model_folder
from services import models as service
from worker.install_checks import (
    InstallError,
    check_embedding,
    check_lora,
    check_pickle,
    flatten,
    sniff_format,
)
from worker.install_download import Progress
from worker.models.single_file import load_single_file


def verify_and_build(
    settings: Settings,
    kind: ModelKind,
    options: dict[str, Any],
    part: Path,
    staging: Path,
    progress: Progress,
    renew_now: Callable[[int], None],
) -> tuple[tuple[Family | None, str], Path]:
    """((family, format), the file or folder to rename into place). `renew_now(bytes)` renews
    the install's lease at once: a conversion checks the install is still ours before saving."""
    file_format = sniff_format(part)
    wanted = options.get("model_format")
    if wanted in ("safetensors", "ckpt") and wanted != file_format:
        raise InstallError(f"model_format says {wanted}, but the file is a {file_format}.")
    named = staging / f"file.{file_format}"
    part.rename(named)
    if file_format == "ckpt":
        check_pickle(named)
    if kind == ModelKind.LORA:
        return (check_lora(named), file_format), _as_safetensors(named)
    if kind == ModelKind.EMBEDDING:
        return (check_embedding(named), file_format), _as_safetensors(named, embedding=True)
    if kind == ModelKind.VAE:
        return (None, file_format), _convert_vae(settings, named, staging)
    probed = _probe(options, named)
    progress(0, None, "convert")
    folder = _convert(settings, options, named, probed, staging, renew_now)
    return (probed.family, file_format), folder


def _probe(options: dict[str, Any], path: Path) -> families.SingleFile:
    """The checkpoint's family (which must be the one load_model_v2 named, if any), its
    configuration folder and its declared prediction type, as a worker loading the single
    file would find them (`darkroom.families.probe_file`)."""
    try:
        probed = families.probe_file(path)
    except UnrecognisedModelError as exc:
        raise InstallError(f"Unknown model family: {exc}") from None
    wanted = options.get("family")
    if wanted and wanted != probed.family:
        title = families.family(probed.family).title
        raise InstallError(
            f"model_category names {families.family(wanted).title}, but the file is a "
            f"{title} checkpoint."
        )
    declared = options.get("prediction_type")  # the request's word beats a sidecar's
    if declared:
        probed = families.SingleFile(probed.family, probed.config, str(declared))
    return probed


def _convert(
    settings: Settings,
    options: dict[str, Any],
    path: Path,
    probed: families.SingleFile,
    staging: Path,
    renew_now: Callable[[int], None],
) -> Path:
    """The single file as a diffusers folder, built with its local configuration folder."""
    import diffusers

    family = probed.family
    root = service.models_root(settings)
    config = root / SINGLE_FILE_CONFIGS / probed.config
    problem = single_file_config_problem("The file", probed, config)
    if problem is not None:
        raise InstallError(problem)
    pipeline_class = getattr(diffusers, families.family(family).img2img_pipeline)
    loading: dict[str, Any] = {}
    dtype = _stored_dtype(path)
    if dtype is not None:
        loading["dtype"] = dtype
    if options.get("upcast_attention"):
        loading["upcast_attention"] = True
    try:
        pipe = load_single_file(pipeline_class, path, config, **loading)
    except Exception as exc:
        raise InstallError(
            f"The checkpoint does not load as a {families.family(family).title} model: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from None
    _declare_prediction_type(pipe, probed.prediction_type)
    renew_now(path.stat().st_size)
    folder = staging / "diffusers"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


#: The dtypes a converted folder keeps as its file stored them; anything else (fp8, a `.ckpt`
#: whose dtype only loading would tell) loads as diffusers' float32.
_KEPT_DTYPES = ("float16", "bfloat16", "float32")


def _stored_dtype(path: Path) -> Any | None:
    """The torch dtype most of a safetensors file's tensors are stored in, when the converted
    folder should keep it: loading at diffusers' default float32 doubled a half-precision file
    on disk (a 24 GB Flux file became 48 GB) and in memory while converting."""
    import torch

    stored = model_folder.header_dtype(path) if path.suffix == ".safetensors" else None
    return getattr(torch, stored) if stored in _KEPT_DTYPES else None


def _convert_vae(settings: Settings, path: Path, staging: Path) -> Path:
    """A VAE single file (original or diffusers naming) as an AutoencoderKL folder."""
    import diffusers

    config = service.models_root(settings) / SINGLE_FILE_CONFIGS / Family.SD / "vae"
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


def _declare_prediction_type(pipe: Any, declared: str | None) -> None:
    """Give the converted pipeline's scheduler the declared prediction type (as the worker's
    cache does for a single file): saved in its scheduler config, the folder then runs as the
    file does. None: the configuration folder's scheduler config stands."""
    scheduler = pipe.scheduler
    if declared is not None and scheduler.config.get("prediction_type") != declared:
        pipe.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=declared)


def _as_safetensors(path: Path, embedding: bool = False) -> Path:
    """A LoRA or embedding as a safetensors file (a `.ckpt`/`.pt` is re-saved, weights only).

    An A1111 / textual-inversion `.pt` embedding keeps only its vectors, as A1111's own
    safetensors embeddings do (`emb_params`): its `string_to_token` (a tensor in the original
    textual-inversion code) would otherwise be a second tensor that no loader expects."""
    if path.suffix == ".safetensors":
        return path
    import torch
    from safetensors.torch import save_file

    state = flatten(torch.load(str(path), map_location="cpu", weights_only=True))
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    vectors = [v for k, v in tensors.items() if k.startswith("string_to_param.")]
    if embedding and len(vectors) == 1:
        tensors = {"emb_params": vectors[0]}
    out = path.with_suffix(".safetensors")
    save_file(tensors, str(out))
    return out
