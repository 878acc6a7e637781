"""Model families (Stable Diffusion 1.x/2.x, SDXL, Flux.1): what each one is, which request
fields it takes, and which family a model's own files are; free of torch.

A family is a dimension of its own beside the operation: img2img on an SDXL model runs
`StableDiffusionXLImg2ImgPipeline`, on a Flux model `FluxImg2ImgPipeline`. The API imports this
module to refuse a field the family cannot apply before a job is queued; the worker's family
modules (`worker.families`) say how each one loads and encodes prompts.

Detection reads only the files, never the name (as ComfyUI's `model_detection` and InvokeAI's
probe do):
- a diffusers folder: `model_index.json`'s pipeline class, else the components it lists;
- a `.safetensors` single file: the tensor names of its JSON header (no tensor is read);
- a `.ckpt` single file: the tensor names as they appear in the zip archive's pickle, searched as
  bytes: nothing is unpickled here (the worker loads it with `weights_only=True`).
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from darkroom.identities import Family

#: A safetensors header larger than this is no model file we can load (real ones are < 1 MB).
_MAX_HEADER_BYTES = 64 * 1024 * 1024


class UnrecognisedModelError(ValueError):
    """Files that are no model of a known family; the message says what was found."""


@dataclass(frozen=True)
class FamilyTraits:
    """What the API needs to know about a family to accept or refuse a request's fields."""

    name: Family
    title: str
    img2img_pipeline: str  # the diffusers class img2img runs on a model of this family
    size_multiple: int  # width and height must be multiples of this
    page_schedulers: bool  # the page's scheduler names (else only the model's own scheduler)
    clip_skip: bool
    tomesd: bool  # token merging patches a UNet's transformer blocks
    embeddings: bool  # textual inversion
    negative_prompt: bool


FAMILIES: dict[Family, FamilyTraits] = {
    Family.SD: FamilyTraits(
        Family.SD, "Stable Diffusion 1.x/2.x", "StableDiffusionImg2ImgPipeline", 8, True, True,
        True, True, True,
    ),
    Family.SDXL: FamilyTraits(
        Family.SDXL, "Stable Diffusion XL", "StableDiffusionXLImg2ImgPipeline", 8, True, True,
        True, True, True,
    ),
    Family.FLUX: FamilyTraits(
        Family.FLUX, "Flux.1", "FluxImg2ImgPipeline", 16, False, False, False, False, False,
    ),
}  # fmt: skip


def family(name: str) -> FamilyTraits:
    """The family called `name` (a `Family` member or its value)."""
    try:
        return FAMILIES[Family(name)]
    except ValueError:
        expected = sorted(member.value for member in Family)
        raise ValueError(f"Unknown model family {name!r}; expected one of {expected}.") from None


# --- detection --------------------------------------------------------------------------------

#: Single-file tensor-name prefixes, most specific first (A1111 / original Stability layout and
#: Black Forest Labs' Flux layout, bare or under `model.diffusion_model.`).
_SINGLE_FILE_MARKERS: tuple[tuple[str, Family], ...] = (
    ("double_blocks.", Family.FLUX),
    ("model.diffusion_model.double_blocks.", Family.FLUX),
    ("conditioner.embedders.1.model.", Family.SDXL),  # OpenCLIP bigG beside CLIP-L: SDXL base
    ("cond_stage_model.model.transformer.", Family.SD),  # OpenCLIP ViT-H: SD 2.x
    ("cond_stage_model.transformer.", Family.SD),  # CLIP ViT-L: SD 1.x
)
_REFINER_MARKER = "conditioner.embedders.0.model.transformer."


