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
import re
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
    markers = [prefix for prefix, _family in _SINGLE_FILE_MARKERS] + [_REFINER_MARKER]
    return family_of_tensor_names(path.name, _tensor_names(path, markers))


def _tensor_names(path: Path, searched: list[str]) -> list[str]:
    """A single file's tensor names; a `.ckpt`'s are the prefixes of `searched` found in it."""
    if path.suffix == ".safetensors":
        return _safetensors_names(path)
    return _ckpt_names(path, searched)


#: The configuration folder of SD 2.x single files (`<models_dir>/configs/sd2/`): SD 2.x is the
#: SD family (same pipeline, same fields) but its text encoder (OpenCLIP ViT-H), UNet widths and
#: tokenizer are not SD 1.x's, so its files need a configuration of their own.
SD2_CONFIG = "sd2"
#: Tensor-name prefixes of files whose configuration folder is not named after their family.
_CONFIG_MARKERS: tuple[tuple[str, str], ...] = (
    ("cond_stage_model.model.transformer.", SD2_CONFIG),
)
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: A sidecar larger than this is no configuration file (A1111's LDM yaml files are ~2 KB).
_MAX_SIDECAR_BYTES = 1024 * 1024
#: A1111's sidecar is the original LDM yaml; only its `parameterization` line is read (no YAML
#: library in the API's image): "v" is v-prediction, anything else (or none) LDM's epsilon.
_PARAMETERIZATION = re.compile(r"^\s*parameterization:\s*[\"']?([A-Za-z_]+)", re.MULTILINE)


#: Where a single file of each family keeps the components it may leave out, by tensor-name
#: prefix. Black Forest Labs ship Flux as the transformer alone (`flux1-dev.safetensors`, and
#: most Flux fine-tunes after them); ComfyUI's all-in-one files add `vae.` and
#: `text_encoders.clip_l.` / `text_encoders.t5xxl.`. A component a file leaves out is read from
#: its configuration folder, weights included. The UNet or transformer is always in the file
#: (detection found it there).
_VAE_PREFIXES = ("first_stage_model.", "vae.")
_CARRIED: dict[Family, dict[str, tuple[str, ...]]] = {
    Family.SD: {"vae": _VAE_PREFIXES, "text_encoder": ("cond_stage_model.",)},
    Family.SDXL: {
        "vae": _VAE_PREFIXES,
        "text_encoder": ("conditioner.embedders.0.",),
        "text_encoder_2": ("conditioner.embedders.1.",),
    },
    Family.FLUX: {
        "vae": _VAE_PREFIXES,
        "text_encoder": ("text_encoders.clip_l.",),
        "text_encoder_2": ("text_encoders.t5xxl.",),
    },
}


@dataclass(frozen=True)
class SingleFile:
    """What a single-file checkpoint is, read before anything is loaded (InvokeAI's probe)."""

    family: Family
    config: str  # its configuration folder's name under `<models_dir>/configs/`
    prediction_type: str | None  # from a sidecar file; None: the configuration folder decides
    #: Components the file leaves out, read with their weights from the configuration folder.
    borrowed: tuple[str, ...] = ()
    #: Flux only: whether the transformer takes a guidance input (Flux.1-dev and its
    #: fine-tunes: `guidance_in.`) or not (schnell), whatever the configuration folder's says.
    embedded_guidance: bool | None = None


def probe_file(path: Path) -> SingleFile:
    """Family, configuration folder and declared prediction type of a single-file checkpoint.

    v-prediction and epsilon models have the same tensors, so the prediction type is read from
    a sidecar beside the file: Darkroom's `<name>.json` (`{"prediction_type": "v_prediction"}`),
    else A1111's `<name>.yaml` (`parameterization: "v"`); without one, the scheduler config of
    the configuration folder decides (SD 2.1's own folder says v_prediction, as its 768 model
    needs).
    """
    names = _tensor_names(path, _PROBED_PREFIXES)  # a .ckpt's archive is read once
    found = family_of_tensor_names(path.name, names)
    config = next(
        (name for prefix, name in _CONFIG_MARKERS if any(k.startswith(prefix) for k in names)),
        str(found.value),
    )
    carried = _CARRIED[found].items()
    borrowed = tuple(
        part for part, prefixes in carried if not any(key.startswith(prefixes) for key in names)
    )
    guidance = _has_guidance_input(names) if found == Family.FLUX else None
    return SingleFile(found, config, sidecar_prediction_type(path), borrowed, guidance)


_GUIDANCE_INPUT = "guidance_in."
#: Every prefix the probe asks a `.ckpt` about: the family markers, the parts a file may
#: carry, and Flux's guidance input.
_PROBED_PREFIXES = [
    *(prefix for prefix, _family in _SINGLE_FILE_MARKERS),
    _REFINER_MARKER,
    *(prefix for parts in _CARRIED.values() for prefixes in parts.values() for prefix in prefixes),
    _GUIDANCE_INPUT,
]


def _has_guidance_input(names: list[str]) -> bool:
    """Whether a Flux file's transformer has Flux.1-dev's embedded guidance input."""
    bare = (name.removeprefix("model.diffusion_model.") for name in names)
    return any(name.startswith(_GUIDANCE_INPUT) for name in bare)


def sidecar_prediction_type(path: Path) -> str | None:
    """The prediction type that `<name>.json` or `<name>.yaml` beside `path` declares, if any."""
    declared = path.with_suffix(".json")
    if declared.is_file():
        try:
            prediction = json.loads(_read_sidecar(declared)).get("prediction_type")
        except (ValueError, AttributeError):
            raise UnrecognisedModelError(
                f"{declared.name} must be a JSON object such as "
                '{"prediction_type": "v_prediction"}.'
            ) from None
        if prediction not in PREDICTION_TYPES:
            raise UnrecognisedModelError(
                f"{declared.name}: prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                f"not {prediction!r}."
            )
        return str(prediction)
    a1111 = path.with_suffix(".yaml")
    if a1111.is_file():
        match = _PARAMETERIZATION.search(_read_sidecar(a1111))
        return "v_prediction" if match is not None and match.group(1) == "v" else "epsilon"
    return None


def _read_sidecar(path: Path) -> str:
    """A sidecar's text, bounded in size."""
    try:
        if path.stat().st_size > _MAX_SIDECAR_BYTES:
            raise UnrecognisedModelError(f"{path.name} is larger than a configuration file.")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UnrecognisedModelError(f"{path.name} is unreadable: {exc}") from None


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


def _ckpt_names(path: Path, prefixes: list[str]) -> list[str]:
    """Which of `prefixes` a `.ckpt` (a torch zip archive) holds tensors under, without
    unpickling it."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            data = b"".join(archive.read(n) for n in pickles[:1])
    except (OSError, zipfile.BadZipFile) as exc:
        raise UnrecognisedModelError(f"{path.name} is no torch zip checkpoint: {exc}") from None
    return [prefix for prefix in prefixes if prefix.encode() in data]


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


def refusals(name: Family, asked: AskedFields) -> dict[str, str]:
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
