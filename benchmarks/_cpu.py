"""Where a benchmark's CPU time went: per process group, read from /proc while the run goes on.

A thread samples the cumulative CPU time (utime + stime in /proc/<pid>/stat) of each group's
processes every SAMPLE_S, and the machine's busy time (/proc/stat). `CpuSampler.spent` then
gives, for any window inside the sampling, the CPU seconds of each group, of the machine, and
of everything else on it (other users' load). The groups' pids are asked again at every sample
so that processes started later (a worker per case, a new Postgres backend) are counted: a pid
first seen inside the window counts from zero (its whole life), a pid that ended inside it
counts to its last sample (under by at most SAMPLE_S of its CPU). `run_sampler` asks the
database for its backends at every sample (a worker opens its connections just before its
first batch: a backend found a second late was missed by a short window) and scans /proc for
the children every DISCOVER_S only (a scan costs milliseconds; children start seconds early).

Linux only; elsewhere every figure is empty.
"""

from __future__ import annotations

import bisect
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

SAMPLE_S = 0.2
DISCOVER_S = 1.0
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
#: The groups `run_sampler` adds to the named children: the database's backends, this process.
POSTGRES = "postgres backends"
SELF = "this benchmark"
#: The group that holds the machine's CPU time not spent by any named group.
OTHERS = "others on the machine"
MACHINE = "machine (all)"

#: The pids of each group of processes, asked again at every sample.
GroupLister = Callable[[], dict[str, list[int]]]


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) `pid` has used so far; None once it has gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) * TICK_S


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, not idle or waiting on I/O)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0
    ticks = [int(value) for value in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    busy = sum(ticks[:8]) - idle  # guest time is already inside user time
    return busy * TICK_S


def children_by_marker(parent: int, markers: dict[str, str]) -> dict[str, list[int]]:
    """For each group, the children of `parent` whose command line holds its marker, with all
    their descendants (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # not a process, or gone
        children.setdefault(ppid, []).append(int(entry.name))
    groups: dict[str, list[int]] = {name: [] for name in markers}
    for child in children.get(parent, []):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        for name, marker in markers.items():
            if marker in cmdline:
                groups[name] += _tree(child, children)
    return groups


def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


@dataclass
class _Sample:
    at: float
    machine_s: float
    by_pid: dict[str, dict[int, float]] = field(default_factory=dict)


class CpuSampler:
    """Samples the groups' CPU time in a thread while the block runs (a context manager)."""

    def __init__(self, names: list[str], lister: GroupLister) -> None:
        self.names = names
        self.samples: list[_Sample] = []
        self._lister = lister
        self._pids: dict[str, list[int]] = {name: [] for name in names}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._discover()
            self.samples.append(self._sample())
            if self._stop.wait(SAMPLE_S):
                self.samples.append(self._sample())
                return

    def _discover(self) -> None:
        try:
            found = self._lister()
        except Exception as exc:  # a lister that fails (database busy) leaves the last answer
            print(f"cpu sampler: listing the processes failed: {exc!r}", file=sys.stderr)
            return
        self._pids.update({name: found[name] for name in self.names if name in found})

    def _sample(self) -> _Sample:
        sample = _Sample(at=time.time(), machine_s=machine_busy_s())
        for name, pids in self._pids.items():
            cpu = {pid: process_cpu_s(pid) for pid in pids}
            sample.by_pid[name] = {pid: value for pid, value in cpu.items() if value is not None}
        return sample

    def spent(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds of each group between wall-clock `start` and `end`, the machine's total,
        and the rest of the machine's (OTHERS); empty without samples around the window."""
        if len(self.samples) < 2:
            return {}
        first, last = self._nearest(start), self._nearest(end)
        figures = {name: self._group(name, first, last) for name in self.names}
        figures[MACHINE] = last.machine_s - first.machine_s
        figures[OTHERS] = max(0.0, figures[MACHINE] - sum(figures[name] for name in self.names))
        return figures

    def span(self, start: float, end: float) -> float:
        """The wall time between the samples `spent` uses for that window (a window shorter
        than SAMPLE_S is measured over a longer span, or none)."""
        if len(self.samples) < 2:
            return 0.0
        return self._nearest(end).at - self._nearest(start).at

    def _nearest(self, moment: float) -> _Sample:
        times = [sample.at for sample in self.samples]
        index = min(bisect.bisect_left(times, moment), len(times) - 1)
        if index > 0 and moment - times[index - 1] < times[index] - moment:
            index -= 1
        return self.samples[index]

    def _group(self, name: str, first: _Sample, last: _Sample) -> float:
        """The group's CPU between two samples; a pid counts to its last sample before `last`."""
        before = first.by_pid.get(name, {})
        latest: dict[int, float] = {}
        for sample in self.samples:
            if first.at <= sample.at <= last.at:
                latest.update(sample.by_pid.get(name, {}))
        return sum(value - before.get(pid, 0.0) for pid, value in latest.items())


@contextmanager
def run_sampler(database_url: str, markers: dict[str, str]) -> Iterator[CpuSampler]:
    """CPU sampling of a run: this process's children by `markers` (group -> command-line
    marker), the Postgres backends of `database_url`'s database (POSTGRES), this process (SELF)."""
    # Imported here: the module's other users need no database driver.
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    query = text(
        "SELECT pid FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )

    children: dict[str, list[int]] = {}
    scanned = -DISCOVER_S

    def groups() -> dict[str, list[int]]:
        nonlocal children, scanned
        if time.monotonic() - scanned >= DISCOVER_S:
            children, scanned = children_by_marker(os.getpid(), markers), time.monotonic()
        with engine.connect() as connection:
            backends = [int(pid) for pid in connection.execute(query).scalars()]
        return {**children, POSTGRES: backends, SELF: [os.getpid()]}

    try:
        with CpuSampler([*markers, POSTGRES, SELF], groups) as sampler:
            yield sampler
    finally:
        engine.dispose()
