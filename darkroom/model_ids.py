"""Which weights a model, LoRA, VAE, embedding or safety-checker id names; free of torch.

The API imports this module to refuse unknown ids before a job is queued, and the worker uses it
to find what to load, so both tiers apply the same rules:

- Tiny preset (`model_preset == "tiny"`): every well-formed id is known. Models resolve to the
  tiny pipelines; LoRA, VAE and embedding ids resolve to files under `tiny_models_dir` that the
  worker builds lazily, seeded from the id (`worker.models.tiny`).
- Otherwise an id names, in this order, a local file or folder under `models_dir`:
  `<models_dir>/<model_id>/` (a diffusers pipeline folder) or
  `<models_dir>/<model_id>.safetensors` (or `.ckpt`: a single-file checkpoint in the original
  layout, configured by `<models_dir>/configs/<family>/`), `<models_dir>/loras/<name>.safetensors`,
  `<models_dir>/vae/<name>/` (an AutoencoderKL folder), `<models_dir>/embeddings/<name>.safetensors`
  (or `.pt`); or else a Hugging Face repo id of the form `owner/name` that the operator allows
  (`hub_models`, DARKROOM_HUB_MODELS) or that is one of the built-in defaults below. Anything
  else is an `UnknownModelError` whose message says what is installed and how to add it: a
  client never makes a worker download a repository the operator did not choose.

An img2img model's family (`darkroom.families`: SD 1.x/2.x, SDXL, Flux) is read from its files
and decides the pipeline class; under the tiny preset the ids of `TINY_FAMILY_MODELS` pick the
tiny model of another family. Pix2pix and the image mixer run one family each.

The image mixer needs two pipelines (Kandinsky 2.2's prior and decoder); a `model_id` for it
replaces the decoder and keeps the default prior, which all Kandinsky 2.2 decoders share.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from darkroom import families
from darkroom.families import UnrecognisedModelError
from darkroom.identities import Family, Operation, TinyModel
from darkroom.limits import MAX_ID_CHARS
from darkroom.settings import Settings

TINY_PRESET = "tiny"
#: Under the tiny preset only, a prompt containing this marker gets the safety checker that flags
#: every image, so that tests can exercise the NSFW path; real checkers ignore it.
TINY_NSFW_MARKER = "[[nsfw-test]]"
SAFETY_CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"

# Local names and Hub repo ids: no leading dot, slash or dash, no "..", no backslash.
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"
VALID_ID = re.compile(rf"{_NAME}(/{_NAME})?")
HUB_ID = re.compile(rf"{_NAME}/{_NAME}")
_EMBEDDING_SUFFIXES = (".safetensors", ".pt")
#: At most this many installed names are listed in an unknown id's message.
_LISTED = 20


class UnknownModelError(ValueError):
    """An id that names no model, LoRA, VAE or embedding this server can load."""


@dataclass(frozen=True)
class PipelineSource:
    """One diffusers pipeline class and the folder or Hub repo id to load it from; for a
    single-file checkpoint, the file and the local pipeline folder holding its configuration."""

    class_name: str
    location: str
    single_file_config: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Everything an operation loads; hashable, so it doubles as the cache key."""

    operation: str  # an `Operation` (tests and benchmarks label partial specs their own way)
    sources: tuple[PipelineSource, ...]
    family: Family = Family.SD


@dataclass(frozen=True)
class _Default:
    class_name: str
    repo_id: str
    tiny_name: TinyModel


#: Under the tiny preset, img2img model ids that pick the tiny model of a family other than SD 1.x
#: (id -> family, tiny model); every other id is the tiny SD 1.x model.
TINY_FAMILY_MODELS: dict[str, tuple[Family, TinyModel]] = {
    "tiny-sdxl": (Family.SDXL, TinyModel.SDXL_IMG2IMG),
    "tiny-flux": (Family.FLUX, TinyModel.FLUX_IMG2IMG),
    "tiny-sd2-v": (Family.SD, TinyModel.SD2_V_IMG2IMG),
}
#: Single-file checkpoint suffixes, in the order they are looked for.
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
#: Where the configuration of single-file checkpoints lives, per family: a diffusers pipeline
#: folder under `models_dir` (its weights are not read), so that nothing is downloaded.
SINGLE_FILE_CONFIGS = "configs"
#: The folders of `models_dir` (and of `tiny_models_dir`) that hold other kinds than pipelines.
LORAS_FOLDER, VAE_FOLDER, EMBEDDINGS_FOLDER = "loras", "vae", "embeddings"
SAFETY_CHECKER_FOLDER = "safety-checker"
RESERVED_FOLDERS = frozenset(
    {LORAS_FOLDER, VAE_FOLDER, EMBEDDINGS_FOLDER, SAFETY_CHECKER_FOLDER, SINGLE_FILE_CONFIGS}
)

