"""The models folder (DARKROOM_MODELS_DIR) on disk: where each kind of model lives, what the
folder holds, read without loading anything (kind, family, size, the weights' dtype), and taking
a model out of it.

`<id>/` (a diffusers folder: single files are converted once, at install),
`loras/<id>.safetensors`, `embeddings/<id>.safetensors`, `vae/<id>/`. Work in progress lives
under `.installing/<n>/` (`STAGING`) and is renamed into place only once verified, so nothing is
ever half installed. Every function takes the folder itself: whether there is one, and the answer
when there is none, are the model operations' (`services.models.models_root`). Torch-free: the
API lists and verifies through it.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from darkroom import families
from darkroom.families import UnrecognisedModelError
from darkroom.identities import Family, ModelKind
from darkroom.model_ids import (
    EMBEDDINGS_FOLDER,
    LORAS_FOLDER,
    RESERVED_FOLDERS,
    VAE_FOLDER,
    model_id_problem,
)
from db.models import InstallState

#: Folder under the models folder where installs are assembled before the atomic rename.
STAGING = ".installing"
_SUBFOLDERS: dict[ModelKind, str] = {
    ModelKind.LORA: LORAS_FOLDER,
    ModelKind.EMBEDDING: EMBEDDINGS_FOLDER,
    ModelKind.VAE: VAE_FOLDER,
}
_LISTED_MAX = 1000


def target_path(root: Path, kind: ModelKind, model_id: str) -> Path:
    """Where an installed model of `kind` lives (a folder, or a LoRA's/embedding's file)."""
    if kind == ModelKind.MODEL:
        return root / model_id
    if kind == ModelKind.VAE:
        return root / VAE_FOLDER / model_id
    return root / _SUBFOLDERS[kind] / f"{model_id}.safetensors"


def on_disk(root: Path, kind: ModelKind, model_id: str) -> bool:
    """Files for `model_id` already in the models folder (installed by hand, say)."""
    target = target_path(root, kind, model_id)
    if target.exists():
        return True
    if kind == ModelKind.MODEL:
        return any(target.with_name(target.name + s).exists() for s in (".safetensors", ".ckpt"))
    return False


def paths_of(root: Path | None, kind: ModelKind, model_id: str) -> list[Path]:
    """The files and folders that hold `model_id` of `kind`: never a folder the models folder
    keeps for other kinds, nor a part of another model (`sd15/unet`, `vae/a/b` inside VAE a),
    nor a folder that is no model of that kind."""
    if root is None or (kind == ModelKind.MODEL and model_id_problem(model_id, root)):
        return []
    target = target_path(root, kind, model_id)
    paths = [target] if target.is_file() or _holds_a(kind, target) else []
    if kind == ModelKind.VAE and "/" in model_id and _holds_a(kind, target.parent):
        return []
    if kind == ModelKind.MODEL:
        paths += [
            p
            for s in (".safetensors", ".ckpt")
            if (p := target.with_name(target.name + s)).exists()
        ]
    if kind == ModelKind.EMBEDDING:
        pt = target.with_suffix(".pt")
        paths += [pt] if pt.exists() else []
    return paths


#: The file that makes a folder a model of each kind that is a folder.
_FOLDER_MARKERS = {ModelKind.MODEL: "model_index.json", ModelKind.VAE: "config.json"}


def _holds_a(kind: ModelKind, folder: Path) -> bool:
    """Whether `folder` is a model of `kind` (a pipeline folder, a VAE folder)."""
    marker = _FOLDER_MARKERS.get(kind)
    return marker is not None and (folder / marker).is_file()


def remove(root: Path, path: Path) -> None:
    """Take a file or folder out of the models folder at once (one rename), then delete it:
    a worker resolving the id meanwhile finds it gone, never half there."""
    trash = root / STAGING / f"deleted-{uuid.uuid4().hex}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    path.rename(trash)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


#: safetensors dtype names as torch spells them.
_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
#: Folders whose weights say a pipeline's dtype (its denoiser), before any other component's.
_MAIN_WEIGHTS = ("unet", "transformer")
#: A safetensors header larger than this is not read (real ones are well under 10 MB).
_MAX_HEADER_BYTES = 100 * 1024**2


def weights_dtype(root: Path | None, kind: ModelKind, model_id: str) -> str | None:
    """The dtype most of the installed weights are stored in (its denoiser's, for a pipeline
    folder), read from a safetensors header without loading anything; None for a `.ckpt` or
    files that cannot tell."""
    paths = paths_of(root, kind, model_id)
    if not paths:
        return None
    path = paths[0]
    if path.is_dir():
        candidates = [
            f for name in _MAIN_WEIGHTS for f in sorted((path / name).glob("*.safetensors"))
        ]
        candidates += sorted(path.rglob("*.safetensors"))[:1]
        if not candidates:
            return None
        path = candidates[0]
    if path.suffix != ".safetensors":
        return None
    return header_dtype(path)


def header_dtype(path: Path) -> str | None:
    """The most common tensor dtype in a safetensors file's JSON header."""
    try:
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if not 2 <= length <= _MAX_HEADER_BYTES:
                return None
            header = json.loads(file.read(length))
    except (OSError, ValueError):
        return None
    counts: dict[str, int] = {}
    for name, entry in header.items() if isinstance(header, dict) else ():
        if name != "__metadata__" and isinstance(entry, dict) and "dtype" in entry:
            counts[str(entry["dtype"])] = counts.get(str(entry["dtype"]), 0) + 1
    if not counts:
        return None
    found = max(counts, key=lambda dtype: counts[dtype])
    return _DTYPES.get(found, found.lower())


