"""What a downloaded model file is, found out without running it: safetensors or a torch zip
archive (`sniff_format`), a `.ckpt` whose pickle holds only tensors (`check_pickle`: loaded with
`weights_only=True`, which refuses any pickled code), a LoRA's or an embedding's keys recognised
and their family read from them; and `InstallError`, the refusal every step of an install
raises, its message safe to show the client.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Any

from darkroom.identities import Family


class InstallError(Exception):
    """An install that cannot succeed; the message is safe to show the client."""


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
    return list(flatten(state))


def flatten(state: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict of tensors as dotted names."""
    flat: dict[str, Any] = {}
    if isinstance(state, dict):
        for key, value in state.items():
            flat |= flatten(value, f"{prefix}{key}.")
    else:
        flat[prefix.rstrip(".")] = state
    return flat


def check_lora(path: Path) -> Family | None:
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


def check_embedding(path: Path) -> Family:
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