# Per operation, the pipelines it runs in order; a model_id replaces the last one.
_DEFAULTS: dict[Operation, tuple[_Default, ...]] = {
    Operation.IMG2IMG: (
        _Default(
            "StableDiffusionImg2ImgPipeline",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            TinyModel.SD_IMG2IMG,
        ),
    ),
    Operation.PIX2PIX: (
        _Default(
            "StableDiffusionInstructPix2PixPipeline",
            "timbrooks/instruct-pix2pix",
            TinyModel.INSTRUCT_PIX2PIX,
        ),
    ),
    Operation.IMG_MIXER: (
        _Default(
            "KandinskyV22PriorPipeline",
            "kandinsky-community/kandinsky-2-2-prior",
            TinyModel.KANDINSKY_PRIOR,
        ),
        _Default(
            "KandinskyV22Pipeline",
            "kandinsky-community/kandinsky-2-2-decoder",
            TinyModel.KANDINSKY_DECODER,
        ),
    ),
}


def is_tiny(settings: Settings) -> bool:
    """True when every id resolves to tiny models built in code."""
    return settings.model_preset == TINY_PRESET


def operations() -> tuple[Operation, ...]:
    """Every operation name, in a fixed order."""
    return tuple(_DEFAULTS)


def default_model_id(operation: str) -> str:
    """The Hub repo id an operation loads when a request names no model (the one it replaces)."""
    return _DEFAULTS[_operation(operation)][-1].repo_id


def _operation(name: str) -> Operation:
    """The operation called `name` (a member passes through)."""
    try:
        return Operation(name)
    except ValueError:
        expected = sorted(op.value for op in Operation)
        raise ValueError(f"Unknown operation {name!r}; expected one of {expected}.") from None


def resolve_model(name: str, model_id: str | None, settings: Settings) -> ModelSpec:
    """The pipelines to load for the operation `name` when asked for `model_id` (None: the
    default)."""
    operation = _operation(name)
    defaults = _DEFAULTS[operation]
    if model_id is not None:
        _check_syntax("model", model_id)
    sources = [PipelineSource(d.class_name, d.repo_id) for d in defaults]
    if is_tiny(settings):
        tiny_dir = settings.tiny_models_dir
        sources = [PipelineSource(d.class_name, str(tiny_dir / d.tiny_name)) for d in defaults]
        if operation == Operation.IMG2IMG and model_id in TINY_FAMILY_MODELS:
            family, folder = TINY_FAMILY_MODELS[model_id]
            pipeline = families.family(family).img2img_pipeline
            location = str(settings.tiny_models_dir / folder)
            return ModelSpec(operation, (PipelineSource(pipeline, location),), family)
    elif model_id is not None:
        sources[-1] = _locate_model(model_id, settings, defaults[-1].class_name)
    family = _family_of(operation, sources[-1])
    if operation == Operation.IMG2IMG:  # the family decides the pipeline class
        sources[-1] = replace(sources[-1], class_name=families.family(family).img2img_pipeline)
    return ModelSpec(operation, tuple(sources), family)


def model_family(model_id: str | None, settings: Settings) -> Family:
    """The family of the img2img model `model_id` (None: the default), read from its files."""
    return resolve_model(Operation.IMG2IMG, model_id, settings).family


