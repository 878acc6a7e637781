"""The LoRA and embedding cache: a warm LoRA or embedding is not read again; bytes bound it,
least recently used first."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from darkroom.identities import Family
from tests.models.conftest import TinyFiles
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
    from worker.models import tiny_addons
    from worker.models.lora_cache import shared_cache
    from worker.pipelines import options

    path = tmp_path / "kohya-warm.safetensors"
    tiny_addons.ensure_tiny_lora(path, "kohya-warm")
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


def test_a_warm_embedding_is_not_read_again_and_loads_the_same_vectors(
    tmp_path: Path, tiny_files: TinyFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's embedding loading takes a warm `.safetensors` embedding from the cache (SD's
    one-encoder file and SDXL's clip_l/clip_g file): the second request reads no file, and the
    token it adds has the file's vector."""
    import diffusers

    from worker.models import tiny_addons
    from worker.models.lora_cache import shared_cache
    from worker.pipelines import options

    sd, xl = tmp_path / "emb-warm.safetensors", tmp_path / "xl-warm.safetensors"
    tiny_addons.ensure_tiny_embedding(sd, "emb-warm", Family.SD)
    tiny_addons.ensure_tiny_embedding(xl, "xl-warm", Family.SDXL)
    loader = CountingLoader()
    monkeypatch.setattr(options, "load_file", loader)  # safetensors' reader, counted
    cache = shared_cache()
    cache.clear()
    hits, misses = cache.hits, cache.misses
    pipeline_class: Any = diffusers.StableDiffusionImg2ImgPipeline
    pipe = pipeline_class.from_pretrained(
        str(tiny_files.sd_folder), safety_checker=None, requires_safety_checker=False
    )
    vector = load_file(str(sd))["emb-warm"]
    for _request in range(2):
        with options._embeddings(pipe, (("<warm>", str(sd)),)):
            token = pipe.tokenizer.convert_tokens_to_ids("<warm>")
            row = pipe.text_encoder.get_input_embeddings().weight[token]
            assert torch.equal(row, vector[0])
        assert "<warm>" not in pipe.tokenizer.get_added_vocab()  # unloaded after the request
    sdxl_pairs = [(None, None, "clip_l"), (None, None, "clip_g")]
    first = options._embedding_vectors(str(xl), sdxl_pairs)
    second = options._embedding_vectors(str(xl), sdxl_pairs)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert loader.reads == ["emb-warm.safetensors", "xl-warm.safetensors"]  # once each
    assert (cache.hits - hits, cache.misses - misses) == (2, 2)


def test_loras_and_embeddings_share_one_byte_budget(tmp_path: Path) -> None:
    cache, loader = LoraCache(max_bytes=100), CountingLoader()
    lora = _lora(tmp_path / "l.safetensors", 10)  # 40 bytes
    embedding = tmp_path / "e.safetensors"
    save_file({"e": torch.zeros(1, 10)}, str(embedding))  # 40 bytes
    cache.get(lora, loader)
    cache.get(str(embedding), loader)
    assert cache.resident_bytes == 80
    cache.get(_lora(tmp_path / "m.safetensors", 10), loader)  # 120 bytes: the LoRA goes first
    cache.get(str(embedding), loader)
    assert loader.reads == ["l.safetensors", "e.safetensors", "m.safetensors"]
