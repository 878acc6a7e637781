"""The LoRA cache: a warm LoRA is not read again; bytes bound it, least recently used first."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from worker.models.lora_cache import LoraCache


def _lora(path: Path, floats: int, value: float = 1.0) -> str:
    save_file({"lora_unet_x.lora_down.weight": torch.full((floats,), value)}, str(path))
    return str(path)


class CountingLoader:
    """load_file, counting the reads."""

    def __init__(self) -> None:
        self.reads: list[str] = []

    def __call__(self, path: str) -> dict[str, torch.Tensor]:
        self.reads.append(Path(path).name)
        return load_file(path)


def test_warm_lora_is_not_read_again_and_copies_are_independent(tmp_path: Path) -> None:
    cache, loader = LoraCache(max_bytes=1_000), CountingLoader()
    path = _lora(tmp_path / "a.safetensors", 10)
    first = cache.get(path, loader)
    first.pop("lora_unet_x.lora_down.weight")  # a caller that pops keys changes no entry
    second = cache.get(path, loader)
    assert loader.reads == ["a.safetensors"]
    assert list(second) == ["lora_unet_x.lora_down.weight"]
    assert (cache.hits, cache.misses) == (1, 1)


def test_bytes_bound_the_cache_least_recently_used_first(tmp_path: Path) -> None:
    cache, loader = LoraCache(max_bytes=100), CountingLoader()  # 40 bytes per LoRA below
    a, b, c = (_lora(tmp_path / f"{n}.safetensors", 10) for n in "abc")
    cache.get(a, loader)
    cache.get(b, loader)
    cache.get(a, loader)  # a is now the most recent
    cache.get(c, loader)  # 120 bytes: b goes
    assert cache.resident_bytes == 80
    cache.get(a, loader)
    cache.get(b, loader)
    assert loader.reads == ["a.safetensors", "b.safetensors", "c.safetensors", "b.safetensors"]
    big = _lora(tmp_path / "big.safetensors", 100)  # 400 bytes: read, never kept
    cache.get(big, loader)
    assert cache.resident_bytes <= 100


def test_a_replaced_file_is_read_anew(tmp_path: Path) -> None:
    cache, loader = LoraCache(), CountingLoader()
    path = _lora(tmp_path / "a.safetensors", 10, 1.0)
    assert float(cache.get(path, loader)["lora_unet_x.lora_down.weight"][0]) == 1.0
    _lora(tmp_path / "a.safetensors", 12, 2.0)
    os.utime(path, ns=(1, 1))  # another modification time, whatever the clock's resolution
    assert float(cache.get(path, loader)["lora_unet_x.lora_down.weight"][0]) == 2.0
    assert len(loader.reads) == 2


def test_the_worker_reads_a_warm_lora_from_the_cache(tmp_path: Path) -> None:
    from worker.models import tiny
    from worker.models.lora_cache import shared_cache
    from worker.pipelines import options

    path = tmp_path / "kohya-warm.safetensors"
    tiny.ensure_tiny_lora(path, "kohya-warm")
    cache = shared_cache()
    cache.clear()
    hits, misses = cache.hits, cache.misses
    first = options._lora_weights(str(path))
    second = options._lora_weights(str(path))
    assert (cache.hits - hits, cache.misses - misses) == (1, 1)
    assert isinstance(first, dict)
    assert isinstance(second, dict)
    assert first.keys() == second.keys()
    assert first is not second
