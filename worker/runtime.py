"""What a worker process keeps between jobs, and a claimed job made ready to generate."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from celery import Celery

from darkroom.jobspec import JobSpec
from darkroom.settings import Settings
from darkroom.storage import Storage, make_storage
from db.models import Job
from worker.fastpath import fast_path_for
from worker.held import HeldJobs
from worker.job_leases import JobLeases
from worker.memory import device_budget
from worker.models.cache import ModelCache
from worker.overlap import Overlap
from worker.pipelines.request import GenerationRequest

#: Jobs per batch when `max_batch` is 0 (auto): batching pays on a GPU, hardly on a CPU.
CUDA_MAX_BATCH = 8


@dataclass
class WorkerRuntime:
    """What a worker process keeps between jobs: settings, resident models, storage, broker,
    and the jobs it holds."""

    settings: Settings
    broker: Celery
    cache: ModelCache = field(default_factory=ModelCache)
    # Set: batches are pipelined (worker.overlap); None: each batch is recorded before return.
    overlap: Overlap | None = None
    # Writes a running batch's progress off the pipeline's thread (worker.step_progress).
    progress_writer: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="progress-writer")
    )
    storage: Storage = field(init=False)
    held: HeldJobs = field(init=False)
    leases: JobLeases = field(init=False)

    def __post_init__(self) -> None:
        self.storage = make_storage(self.settings)
        self.held = HeldJobs(self.settings.job_lease_s)
        self.leases = JobLeases(self.settings)
        device = self.cache.device
        budget = device_budget(device, self.settings.gpu_memory_fraction)
        self.cache.configure(fast_path_for(self.settings, device), budget)

    @property
    def max_batch(self) -> int:
        """Jobs per batch at most: the setting, or by device when it is 0 (auto)."""
        if self.settings.max_batch:
            return self.settings.max_batch
        return CUDA_MAX_BATCH if self.cache.device == "cuda" else 1


@dataclass(frozen=True)
class Ready:
    """A claimed job whose request is built: its init images are fetched."""

    job: Job
    spec: JobSpec
    request: GenerationRequest
