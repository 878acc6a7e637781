"""GPU benchmark: Darkroom's worker path beside plain diffusers, in the same run, same weights.

    python -m benchmarks.gpu [--device cpu|cuda] [--size tiny|reduced|full] [--out FILE.json]
                             [--operations img2img,pix2pix,img_mixer] [--no-compile]
                             [--no-channels-last]
                             [--peak-tflops N] [--threads N] [--requests N]
                             [--batch-sizes 1,4,8] [--profile-batch 1,8 --profile-out FILE]

Defaults: CUDA and `full` when a GPU is present, else the CPU and `reduced`. The models are the
published architectures with seeded random weights (`benchmarks._gpu_models`): Stable Diffusion
1.5 img2img at 512x512, 20 steps, strength 0.7; InstructPix2Pix at 512x512, 20 steps; the
Kandinsky 2.2 mixer at 768x768, 25 steps; SDXL base and Flux.1-dev img2img at 1024x1024, 20
steps, strength 0.7 (operations `sdxl_img2img`, `flux_img2img`; Flux in bfloat16). `reduced` and
`tiny` shrink widths and sizes for CPUs.

Per operation, on one pipeline object:
1. plain diffusers: the pipeline as loaded (float16 on CUDA, float32 on the CPU, diffusers'
   defaults, which include SDPA), called once per request with its prompt strings;
2. Darkroom: the same modules after `worker.fastpath.apply_fast_path` (channels_last, fused
   QKV and torch.compile on CUDA), requests run through the worker's batched runner
   (`worker.pipelines.img2img.run_batch`, which `worker.batching` calls) at each batch size.

Each measurement runs once unmeasured first (warm-up, compilation for that batch shape). Figures:
images per second, the median latency a request sees (the whole call's time for a batched
request), the speedup over plain diffusers, the largest pixel difference of every batched image
against the same request run unbatched through the same path (and against plain diffusers),
the peak GPU memory of each batch size beyond the weights, the batch the worker's memory-based
sizing would choose, and MFU: counted FLOPs per image (FlopCounterMode on the meta device) times
images per second over the device's peak (790 TFLOP/s dense bf16/fp16 for H100 and H200).
`--requests` and `--batch-sizes` shorten a run to fit a time budget (a lent GPU's minutes).
`--profile-batch 1,8` profiles one more img2img call of 1, then 8 requests on Darkroom's path with
torch.profiler and writes where its time went (`--profile-out`, a text table: the busiest CUDA
kernels, the CPU operators, the share of wall time the GPU was busy).
The image mixer is not batched by the worker; its row shows the fast path alone, and its plain
baseline (`KandinskyV22PriorPipeline.interpolate`, given Darkroom's normalised weights) draws
its randomness differently, so no pixel difference is reported for it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from benchmarks._gpu_models import (
    FAMILY_OPERATIONS,
    FAMILY_PRESETS,
    PRESETS,
    FamilyPreset,
    Preset,
    family_flops_per_image,
    family_pipeline,
    flops_per_image,
    mixer_pipelines,
    sd_pipeline,
    unet_step_flops,
)
from benchmarks.report import Report, median
from darkroom.identities import Family, Operation
from darkroom.model_ids import ModelSpec
from worker.families import img2img_runner
from worker.fastpath import FastPath, apply_fast_path
from worker.memory import MemoryProfile, ShapeKey, available_bytes, measure_peak
from worker.pipelines import img2img, mixer, pix2pix
from worker.pipelines.options import RequestAssets
from worker.pipelines.request import GenerationRequest

#: Dense fp16/bf16 peak assumed for MFU, TFLOP/s, by GPU name.
PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}
GUIDANCE = 7.5
IMAGE_GUIDANCE = 1.5
MIXER_GUIDANCE = 4.0
MIXER_IMAGE_WEIGHT = 0.5
#: The most samples the memory-based sizing is asked about (the worker's default cap is 32).
ADAPTIVE_CAP = 64
_MIB = 2**20

Images = list[Image.Image]
_AnyPreset = TypeVar("_AnyPreset", Preset, FamilyPreset)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print (and optionally write) its report."""
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = _shortened(PRESETS[args.size or ("full" if device == "cuda" else "reduced")], args)
    dtype = torch.float16 if device == "cuda" else torch.float32
    cuda = device == "cuda"
    fast = FastPath(
        device,
        dtype,
        channels_last=cuda and args.channels_last,
        fuse_qkv=cuda,
        compile_unet=cuda and args.compile,
    )
    report = Report(
        "gpu",
        parameters={
            "device": device,
            "size": preset.name,
            "dtype": str(dtype).removeprefix("torch."),
            "compile": fast.compile_unet,
            "channels_last": fast.channels_last,
            "sd_size": preset.sd_size,
            "steps": preset.steps,
            "strength": preset.strength,
            "requests": preset.requests,
            "batch_sizes": list(preset.batch_sizes),
            "mixer_size": preset.mixer_size,
            "mixer_steps": preset.mixer_steps,
            "torch_threads": torch.get_num_threads(),
        },
    )
    peak = args.peak_tflops if args.peak_tflops is not None else _default_peak(device)
    family_preset = _shortened(FAMILY_PRESETS[preset.name], args)
    profile = ([int(b) for b in args.profile_batch.split(",") if b.strip()], args.profile_out)
    with tempfile.TemporaryDirectory(prefix="darkroom-gpu-bench-") as work:
        bench = _Bench(
            preset, Path(work), device, dtype, fast, peak, report, family_preset, profile
        )
        for operation in args.operations.split(","):
            bench.run(operation.strip())
    report.emit(args.out)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--size", choices=sorted(PRESETS), default=None)
    parser.add_argument("--out", type=Path, default=None)
    operations = [Operation.IMG2IMG, Operation.PIX2PIX, Operation.IMG_MIXER, *FAMILY_OPERATIONS]
    parser.add_argument("--operations", default=",".join(operations))
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--requests", type=int, default=None, help="requests per measurement")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated, e.g. 1,4,8")
    parser.add_argument("--profile-batch", default="", help="batch sizes to profile, e.g. 1,8")
    parser.add_argument("--profile-out", type=Path, default=Path("gpu-profile.txt"))
    return parser


