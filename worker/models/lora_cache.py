"""Recently used LoRA and embedding state dicts, kept in memory: bounded by bytes, LRU.

A request names its LoRAs and textual-inversion embeddings by id; without this cache every
request reads each file again and converts a LoRA's layout (kohya / A1111 to diffusers), which
costs more than applying it. LoRAs and `.safetensors` embeddings share one cache and one byte
budget (worker/pipelines/options.py: `_lora_weights`, `_embedding_vectors`). Entries
are keyed by the file's path, size and modification time, so a LoRA installed again under the
same id (delete_model, then load_model) is read anew. Tensors live on the CPU, as read; a
request's adapters are built from them by `load_lora_weights` (an embedding's vectors are
copied into the text encoder by `load_textual_inversion`) and dropped after the request, so
the cache never holds GPU memory.

One per worker process (`shared_cache`); the worker runs one job at a time, but the lock keeps
the structure sound should a thread (a metrics probe, say) look at it meanwhile.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from darkroom.settings import get_settings

StateDict = dict[str, torch.Tensor]
#: Default budget: a few dozen SDXL LoRAs (typically 20-200 MB each).
DEFAULT_MAX_BYTES = 2 * 1024**3
_Key = tuple[str, int, int]


class LoraCache:
    """State dicts by file, least recently used evicted first once `max_bytes` is passed."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError("A LoRA cache's byte budget cannot be negative.")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[_Key, tuple[StateDict, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def resident_bytes(self) -> int:
        """Bytes of the tensors held."""
        with self._lock:
            return sum(size for _state, size in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, path: str, load: Callable[[str], StateDict]) -> StateDict:
        """The state dict of the file at `path` (a shallow copy: callers may pop keys), read
        with `load` when it is not held."""
        key = _file_key(path)
        with self._lock:
            held = self._entries.get(key)
            if held is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return dict(held[0])
        state = load(path)
        size = _bytes(state)
        with self._lock:
            self.misses += 1
            if size <= self.max_bytes:  # one larger than the whole budget is never kept
                self._entries[key] = (state, size)
                self._evict()
        return dict(state)

    def clear(self) -> None:
        """Drop everything (clear_cache drops LoRAs with the models)."""
        with self._lock:
            self._entries.clear()

    def _evict(self) -> None:
        """Drop the least recently used entries until the budget holds."""
        total = sum(size for _state, size in self._entries.values())
        while total > self.max_bytes and self._entries:
            _key, (_state, size) = self._entries.popitem(last=False)
            total -= size


def _file_key(path: str) -> _Key:
    """Path, size and modification time: a replaced file is a new entry."""
    stat = os.stat(path)
    return (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def _bytes(state: StateDict) -> int:
    """Bytes of the tensors of a state dict."""
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


@functools.cache
def shared_cache() -> LoraCache:
    """This worker process's cache (DARKROOM_LORA_CACHE_BYTES bounds it; 0 turns it off)."""
    return LoraCache(get_settings().lora_cache_bytes)
