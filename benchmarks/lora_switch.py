"""LoRA switching, cold and warm, beside the generation itself.

    python -m benchmarks.lora_switch [--repeats 10] [--out results/lora_switch.json]

On the tiny SD 1.x model (CPU, or CUDA when present), with kohya-format LoRAs written in code:
- `generation`: one img2img call (64x64, 2 steps), no LoRA;
- `switch_cold`: applying a LoRA whose state dict is not cached (the worker reads the file and
  converts kohya's layout, then `load_lora_weights`, `set_adapters`, and the unload after);
- `switch_warm`: the same with the state dict in the worker's LoRA cache (no file read);
- `read_cold` / `read_warm`: the state dict alone, from the file or from the cache;
- `embedding_cold` / `embedding_warm`: adding a textual-inversion embedding's token to the
  tokenizer and text encoder and removing it again, its file read or from the same cache.
Each figure is the median of `--repeats` rounds, in milliseconds; rounds alternate between
four LoRAs, so every switch changes the adapter as a stream of requests would.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file

from worker.models import tiny
from worker.models.checkpoints import lora_in_convertible_layout
from worker.models.lora_cache import shared_cache
from worker.pipelines import options

LORAS = 4


def _median_ms(repeats: int, run: Callable[[int], None]) -> float:
    """The median wall time of `run(round)` over `repeats` rounds, in milliseconds."""
    times = []
    for round_ in range(repeats):
        started = time.perf_counter()
        run(round_)
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def _pipeline(workdir: Path) -> Any:
    """The tiny SD 1.x img2img pipeline, on the fastest device here."""
    import diffusers

    tiny.ensure_tiny_models(workdir)
    pipeline_class: Any = diffusers.StableDiffusionImg2ImgPipeline  # untyped constructors
    pipe = pipeline_class.from_pretrained(
        str(workdir / "sd-img2img"), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


def measure(repeats: int, workdir: Path) -> dict[str, Any]:
    """Every figure of the module doc."""
    pipe = _pipeline(workdir)
    paths = [workdir / "loras" / f"kohya-{n}.safetensors" for n in range(LORAS)]
    for n, path in enumerate(paths):
        tiny.ensure_tiny_lora(path, f"kohya-{n}")
    embeddings = [workdir / "embeddings" / f"emb-{n}.safetensors" for n in range(LORAS)]
    for n, path in enumerate(embeddings):
        tiny.ensure_tiny_embedding(path, f"emb-{n}")
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    cache = shared_cache()

    def generate(_round: int) -> None:
        pipe("a barn", image=image, strength=0.75, num_inference_steps=2, output_type="pil")

    def switch(round_: int, cold: bool) -> None:
        if cold:
            cache.clear()
        with options._loras(pipe, ((str(paths[round_ % LORAS]), 1.0),)):
            pass

    def read(round_: int, cold: bool) -> None:
        if cold:
            cache.clear()
        cache.get(str(paths[round_ % LORAS]), lambda p: lora_in_convertible_layout(load_file(p)))

    def embed(round_: int, cold: bool) -> None:
        if cold:
            cache.clear()
        with options._embeddings(
            pipe, ((f"<emb-{round_ % LORAS}>", str(embeddings[round_ % LORAS])),)
        ):
            pass

    generate(0)  # warm-up: first calls allocate
    switch(0, cold=False)
    embed(0, cold=False)
    for path in paths:
        cache.get(str(path), lambda p: lora_in_convertible_layout(load_file(p)))
    return {
        "device": str(pipe.device),
        "lora_file_bytes": paths[0].stat().st_size,
        "repeats": repeats,
        "generation_ms": _median_ms(repeats, generate),
        "switch_cold_ms": _median_ms(repeats, lambda r: switch(r, cold=True)),
        "switch_warm_ms": _median_ms(repeats, lambda r: switch(r, cold=False)),
        "read_cold_ms": _median_ms(repeats, lambda r: read(r, cold=True)),
        "read_warm_ms": _median_ms(repeats, lambda r: read(r, cold=False)),
        "embedding_cold_ms": _median_ms(repeats, lambda r: embed(r, cold=True)),
        "embedding_warm_ms": _median_ms(repeats, lambda r: embed(r, cold=False)),
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and optionally save) its JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        figures = measure(args.repeats, Path(workdir))
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