def _shortened(preset: _AnyPreset, args: argparse.Namespace) -> _AnyPreset:
    """The preset with the command line's request count and batch sizes, where given."""
    changes: dict[str, Any] = {}
    if args.requests:
        changes["requests"] = args.requests
    if args.batch_sizes:
        changes["batch_sizes"] = tuple(int(size) for size in args.batch_sizes.split(","))
    return replace(preset, **changes)


def _default_peak(device: str) -> float | None:
    """The peak TFLOP/s of the GPU by name; None on a CPU or an unknown GPU."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


class _Bench:
    """One benchmark run: the settings every measurement shares, and the report it fills."""

    def __init__(
        self,
        preset: Preset,
        work: Path,
        device: str,
        dtype: torch.dtype,
        fast: FastPath,
        peak_tflops: float | None,
        report: Report,
        family_preset: FamilyPreset,
        profile: tuple[list[int], Path],
    ) -> None:
        self.preset, self.work, self.device, self.dtype = preset, work, device, dtype
        self.fast, self.peak_tflops, self.report = fast, peak_tflops, report
        self.family_preset = family_preset
        self.profile = profile  # img2img batch sizes to profile (none: no profile), the file

    def run(self, operation: str) -> None:
        """Measure one operation: plain diffusers first, then Darkroom's path."""
        if operation == Operation.IMG_MIXER:
            self._mixer()
        elif operation in (Operation.IMG2IMG, Operation.PIX2PIX):
            self._stable_diffusion(operation)
        elif operation in FAMILY_OPERATIONS:
            self._family(operation)
        else:
            raise SystemExit(f"unknown operation {operation!r}")
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _stable_diffusion(self, kind: str) -> None:
        preset = self.preset
        pipe = sd_pipeline(preset, kind, self.work, self.device, self.dtype)
        requests = _requests(kind, preset.requests, preset.sd_size, preset)
        flops = flops_per_image(preset, kind)
        self.report.checks[f"{kind}_unet_cfg_step_tflop"] = unet_step_flops(preset, kind) / 1e12
        self.report.checks[f"{kind}_tflop_per_image"] = flops / 1e12
        plain_call = _plain_img2img if kind == Operation.IMG2IMG else _plain_pix2pix
        plain = self._plain(kind, [partial(plain_call, pipe, r) for r in requests], flops)
        apply_fast_path(pipe, self.fast)
        runner = img2img.run_batch if kind == Operation.IMG2IMG else pix2pix.run_batch
        self._batched(kind, pipe, runner, requests, plain, flops)
        batches, target = self.profile
        if batches and kind == Operation.IMG2IMG:
            tables = [_profile_call(pipe, runner, (requests * b)[:b]) for b in batches]
            target.write_text("\n\n".join(tables))

    def _family(self, kind: str) -> None:
        """SDXL or Flux img2img at the family preset's size (1024x1024 in `full`): plain
        diffusers, then the worker's family runner at each batch size. Flux runs in bfloat16
        on CUDA, as the worker runs it (its activations overflow float16)."""
        family = FAMILY_OPERATIONS[kind]
        preset = self.family_preset
        dtype = torch.bfloat16 if family == Family.FLUX and self.device == "cuda" else self.dtype
        pipe = family_pipeline(preset, family, self.work, self.device, dtype)
        guidance = preset.flux_guidance if family == Family.FLUX else GUIDANCE
        requests = [
            replace(r, steps=preset.steps, strength=preset.strength, guidance_scale=guidance)
            for r in _requests(Operation.IMG2IMG, preset.requests, preset.size, self.preset)
        ]
        flops = family_flops_per_image(preset, family)
        self.report.checks[f"{kind}_tflop_per_image"] = flops / 1e12
        self.report.parameters[f"{kind}_size"] = preset.size
        plain = self._plain(kind, [partial(_plain_family, pipe, r) for r in requests], flops)
        apply_fast_path(pipe, self.fast)
        sizes = preset.batch_sizes
        self._batched(kind, pipe, img2img_runner(family), requests, plain, flops, sizes)

    def _plain(self, kind: str, calls: Sequence[Callable[[], Image.Image]], flops: int) -> _Run:
        """Plain diffusers, one request at a time, after one unmeasured call."""
        calls[0]()
        run = _Run()
        for call in calls:
            started = _now(self.device)
            run.images.append(call())
            run.latencies.append(_now(self.device) - started)
        run.seconds = sum(run.latencies)
        self._row(kind, "diffusers", 1, run, flops, baseline=run)
        return run

    def _batched(
        self,
        kind: str,
        pipe: Any,
        runner: Any,
        requests: list[GenerationRequest],
        plain: _Run,
        flops: int,
        batch_sizes: Sequence[int] | None = None,
    ) -> None:
        """Darkroom's runner at each batch size; unbatched (size 1) is the reference."""
        side = requests[0].width
        profile, key = MemoryProfile(), ShapeKey(ModelSpec(kind, ()), side, side)
        reference: Images | None = None
        worst = 0
        for size in batch_sizes or self.preset.batch_sizes:
            chunks = [requests[i : i + size] for i in range(0, len(requests), size)]
            try:
                run = self._run_chunks(pipe, runner, chunks)
            except torch.cuda.OutOfMemoryError:
                self.report.notes.append(f"{kind}: batch {size} ran out of memory; larger skipped")
                torch.cuda.empty_cache()
                break
            if run.peak_bytes is not None:
                profile.record(key, size, run.peak_bytes)
            reference = reference or run.images
            run.diff_unbatched = _max_diff(run.images, reference)
            run.diff_plain = _max_diff(run.images, plain.images)
            worst = max(worst, run.diff_unbatched)
            self._row(kind, "darkroom", size, run, flops, baseline=plain)
        self.report.checks[f"{kind}_max_pixel_diff_batched_vs_unbatched"] = worst
        free = available_bytes(self.device, 0.9)
        if free is not None:
            fits = profile.samples_that_fit(key, free, ADAPTIVE_CAP)
            self.report.checks[f"{kind}_adaptive_batch_samples"] = fits

    def _run_chunks(self, pipe: Any, runner: Any, chunks: list[list[GenerationRequest]]) -> _Run:
        """Run each chunk as one batch after an unmeasured first call at the same shape."""
        runner((pipe,), chunks[0], RequestAssets())
        run = _Run()
        for chunk in chunks:
            with measure_peak(self.device) as peak:
                started = _now(self.device)
                batches = runner((pipe,), chunk, RequestAssets())
                elapsed = _now(self.device) - started
            run.images += [images[0] for images in batches]
            run.latencies += [elapsed] * len(chunk)
            run.seconds += elapsed
            if peak.bytes is not None:
                run.peak_bytes = max(run.peak_bytes or 0, peak.bytes)
        return run

    def _mixer(self) -> None:
        preset = self.preset
        prior, decoder = mixer_pipelines(preset, self.work, self.device, self.dtype)
        requests = _requests(Operation.IMG_MIXER, preset.mixer_requests, preset.mixer_size, preset)
        flops = flops_per_image(preset, Operation.IMG_MIXER)
        self.report.checks["img_mixer_tflop_per_image"] = flops / 1e12
        calls = [partial(_plain_mixer, prior, decoder, r) for r in requests]
        plain = self._plain(Operation.IMG_MIXER, calls, flops)
        apply_fast_path(prior, self.fast)
        apply_fast_path(decoder, self.fast)
        run = self._plain_like([partial(_darkroom_mix, prior, decoder, r) for r in requests])
        self._row(Operation.IMG_MIXER, "darkroom", 1, run, flops, baseline=plain)

    def _plain_like(self, calls: Sequence[Callable[[], Image.Image]]) -> _Run:
        """One call at a time after an unmeasured one, with peak memory."""
        calls[0]()
        run = _Run()
        for call in calls:
            with measure_peak(self.device) as peak:
                started = _now(self.device)
                run.images.append(call())
                run.latencies.append(_now(self.device) - started)
            if peak.bytes is not None:
                run.peak_bytes = max(run.peak_bytes or 0, peak.bytes)
        run.seconds = sum(run.latencies)
        return run

    def _row(self, kind: str, path: str, batch: int, run: _Run, flops: int, baseline: _Run) -> None:
        rate = len(run.images) / run.seconds
        achieved = flops * rate / 1e12
        # Printed as measured too: a run cut short by its time budget still shows its rows.
        print(f"row: {kind} {path} batch {batch}: {rate:.2f} images/s", flush=True)
        self.report.add(
            operation=kind,
            path=path,
            batch=batch,
            images_per_s=rate,
            latency_median_s=median(run.latencies),
            speedup=rate / (len(baseline.images) / baseline.seconds),
            max_diff_vs_unbatched=run.diff_unbatched,
            max_diff_vs_plain=run.diff_plain,
            peak_mib=None if run.peak_bytes is None else run.peak_bytes / _MIB,
            tflops=achieved,
            mfu=None if self.peak_tflops is None else achieved / self.peak_tflops,
        )


