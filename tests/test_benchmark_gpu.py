"""The GPU benchmark in its smallest CPU mode, so that it keeps running between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import diffusers
import torch

from benchmarks._gpu_models import (
    FAMILY_OPERATIONS,
    FAMILY_PRESETS,
    PRESETS,
    family_flops_per_image,
    flops_per_image,
    unet_step_flops,
)

ROOT = Path(__file__).resolve().parents[1]
#: Batched images may differ from unbatched ones by summation order alone.
PIXEL_TOLERANCE = 2


def test_the_tiny_cpu_benchmark_compares_both_paths_and_reports_every_figure(
    tmp_path: Path,
) -> None:
    out = tmp_path / "gpu.json"
    command = [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--size", "tiny"]
    command += ["--threads", "1", "--out", str(out)]

    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )

    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["parameters"]["size"] == "tiny"
    rows = {(row["operation"], row["path"], row["batch"]): row for row in record["rows"]}
    assert set(rows) == {
        ("img2img", "diffusers", 1),
        ("img2img", "darkroom", 1),
        ("img2img", "darkroom", 3),
        ("pix2pix", "diffusers", 1),
        ("pix2pix", "darkroom", 1),
        ("pix2pix", "darkroom", 3),
        ("img_mixer", "diffusers", 1),
        ("img_mixer", "darkroom", 1),
        *((kind, path, 1) for kind in FAMILY_OPERATIONS for path in ("diffusers", "darkroom")),
        *((kind, "darkroom", 2) for kind in FAMILY_OPERATIONS),
    }
    for row in rows.values():
        assert row["images_per_s"] > 0
        assert row["latency_median_s"] > 0
        assert row["speedup"] > 0
        assert row["tflops"] > 0
        assert row["mfu"] is None  # no peak is known for a CPU
    for kind in ("img2img", "pix2pix"):
        assert rows[(kind, "darkroom", 1)]["max_diff_vs_unbatched"] == 0
        assert rows[(kind, "darkroom", 1)]["max_diff_vs_plain"] <= PIXEL_TOLERANCE
        assert rows[(kind, "darkroom", 3)]["max_diff_vs_unbatched"] <= PIXEL_TOLERANCE
        checks = record["checks"]
        assert checks[f"{kind}_max_pixel_diff_batched_vs_unbatched"] <= PIXEL_TOLERANCE
        assert 0 < checks[f"{kind}_unet_cfg_step_tflop"] < checks[f"{kind}_tflop_per_image"]
    assert record["checks"]["img_mixer_tflop_per_image"] > 0
    for kind in FAMILY_OPERATIONS:  # SDXL and Flux img2img: the worker's runner, batched too
        assert rows[(kind, "darkroom", 1)]["max_diff_vs_plain"] <= PIXEL_TOLERANCE
        assert rows[(kind, "darkroom", 2)]["max_diff_vs_unbatched"] <= PIXEL_TOLERANCE
        assert record["checks"][f"{kind}_tflop_per_image"] > 0


def test_the_full_size_models_have_the_published_architectures() -> None:
    full = PRESETS["full"]
    untyped: Any = diffusers
    with torch.device("meta"):
        unet = untyped.UNet2DConditionModel(**full.sd_unet)
        decoder = untyped.UNet2DConditionModel(**full.decoder_unet)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD 1.5's UNet
    assert round(sum(p.numel() for p in decoder.parameters()) / 1e9, 2) == 1.25  # Kandinsky 2.2
    # One 512x512 step with classifier-free guidance: about 1.6 TFLOP.
    assert round(unet_step_flops(full, "img2img") / 1e12, 2) == 1.61
    # 14 of 20 steps (strength 0.7), the VAE both ways and the text encoder.
    assert 25e12 < flops_per_image(full, "img2img") < 27e12


def test_sdxl_and_flux_at_1024_have_the_published_sizes_and_flops() -> None:
    full = FAMILY_PRESETS["full"]
    untyped: Any = diffusers
    with torch.device("meta"):
        unet = untyped.UNet2DConditionModel(**full.sdxl_unet)
        transformer = untyped.FluxTransformer2DModel(**full.flux_transformer)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e9, 2) == 2.57  # SDXL base UNet
    assert round(sum(p.numel() for p in transformer.parameters()) / 1e9, 1) == 11.9  # Flux.1-dev
    assert full.size == 1024
    # 14 of 20 steps at 1024x1024: Flux's transformer costs about five times SDXL's UNet.
    sdxl, flux = family_flops_per_image(full, "sdxl"), family_flops_per_image(full, "flux")
    assert 150e12 < sdxl < 250e12
    assert 4 * sdxl < flux < 6 * sdxl
