"""The models a worker process keeps loaded, least recently used evicted first.

Loading a real pipeline takes seconds to minutes, so each worker process owns one `ModelCache`
and keeps several models resident on its device, in its fast path's dtype (by default fp16 on
CUDA, fp32 on the CPU, where fp16 is slow or unsupported). It is not thread-safe: a worker runs
one job (or one batch) at a time.

Two limits apply, both counted over entries (a pipeline set of one `ModelSpec`, or one component):
`max_entries`, and optionally `max_bytes`, the parameter and buffer bytes of everything resident.
A size already seen is used to make room before loading; a first load is measured afterwards and
older entries are evicted until the total fits (a single entry larger than the budget still loads).

What is shared, so that nothing is loaded twice:
- Per-request settings (scheduler, LoRAs, embeddings, clip skip, token merging) never create a new
  entry: they are applied to the resident pipeline for one request and undone afterwards.
- A pipeline source (class and location) resident for one spec is reused by every other spec that
  names it, e.g. the Kandinsky prior shared by all image-mixer decoders.
- Components used beside a pipeline (a custom VAE, the safety checker) are entries of their own,
  keyed by location, so one VAE serves every model and request that names it.
- The byte count sees each tensor once, however many entries hold it.

On CUDA the byte budget also keeps room for activations: the largest activation peak measured
for any resident model (`worker.memory.MemoryProfile`, filled in by the batch runner) counts
against `max_bytes` beside the weights, so a model is evicted rather than the next batch running
out of memory. Every pipeline goes through the fast path (`worker.fastpath`) once it is loaded.
"""

from __future__ import annotations

import inspect
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPImageProcessor

from darkroom import families, metrics
from darkroom.model_ids import may_download
from darkroom.settings import get_settings
from worker.fastpath import FastPath, apply_fast_path, prepare_module
from worker.memory import MemoryProfile
from worker.models.single_file import load_single_file
from worker.models.weights import ModelSpec, PipelineSource

# diffusers wraps its constructors in untyped decorators: treat these as untyped.
_diffusers: Any = diffusers
_SafetyCheckerModel: Any = StableDiffusionSafetyChecker

VAE = "vae"
SAFETY_CHECKER = "safety_checker"


@dataclass(frozen=True)
class ComponentSource:
    """One model used beside a pipeline (`VAE` or `SAFETY_CHECKER`) and where to load it from."""

    kind: str
    location: str


@dataclass(frozen=True)
class ResidentModel:
    """The loaded pipelines of one `ModelSpec`, in the order of its sources."""

    pipelines: tuple[Any, ...]
    load_seconds: float


@dataclass(frozen=True)
class SafetyChecker:
    """Stable Diffusion's safety checker and the CLIP preprocessing it expects."""

    model: Any
    feature_extractor: Any


CacheKey = ModelSpec | ComponentSource