class _Run:
    """What one measurement collected."""

    def __init__(self) -> None:
        self.images: Images = []
        self.latencies: list[float] = []
        self.seconds = 0.0
        self.peak_bytes: int | None = None
        self.diff_unbatched: int | None = None
        self.diff_plain: int | None = None


def _profile_call(pipe: Any, runner: Any, chunk: list[GenerationRequest]) -> str:
    """Profile one call of `chunk` after an unprofiled one; where its time went, as text."""
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    cuda = torch.cuda.is_available() and pipe.device.type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    runner((pipe,), chunk, RequestAssets())  # this shape may not have run yet
    started = _now(pipe.device.type)
    runner((pipe,), chunk, RequestAssets())
    unprofiled = _now(pipe.device.type) - started
    started = _now(pipe.device.type)
    with profile(activities=activities) as prof:
        runner((pipe,), chunk, RequestAssets())
        _now(pipe.device.type)
    wall = time.perf_counter() - started
    vae_seconds = _vae_decode_seconds(pipe, len(chunk), chunk[0].width // pipe.vae_scale_factor)
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    # The kernels' own rows: an operator's row repeats the time of the kernels it launched.
    kernels = [event for event in events if event.device_type == DeviceType.CUDA]
    device_us = sum(event.self_device_time_total for event in kernels)
    lines = [
        f"a call of {len(chunk)} requests: {unprofiled * 1000:.1f} ms, {wall * 1000:.1f} profiled",
        f"kernel time {device_us / 1000:.1f} ms: GPU busy {device_us / 1e6 / unprofiled:.3f}",
        f"VAE decode of {len(chunk)} latents alone: {vae_seconds * 1000:.1f} ms (unprofiled)",
        events.table(sort_by=sort, row_limit=45, max_name_column_width=70),
    ]
    print(*lines[:3], sep="\n")
    return "\n".join(lines)


@torch.no_grad()
def _vae_decode_seconds(pipe: Any, samples: int, side: int) -> float:
    """The median of three VAE decodes of `samples` random latents `side` wide and high."""
    latents = torch.randn(samples, 4, side, side, device=pipe.device, dtype=pipe.vae.dtype)
    times = []
    for _ in range(3):
        started = _now(pipe.device.type)
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
        times.append(_now(pipe.device.type) - started)
    return median(times)


def _now(device: str) -> float:
    """A timestamp taken after the device finished the work queued so far."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _requests(kind: str, count: int, size: int, preset: Preset) -> list[GenerationRequest]:
    """`count` requests with their own prompt, seed and init image, one sample each."""
    mixing = kind == Operation.IMG_MIXER
    return [
        GenerationRequest(
            operation=Operation(kind),
            model_id=None,
            prompt=f"a watercolour of harbour number {index}, boats at dawn",
            negative_prompt="",
            images=(_init_image(index, size),),
            image_weights=(MIXER_IMAGE_WEIGHT,) if mixing else (),
            width=size,
            height=size,
            steps=preset.mixer_steps if mixing else preset.steps,
            guidance_scale=MIXER_GUIDANCE if mixing else GUIDANCE,
            strength=preset.strength,
            image_guidance_scale=IMAGE_GUIDANCE,
            seeds=(1000 + index,),
        )
        for index in range(count)
    ]


def _init_image(index: int, size: int) -> Image.Image:
    """A smooth random picture, different per index, the same every run."""
    rng = np.random.default_rng(index)
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)


def _generator(pipe: Any, seed: int) -> torch.Generator:
    return torch.Generator(pipe.device).manual_seed(seed)


def _plain_call(pipe: Any, request: GenerationRequest, **options: Any) -> Image.Image:
    """One request through an init-image pipeline as a diffusers user calls it; `options` are
    the pipeline's own arguments."""
    output = pipe(
        prompt=request.prompt,
        image=request.images[0],
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        generator=_generator(pipe, request.seeds[0]),
        **options,
    )
    image: Image.Image = output.images[0]
    return image


def _plain_img2img(pipe: Any, request: GenerationRequest) -> Image.Image:
    """One request through StableDiffusionImg2ImgPipeline."""
    return _plain_call(pipe, request, strength=request.strength)


def _plain_family(pipe: Any, request: GenerationRequest) -> Image.Image:
    """One request through StableDiffusionXLImg2ImgPipeline or FluxImg2ImgPipeline."""
    options: dict[str, Any] = {}
    if type(pipe).__name__.startswith("Flux"):  # it does not take its size from the image
        options = {"width": request.width, "height": request.height, "max_sequence_length": 512}
    return _plain_call(pipe, request, strength=request.strength, **options)


def _plain_pix2pix(pipe: Any, request: GenerationRequest) -> Image.Image:
    """One request through StableDiffusionInstructPix2PixPipeline."""
    return _plain_call(pipe, request, image_guidance_scale=request.image_guidance_scale)


def _plain_mixer(prior: Any, decoder: Any, request: GenerationRequest) -> Image.Image:
    """One mix through KandinskyV22PriorPipeline.interpolate and the decoder."""
    weights = [request.image_weights[0], 1.0]  # the image's, and the prompt's (mixer.PROMPT_WEIGHT)
    embeds = prior.interpolate(
        [request.images[0], request.prompt],
        [weight / sum(weights) for weight in weights],  # Darkroom normalises them
        num_inference_steps=request.steps,
        generator=_generator(prior, request.seeds[0]),
    )
    output = decoder(
        image_embeds=embeds.image_embeds,
        negative_image_embeds=embeds.negative_image_embeds,
        width=request.width,
        height=request.height,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        generator=_generator(decoder, request.seeds[0]),
    )
    image: Image.Image = output.images[0]
    return image


def _darkroom_mix(prior: Any, decoder: Any, request: GenerationRequest) -> Image.Image:
    """One mix through the worker's mixer."""
    return mixer.run((prior, decoder), request, RequestAssets())[0]


def _max_diff(images: Images, reference: Images) -> int:
    """The largest difference of one channel of one pixel between paired images (0..255)."""
    worst = 0
    for image, other in zip(images, reference, strict=True):
        a = np.asarray(image.convert("RGB"), dtype=np.int16)
        b = np.asarray(other.convert("RGB").resize(image.size), dtype=np.int16)
        worst = max(worst, int(np.abs(a - b).max()))
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