def detect_folder(folder: Path) -> Family:
    """The family of a diffusers pipeline folder, from its `model_index.json`."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise UnrecognisedModelError(
            f"{folder.name}/ has no model_index.json, so it is no diffusers pipeline folder."
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnrecognisedModelError(
            f"{folder.name}/model_index.json is unreadable: {exc}"
        ) from None
    if not isinstance(index, dict):
        raise UnrecognisedModelError(f"{folder.name}/model_index.json is not a JSON object.")
    return _family_of_index(folder.name, index)


def _family_of_index(name: str, index: dict[str, object]) -> Family:
    """A family from the pipeline class, else from the components (fine-tunes rename classes)."""
    class_name = str(index.get("_class_name", ""))
    if class_name.startswith("Flux"):
        return Family.FLUX
    if class_name.startswith("StableDiffusionXL"):
        return Family.SDXL
    if class_name.startswith("StableDiffusion") and "Upscale" not in class_name:
        return Family.SD
    present = {key for key, value in index.items() if isinstance(value, list) and value[0]}
    if {"transformer", "text_encoder_2"} <= present:
        return Family.FLUX
    if {"unet", "text_encoder_2"} <= present:
        return Family.SDXL
    if {"unet", "text_encoder", "vae"} <= present:
        return Family.SD
    raise UnrecognisedModelError(
        f"{name}/ is a {class_name or 'diffusers'} pipeline with components "
        f"{', '.join(sorted(present)) or 'none'}: no Stable Diffusion 1.x/2.x, SDXL or Flux "
        "model."
    )


def detect_file(path: Path) -> Family:
    """The family of a single-file checkpoint (`.safetensors` or `.ckpt`) from its tensor names."""
    names = _safetensors_names(path) if path.suffix == ".safetensors" else _ckpt_names(path)
    return family_of_tensor_names(path.name, names)


def family_of_tensor_names(name: str, names: Iterable[str]) -> Family:
    """A family from a checkpoint's tensor names (ComfyUI's `model_detection` does the same)."""
    names = list(names)
    for prefix, found in _SINGLE_FILE_MARKERS:
        if any(key.startswith(prefix) for key in names):
            return found
    if any(key.startswith(_REFINER_MARKER) for key in names):
        raise UnrecognisedModelError(
            f"{name} is an SDXL refiner checkpoint; install the refiner as a diffusers folder."
        )
    roots = sorted({key.split(".")[0] for key in names})
    raise UnrecognisedModelError(
        f"{name} holds {len(names)} tensors under {', '.join(roots[:8]) or 'nothing'}: no "
        "Stable Diffusion 1.x/2.x, SDXL or Flux checkpoint in the original layout (a lone UNet, "
        "VAE, LoRA or embedding is not a model)."
    )


def _safetensors_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file: 8 bytes of header length, then JSON."""
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > _MAX_HEADER_BYTES:
                raise UnrecognisedModelError(f"{path.name} has a {length}-byte header.")
            header = json.loads(file.read(length))
    except (OSError, struct.error, ValueError) as exc:
        if isinstance(exc, UnrecognisedModelError):
            raise
        raise UnrecognisedModelError(
            f"{path.name} is no readable safetensors file: {exc}"
        ) from None
    if not isinstance(header, dict):
        raise UnrecognisedModelError(f"{path.name} has no safetensors header.")
    return [key for key in header if key != "__metadata__"]


def _ckpt_names(path: Path) -> list[str]:
    """The tensor-name prefixes found in a `.ckpt` (a torch zip archive) without unpickling."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            data = b"".join(archive.read(n) for n in pickles[:1])
    except (OSError, zipfile.BadZipFile) as exc:
        raise UnrecognisedModelError(f"{path.name} is no torch zip checkpoint: {exc}") from None
    markers = [prefix for prefix, _family in _SINGLE_FILE_MARKERS] + [_REFINER_MARKER]
    return [prefix for prefix in markers if prefix.encode() in data]


# --- fields a family cannot apply --------------------------------------------------------------


@dataclass(frozen=True)
class AskedFields:
    """The request fields whose support differs by family; None/False/empty: not asked for."""

    scheduler: str | None = None
    algorithm_type: str | None = None
    clip_skip: int | None = None
    tomesd: bool = False
    embeddings: tuple[str, ...] = ()
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None


def refusals(name: str, asked: AskedFields) -> dict[str, str]:
    """Field name -> why the family `name` cannot apply it (empty: everything applies)."""
    fam = family(name)
    why: dict[str, str] = {}
    if not fam.page_schedulers and asked.scheduler is not None:
        why["scheduler"] = (
            f"{fam.title} models run their own flow-matching scheduler "
            "(FlowMatchEulerDiscreteScheduler); leave scheduler empty"
        )
    if not fam.page_schedulers and asked.algorithm_type is not None:
        why["algorithm_type"] = f"{fam.title} models have no DPM-Solver algorithm_type"
    if not fam.clip_skip and asked.clip_skip is not None:
        why["clip_skip"] = f"{fam.title} models have no CLIP skip (their prompt goes through T5)"
    if not fam.tomesd and asked.tomesd:
        why["tomesd"] = (
            f"token merging patches a UNet; {fam.title} models have a transformer backbone"
        )
    if not fam.embeddings and asked.embeddings:
        why["embeddings_model"] = f"{fam.title} models take no textual-inversion embeddings"
    if not fam.negative_prompt and asked.negative_prompt:
        why["negative_prompt"] = (
            f"{fam.title} models take no negative prompt (their guidance is distilled)"
        )
    for field, size in (("width", asked.width), ("height", asked.height)):
        if size is not None and size % fam.size_multiple:
            why[field] = f"must be a multiple of {fam.size_multiple} for {fam.title} models"
    return why