def model_id_problem(model_id: str, root: Path | None) -> str | None:
    """Why `model_id` cannot name a pipeline of the models folder `root` (None: not checked on
    disk), if it cannot: its first part is a folder the models folder keeps for other kinds
    (`configs/sd` is a configuration, `vae/x` a VAE), or, as owner/name, its owner is itself a
    pipeline folder (`sd15/unet` is a part of sd15). None when it can."""
    owner, _, name = model_id.partition("/")
    if owner in RESERVED_FOLDERS:
        return f"{model_id!r} names a folder the models folder keeps for itself; choose another id."
    if name and root is not None and (root / owner / "model_index.json").is_file():
        return f"{model_id!r} names a part of the model {owner!r}, not a model."
    return None


def _locate_model(model_id: str, settings: Settings, class_name: str) -> PipelineSource:
    """A pipeline folder, a single-file checkpoint beside it, or an allowed Hub id."""
    root = settings.models_dir
    problem = model_id_problem(model_id, root)
    if problem is not None:
        raise UnknownModelError(problem)
    if root is not None and not (root / model_id).is_dir():
        for suffix in _CHECKPOINT_SUFFIXES:
            path = root / f"{model_id}{suffix}"
            if path.is_file():
                return _single_file_source(path.resolve(), root, class_name)
    return PipelineSource(class_name, _locate_folder("model", model_id, settings, ""))


def _single_file_source(path: Path, root: Path, class_name: str) -> PipelineSource:
    """A checkpoint file with its configuration folder `<models_dir>/configs/<family>/` (SD 2.x:
    `configs/sd2/`); a sidecar declaring its prediction type is checked here too."""
    try:
        probed = families.probe_file(path)
    except UnrecognisedModelError as exc:
        raise UnknownModelError(str(exc)) from None
    config = root / SINGLE_FILE_CONFIGS / probed.config
    problem = single_file_config_problem(path.name, probed, config)
    if problem is not None:
        raise UnknownModelError(problem)
    pipeline = families.family(probed.family).img2img_pipeline
    return PipelineSource(pipeline, str(path), str(config.resolve()))


def single_file_config_problem(name: str, probed: families.SingleFile, config: Path) -> str | None:
    """Why the single file `name` cannot load with the configuration folder `config`, if it
    cannot: the folder is missing, or lacks the weights of a component the file leaves out
    (`probed.borrowed`: a Flux file usually holds the transformer alone). None when it can."""
    title = families.family(probed.family).title
    if not (config / "model_index.json").is_file():
        return (
            f"{name} is a {title} checkpoint, but its configuration folder "
            f"{SINGLE_FILE_CONFIGS}/{config.name}/ (a diffusers pipeline folder of that family) "
            "is missing: nothing is downloaded at load time."
        )
    unweighted = [part for part in probed.borrowed if not _holds_weights(config / part)]
    if unweighted:
        return (
            f"{name} is a {title} checkpoint without {', '.join(unweighted)}; those are read "
            f"from {SINGLE_FILE_CONFIGS}/{config.name}/, which has no weights for them: copy "
            "the base model's diffusers folder there with its weights."
        )
    return None


def _holds_weights(component: Path) -> bool:
    """Whether a diffusers component folder has weights (whole or sharded, safetensors or
    pickled), not only its config."""
    return component.is_dir() and any(
        path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json")
        for path in component.iterdir()
    )


def _family_of(operation: Operation, source: PipelineSource) -> Family:
    """The family of the last pipeline of `operation`: read from an img2img model's files."""
    if operation != Operation.IMG2IMG:
        return Family.SD
    location = Path(source.location)
    try:
        if source.single_file_config is not None:
            return families.detect_file(location)
        if location.is_absolute():
            return families.detect_folder(location) if location.is_dir() else Family.SD
    except UnrecognisedModelError as exc:
        raise UnknownModelError(str(exc)) from None
    return _hub_family(source.location)


def _hub_family(repo_id: str) -> Family:
    """A Hub model's family from its cached `model_index.json`; SD 1.x (the built-in default)
    when the repo is not in the local cache yet."""
    if repo_id == default_model_id(Operation.IMG2IMG):
        return Family.SD
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with the worker's diffusers
        return Family.SD
    cached = try_to_load_from_cache(repo_id, "model_index.json")
    if isinstance(cached, str):
        try:
            return families.detect_folder(Path(cached).parent)
        except UnrecognisedModelError as exc:
            raise UnknownModelError(str(exc)) from None
    return Family.SD


