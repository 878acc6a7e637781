"""The pipelines a worker process keeps loaded, least recently used evicted first.

Loading a real pipeline takes seconds to minutes, so each worker process owns one `ModelCache`
and keeps up to `max_entries` models resident on its device: fp16 on CUDA, fp32 on the CPU
(where fp16 is slow or unsupported). It is not thread-safe: a worker runs one job at a time.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import diffusers
import torch

from worker.models.registry import ModelSpec, PipelineSource


@dataclass(frozen=True)
class ResidentModel:
    """The loaded pipelines of one `ModelSpec`, in the order of its sources."""

    pipelines: tuple[Any, ...]
    load_seconds: float


def default_device() -> str:
    """The device this process runs pipelines on."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelCache:
    """Loads each `ModelSpec` once and keeps the most recently used ones resident."""

    def __init__(self, max_entries: int = 4, device: str | None = None) -> None:
        if max_entries < 1:
            raise ValueError("A model cache must hold at least one model.")
        self.max_entries = max_entries
        self.device = device or default_device()
        self._entries: OrderedDict[ModelSpec, ResidentModel] = OrderedDict()

    def __contains__(self, spec: ModelSpec) -> bool:
        return spec in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, spec: ModelSpec) -> tuple[ResidentModel, float]:
        """The resident model for `spec` and the seconds spent loading it now (0.0 if cached)."""
        if spec in self._entries:
            self._entries.move_to_end(spec)
            return self._entries[spec], 0.0
        # Evict before loading, so that two large models never share the GPU at once.
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
            if self.device == "cuda":
                torch.cuda.empty_cache()
        model = self._load(spec)
        self._entries[spec] = model
        return model, model.load_seconds

    def _load(self, spec: ModelSpec) -> ResidentModel:
        started = time.perf_counter()
        pipelines = tuple(self._load_pipeline(source) for source in spec.sources)
        return ResidentModel(pipelines, time.perf_counter() - started)

    def _load_pipeline(self, source: PipelineSource) -> Any:
        pipeline_class = getattr(diffusers, source.class_name)
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        pipeline = pipeline_class.from_pretrained(source.location, dtype=dtype)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline.to(self.device)