def default_device() -> str:
    """The device this process runs pipelines on."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelCache:
    """Loads each model once and keeps the most recently used ones within the limits."""

    def __init__(
        self,
        max_entries: int = 4,
        device: str | None = None,
        max_bytes: int | None = None,
        fast_path: FastPath | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("A model cache must hold at least one model.")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("A model cache's byte budget must be positive.")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.device = device or default_device()
        self.fast_path = fast_path or FastPath.plain(self.device)
        self.dtype = self.fast_path.dtype
        self.memory = MemoryProfile()  # activation peaks, measured by the batch runner
        self._entries: OrderedDict[CacheKey, Any] = OrderedDict()
        self._sizes: dict[CacheKey, int] = {}  # bytes of every key ever loaded, resident or not

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def resident_bytes(self) -> int:
        """Parameter and buffer bytes of everything resident, each tensor counted once."""
        return _tensor_bytes(self._entries.values())

    def configure(self, fast_path: FastPath, max_bytes: int | None) -> None:
        """Adopt a worker's fast path and byte budget (None keeps the current budget).

        Only before anything is loaded: resident models were prepared for the old fast path.
        """
        if self._entries and fast_path != self.fast_path:
            raise ValueError("A model cache's fast path cannot change once models are loaded.")
        self.fast_path, self.dtype = fast_path, fast_path.dtype
        if max_bytes is not None:
            self.max_bytes = max_bytes

    def _budgeted_bytes(self, extra: CacheKey | None = None) -> int:
        """Resident bytes, the expected size of `extra`, and the activation room the largest
        batch of a resident model (or `extra`) was measured to need."""
        specs = [key for key in [*self._entries, extra] if isinstance(key, ModelSpec)]
        reserve = max((self.memory.reserve_bytes(spec) for spec in specs), default=0)
        expected = self._sizes.get(extra, 0) if extra is not None and extra not in self else 0
        return self.resident_bytes + expected + reserve

    def get(self, spec: ModelSpec, pinned: Iterable[CacheKey] = ()) -> tuple[ResidentModel, float]:
        """The resident model for `spec` and the seconds spent loading it now (0.0 if cached)."""
        model: ResidentModel
        model, seconds = self._fetch(spec, set(pinned), lambda: self._load_model(spec))
        return model, seconds

    def component(
        self, source: ComponentSource, pinned: Iterable[CacheKey] = ()
    ) -> tuple[Any, float]:
        """A VAE or `SafetyChecker`, and the seconds spent loading it now; `pinned` stay."""
        return self._fetch(source, set(pinned), lambda: self._load_component(source))

    def _fetch(
        self, key: CacheKey, pinned: set[CacheKey], load: Callable[[], Any]
    ) -> tuple[Any, float]:
        """The entry for `key`, loaded (making room first) when it is not resident."""
        if key in self._entries:
            self._entries.move_to_end(key)
            metrics.record_model_cache_hit(key)
            return self._entries[key], 0.0
        self._make_room(key, pinned)
        started = time.perf_counter()
        value = load()
        seconds = time.perf_counter() - started
        metrics.record_model_load(key, seconds)
        self._entries[key] = value
        self._sizes[key] = _tensor_bytes([value])
        self._fit_budget(pinned | {key})
        return value, seconds

    def _make_room(self, key: CacheKey, pinned: set[CacheKey]) -> None:
        """Evict before loading, so that two large models never share the GPU at once."""
        while len(self._entries) >= self.max_entries and self._evict_one(pinned):
            pass
        if self.max_bytes is None or key not in self._sizes:
            return
        while self._budgeted_bytes(key) > self.max_bytes and self._evict_one(pinned):
            pass

    def _fit_budget(self, pinned: set[CacheKey]) -> None:
        """Evict the least recently used entries until the byte budget holds again."""
        if self.max_bytes is None:
            return
        while self._budgeted_bytes() > self.max_bytes and self._evict_one(pinned):
            pass

    def _evict_one(self, pinned: set[CacheKey]) -> bool:
        """Drop the least recently used entry that is not pinned; False when there is none."""
        victim = next((key for key in self._entries if key not in pinned), None)
        if victim is None:
            return False
        del self._entries[victim]
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return True

    def _load_model(self, spec: ModelSpec) -> ResidentModel:
        started = time.perf_counter()
        pipelines = tuple(
            self._shared(source) or self._load_pipeline(source) for source in spec.sources
        )
        return ResidentModel(pipelines, time.perf_counter() - started)

    def _shared(self, source: PipelineSource) -> Any | None:
        """A pipeline already resident for `source` under another spec, if any."""
        for key, value in self._entries.items():
            if isinstance(key, ModelSpec) and source in key.sources:
                return value.pipelines[key.sources.index(source)]
        return None

    def _load_pipeline(self, source: PipelineSource) -> Any:
        pipeline_class = getattr(_diffusers, source.class_name)
        options: dict[str, Any] = {
            "dtype": _pipeline_dtype(source.class_name, self.dtype),
            "local_files_only": _local_only(source.location),
        }
        if "safety_checker" in inspect.signature(pipeline_class.__init__).parameters:
            # The worker runs the checker itself, when asked, and censors per request.
            options |= {"safety_checker": None, "requires_safety_checker": False}
        if source.single_file_config is not None:
            # An original-layout checkpoint, configured by a local pipeline folder.
            pipeline = load_single_file(
                pipeline_class, Path(source.location), Path(source.single_file_config), **options
            )
            _declare_prediction_type(pipeline, Path(source.location))
        else:
            pipeline = pipeline_class.from_pretrained(source.location, **options)
        pipeline.set_progress_bar_config(disable=True)
        pipeline = pipeline.to(self.device)
        apply_fast_path(pipeline, self.fast_path)
        return pipeline

    def _load_component(self, source: ComponentSource) -> Any:
        local_only = _local_only(source.location)
        if source.kind == VAE:
            vae = _diffusers.AutoencoderKL.from_pretrained(
                source.location, dtype=self.dtype, local_files_only=local_only
            )
            vae = vae.to(self.device)
            prepare_module(vae, self.fast_path)
            return vae
        if source.kind == SAFETY_CHECKER:
            model = _SafetyCheckerModel.from_pretrained(
                source.location, dtype=self.dtype, local_files_only=local_only
            )
            extractor = CLIPImageProcessor.from_pretrained(
                source.location, local_files_only=local_only
            )
            return SafetyChecker(model.to(self.device), extractor)
        raise ValueError(f"Unknown component kind {source.kind!r}.")


def _declare_prediction_type(pipeline: Any, checkpoint: Path) -> None:
    """Give a single file's scheduler the prediction type its sidecar declares (epsilon and
    v-prediction files have the same tensors: `darkroom.families.probe_file`); without a
    sidecar the configuration folder's scheduler config stands. Every scheduler a request names
    is built from this config, so it inherits the type."""
    declared = families.sidecar_prediction_type(checkpoint)
    scheduler = pipeline.scheduler
    if declared is not None and scheduler.config.get("prediction_type") != declared:
        pipeline.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=declared)


def _pipeline_dtype(class_name: str, dtype: torch.dtype) -> torch.dtype:
    """The fast path's dtype, except that Flux runs in bfloat16 where the fast path says float16:
    its activations overflow float16's range (black or NaN images), as Black Forest Labs warn."""
    if class_name.startswith("Flux") and dtype == torch.float16:
        return torch.bfloat16
    return dtype


def _local_only(location: str) -> bool:
    """`local_files_only` for every location but the Hub ids this server may download.

    The registry already refuses other ids before anything is loaded; this is the second line,
    should an id ever reach the cache another way. The process's settings decide, as they
    configure the worker that owns this cache.
    """
    if Path(location).is_absolute():  # a folder the registry found: nothing to download
        return True
    return not may_download(location, get_settings())


def _modules(value: Any) -> Iterable[torch.nn.Module]:
    """The torch modules inside a cache entry."""
    if isinstance(value, torch.nn.Module):
        yield value
    elif isinstance(value, ResidentModel):
        for pipeline in value.pipelines:
            yield from (c for c in pipeline.components.values() if isinstance(c, torch.nn.Module))
    elif isinstance(value, SafetyChecker):
        yield value.model


def _tensor_bytes(values: Iterable[Any]) -> int:
    """Bytes of the distinct parameters and buffers of `values`."""
    seen: dict[int, int] = {}
    for value in values:
        for module in _modules(value):
            for tensor in [*module.parameters(), *module.buffers()]:
                seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
