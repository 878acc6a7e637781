"""The benchmarks' CPU sampler counts a process that appears in the middle of a short window.

The saturation benchmark's worker opens its database connections a moment before its first
batch; a sampler that asked for new pids once a second missed those backends whenever the
window was shorter than that (the quick run's was 0.4 s), and reported no Postgres CPU at all.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from benchmarks._cpu import SAMPLE_S, CpuSampler

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")

#: How long the late process spins: a few samples, well under the old one-second discovery.
SPIN_S = 0.5


def test_a_process_started_inside_a_short_window_is_counted_from_its_start() -> None:
    pids: list[int] = []
    with CpuSampler(["late"], lambda: {"late": list(pids)}) as sampler:
        time.sleep(2 * SAMPLE_S)  # the sampler has run with an empty group
        start = time.time()
        spinner = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import time\nend = time.time() + {SPIN_S}\nwhile time.time() < end: pass",
            ]
        )
        pids.append(spinner.pid)
        spinner.wait(timeout=30)
        time.sleep(SAMPLE_S / 2)  # the last sample that saw it alive comes before `end`
        end = time.time()
        time.sleep(2 * SAMPLE_S)

    spent = sampler.spent(start, end)
    # It spun on one core for SPIN_S; some of that (its last fraction of a sample) may fall
    # after its last sample, and its start-up is counted too.
    assert spent["late"] >= SPIN_S - 2 * SAMPLE_S, spent