def resolve_lora(name: str, settings: Settings, family: Family = Family.SD) -> str:
    """A LoRA's `.safetensors` file, or its Hub repo id (tiny ones differ per `family`)."""
    _check_syntax("LoRA", name)
    if is_tiny(settings):
        return str(
            settings.tiny_models_dir / LORAS_FOLDER / f"{_tiny_stem(name, family)}.safetensors"
        )
    return _locate_file("LoRA", name, settings, LORAS_FOLDER, (".safetensors",))


def resolve_vae(name: str, settings: Settings) -> str:
    """A VAE's AutoencoderKL folder, or its Hub repo id."""
    _check_syntax("VAE", name)
    if is_tiny(settings):
        return str(settings.tiny_models_dir / VAE_FOLDER / _digest(name))
    return _locate_folder("VAE", name, settings, VAE_FOLDER)


def resolve_embedding(name: str, settings: Settings, family: Family = Family.SD) -> str:
    """A textual-inversion embedding's `.safetensors` or `.pt` file, or its Hub repo id (tiny
    ones differ per `family`)."""
    _check_syntax("embedding", name)
    if is_tiny(settings):
        stem = _tiny_stem(name, family)
        return str(settings.tiny_models_dir / EMBEDDINGS_FOLDER / f"{stem}.safetensors")
    return _locate_file("embedding", name, settings, EMBEDDINGS_FOLDER, _EMBEDDING_SUFFIXES)


def allowed_hub_ids(settings: Settings) -> frozenset[str]:
    """The Hub repo ids this server may download: the operator's list and the built-in defaults
    (the pipelines it loads when a request names no model, and the safety checker)."""
    defaults = {d.repo_id for chain in _DEFAULTS.values() for d in chain} | {SAFETY_CHECKER_REPO}
    return frozenset(settings.hub_models) | defaults


def may_download(location: str, settings: Settings) -> bool:
    """Whether a resolved location may be fetched from the Hub: an allowed repo id. The worker's
    model cache loads every other location with `local_files_only`, in case an id ever reaches
    it without passing the checks above."""
    return bool(HUB_ID.fullmatch(location)) and location in allowed_hub_ids(settings)


def resolve_safety_checker(settings: Settings, prompt: str) -> str:
    """The folder or repo holding the safety checker and its feature extractor.

    The one place where a test marker has an effect: under the tiny preset, a prompt containing
    `TINY_NSFW_MARKER` gets the checker that flags everything; any other prompt the one that
    never flags. Real presets use `<models_dir>/safety-checker/` when present, else the Hub's.
    """
    if is_tiny(settings):
        always = TINY_NSFW_MARKER in prompt
        name = TinyModel.SAFETY_CHECKER_ALWAYS if always else TinyModel.SAFETY_CHECKER
        return str(settings.tiny_models_dir / name)
    local = settings.models_dir / SAFETY_CHECKER_FOLDER if settings.models_dir else None
    if local is not None and local.is_dir():
        return str(local.resolve())
    return SAFETY_CHECKER_REPO


def check_ids(
    settings: Settings,
    model_id: str | None,
    loras: Sequence[str],
    vae: str | None,
    embeddings: Sequence[str],
) -> None:
    """Raise `UnknownModelError` for the first id that names nothing loadable (img2img models)."""
    if model_id is not None:
        resolve_model(Operation.IMG2IMG, model_id, settings)
    for lora in loras:
        resolve_lora(lora, settings)
    if vae is not None:
        resolve_vae(vae, settings)
    for embedding in embeddings:
        resolve_embedding(embedding, settings)


def _check_syntax(kind: str, name: str) -> None:
    """Refuse ids that could escape a folder or cannot be a repo id."""
    if len(name) > MAX_ID_CHARS:
        raise UnknownModelError(f"A {kind} id must be at most {MAX_ID_CHARS} characters.")
    if not VALID_ID.fullmatch(name):
        raise UnknownModelError(
            f"{name!r} is not a valid {kind} id: use letters, digits, '_', '-' and '.', "
            "optionally as owner/name."
        )