def installed_on_disk(root: Path | None) -> list[dict[str, Any]]:
    """What the models folder holds, each with its kind, family (read from its files) and size."""
    if root is None or not root.is_dir():
        return []
    found: list[dict[str, Any]] = []
    for path, model_id in _model_entries(root):
        found.append(_disk_entry(ModelKind.MODEL, model_id, path))
    for kind, folder in _SUBFOLDERS.items():
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*"))[:_LISTED_MAX]:
            relative = path.relative_to(base)
            if relative.parts[0].startswith("."):
                continue
            if kind == ModelKind.VAE and (path / "config.json").is_file():
                found.append(_disk_entry(kind, relative.as_posix(), path))
            elif (
                kind != ModelKind.VAE and path.suffix in (".safetensors", ".pt") and path.is_file()
            ):
                found.append(_disk_entry(kind, relative.with_suffix("").as_posix(), path))
    return found


def _model_entries(root: Path) -> list[tuple[Path, str]]:
    """(path, id) of the pipeline folders and single files, owners' folders included."""
    entries: list[tuple[Path, str]] = []
    for entry in sorted(root.iterdir())[:_LISTED_MAX]:
        if entry.name.startswith(".") or entry.name in RESERVED_FOLDERS:
            continue
        if entry.is_file() and entry.suffix in (".safetensors", ".ckpt"):
            entries.append((entry, entry.stem))
        elif (entry / "model_index.json").is_file():
            entries.append((entry, entry.name))
        elif entry.is_dir():
            entries += [
                (inner, f"{entry.name}/{inner.name}")
                for inner in sorted(entry.iterdir())
                if (inner / "model_index.json").is_file()
            ]
    return entries


def _disk_entry(kind: ModelKind, model_id: str, path: Path) -> dict[str, Any]:
    """A file or folder found in the models folder, described as an install."""
    family: Family | None = None
    if kind == ModelKind.MODEL:
        try:
            family = families.detect_folder(path) if path.is_dir() else families.detect_file(path)
        except UnrecognisedModelError:
            family = None
    size = _size(path)
    return {
        "model_id": model_id,
        "model_type": kind,
        "model_status": InstallState.READY.value,
        "family": family,
        "format": "diffusers" if path.is_dir() else path.suffix.lstrip("."),
        "size_bytes": size,
        "bytes_done": size,
        "sha256": None,
        "source": "models folder",
        "error": None,
        "attempts": 0,
        "path": str(path),
    }


def _size(path: Path) -> int:
    """Bytes of a file, or of every file in a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