def _folder(settings: Settings, subfolder: str) -> Path | None:
    """`models_dir/subfolder`, None when no models folder is configured."""
    return settings.models_dir / subfolder if settings.models_dir is not None else None


def _locate_folder(kind: str, name: str, settings: Settings, subfolder: str) -> str:
    """`models_dir/subfolder/name/` when it is a folder, else `name` as an allowed Hub id."""
    folder = _folder(settings, subfolder)
    if folder is not None and (folder / name).is_dir():
        return str((folder / name).resolve())
    hint = f"the folder {_hint(settings, subfolder)}{name}/"
    return _hub_or_refuse(kind, name, settings, hint, partial(_installed_folders, folder))


def _locate_file(
    kind: str, name: str, settings: Settings, subfolder: str, suffixes: tuple[str, ...]
) -> str:
    """`models_dir/subfolder/name<suffix>` for the first suffix that exists, else a Hub id."""
    folder = _folder(settings, subfolder)
    for suffix in suffixes:
        if folder is not None and (folder / f"{name}{suffix}").is_file():
            return str((folder / f"{name}{suffix}").resolve())
    wanted = " or ".join(f"{_hint(settings, subfolder)}{name}{suffix}" for suffix in suffixes)
    installed = partial(_installed_files, folder, suffixes)
    return _hub_or_refuse(kind, name, settings, f"the file {wanted}", installed)


def _hub_or_refuse(
    kind: str, name: str, settings: Settings, local_hint: str, installed: Callable[[], list[str]]
) -> str:
    """`name` when it is a Hub repo id this server may download; else say what is installed
    and how to add it (`installed` lists the folder only then: accepted ids cost no listing)."""
    if HUB_ID.fullmatch(name) and name in allowed_hub_ids(settings):
        return name
    names = installed()
    shown = ", ".join(names[:_LISTED]) + (", ..." if len(names) > _LISTED else "")
    listed = ", ".join(sorted(settings.hub_models)[:_LISTED]) or "none"
    raise UnknownModelError(
        f"Unknown {kind} id {name!r}. Installed: {shown or 'none'}; Hub ids the operator "
        f"allows: {listed}. To add it, create {local_hint}, or list a Hugging Face repo id "
        "of the form owner/name in DARKROOM_HUB_MODELS."
    )


def _installed_folders(folder: Path | None) -> list[str]:
    """The ids of the folders in `folder`, sorted: `name`, or `owner/name` for the models that
    an owner's folder holds."""
    if folder is None or not folder.is_dir():
        return []
    names = []
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir() or entry.name in RESERVED_FOLDERS:
            continue
        inner = (
            [] if _is_model_folder(entry) else [d for d in entry.iterdir() if _is_model_folder(d)]
        )
        names.extend(sorted(f"{entry.name}/{d.name}" for d in inner) or [entry.name])
    return [name for name in names if VALID_ID.fullmatch(name)]


def _is_model_folder(folder: Path) -> bool:
    """A diffusers pipeline folder, or a single model's (a VAE's) folder."""
    return (folder / "model_index.json").is_file() or (folder / "config.json").is_file()


def _installed_files(folder: Path | None, suffixes: tuple[str, ...]) -> list[str]:
    """The ids of the files with one of `suffixes` in `folder`, sorted."""
    if folder is None or not folder.is_dir():
        return []
    stems = {p.name.removesuffix(p.suffix) for p in folder.iterdir() if p.suffix in suffixes}
    return sorted(stem for stem in stems if VALID_ID.fullmatch(stem))


def _hint(settings: Settings, subfolder: str) -> str:
    """The folder a message tells the operator to put weights in, ending with a slash."""
    root = str(settings.models_dir) if settings.models_dir is not None else "$DARKROOM_MODELS_DIR"
    return f"{root}/{subfolder}/" if subfolder else f"{root}/"


def _tiny_stem(name: str, family: Family) -> str:
    """A tiny add-on's file name: SD 1.x's as before, other families' prefixed with theirs."""
    return _digest(name) if family == Family.SD else f"{family}-{_digest(name)}"


def _digest(name: str) -> str:
    """A file-system-safe name for an id (ids may contain a slash)."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]
