"""The service-tier benchmarks, each run in its --quick mode so that none of them can rot.

No figure is judged here (speed is for the benchmarks to report, on a quiet machine): these
tests check that each benchmark drives the real system, that what it claims to have done was
done (rows stored, ids queued, webhooks delivered once), and that its JSON record is complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import api_tier, dispatcher, queue_overhead, recording, saturation

pytestmark = pytest.mark.slow


def _run(main: Any, tmp_path: Path) -> dict[str, Any]:
    """Run a benchmark's main in quick mode; its record, checked against the file it wrote."""
    out = tmp_path / "result.json"
    record: dict[str, Any] = main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert record["parameters"]["quick"] is True
    assert record["machine"]["cpus"] >= 1
    return record


def _rows_by(record: dict[str, Any], column: str) -> dict[str, dict[str, Any]]:
    return {row[column]: row for row in record["rows"]}


def test_api_tier_quick_submits_every_job_and_reports_both_baselines(tmp_path: Path) -> None:
    record = _run(api_tier.main, tmp_path)

    rows = _rows_by(record, "case")
    assert list(rows) == ["health", "submit", "raw", "fetch"]
    for row in rows.values():
        assert row["errors"] == 0
        assert row["count"] == record["parameters"]["count"]
        assert row["per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert rows["submit"]["submit_ratio"] == 1.0
    assert rows["raw"]["submit_ratio"] == pytest.approx(
        rows["submit"]["per_s"] / rows["raw"]["per_s"]
    )
    checks = record["checks"]
    assert checks["jobs_stored"] == checks["jobs_sent"] == checks["ids_queued"]
    assert checks["api_jobs_not_marked_enqueued"] == 0
    assert any("goal >= 0.5" in note for note in record["notes"])
    goals = checks["goals"]
    assert goals["fetch rate / health rate"]["value"] == pytest.approx(
        rows["fetch"]["per_s"] / rows["health"]["per_s"], abs=1e-3
    )
    assert goals["submit p99 / health p99"]["goal"] == "<= 3.0"


def test_queue_overhead_quick_times_every_job_through_the_real_tiers(tmp_path: Path) -> None:
    record = _run(queue_overhead.main, tmp_path)

    assert record["checks"] == {"jobs_measured": 3, "jobs_asked": 3}
    rows = _rows_by(record, "interval")
    lower = rows["submit -> claim (pipeline start, lower bound)"]
    upper = rows["submit -> finish - generationTime (pipeline start, upper bound)"]
    end_to_end = rows["end to end (submit -> webhook)"]
    pipeline = rows["generationTime (pipeline)"]
    overhead = rows["overhead: end to end - generationTime"]
    assert 0 < lower["p50_ms"] <= upper["p50_ms"] < end_to_end["p50_ms"]
    assert pipeline["p50_ms"] > 0
    assert rows["finish -> webhook received"]["p50_ms"] > 0
    assert 0 < overhead["p50_ms"] < end_to_end["p50_ms"]


def test_dispatcher_quick_delivers_each_webhook_once_and_beside_plain_posts(
    tmp_path: Path,
) -> None:
    record = _run(dispatcher.main, tmp_path)

    rows = _rows_by(record, "case")
    assert list(rows) == ["celery x1", "loop x1", "baseline"]  # the quick mode: one process
    count = record["parameters"]["count"]
    for case in ("celery x1", "loop x1"):
        assert rows[case]["errors"] == 0
        assert rows[case]["count"] == count
        assert rows[case]["ratio"] == pytest.approx(rows[case]["per_s"] / rows["baseline"]["per_s"])
    assert rows["baseline"]["count"] == 2 * count  # a baseline round beside each case's
    assert rows["baseline"]["errors"] == 0
    checks = record["checks"]
    assert checks["delivered"] == checks["deliveries_created"] == checks["attempts"]
    assert record["parameters"]["concurrency"] >= 1
    # The CPU table: a column per case and the baseline, a row per process group (a quick
    # round may be shorter than one /proc sample: only the shape and the bounds are sure).
    cpu = checks["cpu_ms_per_delivery"]
    assert set(cpu) == {"celery x1", "loop x1", "baseline"}
    for column in cpu.values():
        assert {"dispatcher", "loopback receiver", "postgres backends", "this benchmark"} <= set(
            column
        )
        assert all(value >= 0 for value in column.values())
        assert column["machine busy"] <= 1.5  # the machine's ticks over cores x the window


def test_saturation_quick_runs_a_full_queue_pipelined_and_serial(tmp_path: Path) -> None:
    record = _run(saturation.main, tmp_path)

    rows = _rows_by(record, "case")
    assert list(rows) == ["pipelined", "serial"]
    for row in rows.values():
        assert row["jobs_per_s"] > 0
        assert 0 < row["busy"] <= 1
        assert row["overhead_ms_per_job"] >= 0
        assert 1 <= row["batch_mean"] <= record["parameters"]["batch"]
    assert rows["serial"]["ratio"] == 1.0
    assert rows["pipelined"]["ratio"] == pytest.approx(
        rows["pipelined"]["jobs_per_s"] / rows["serial"]["jobs_per_s"]
    )
    checks = record["checks"]
    assert checks["jobs_succeeded"] == 2 * checks["jobs_per_case"]
    assert checks["goal_busy"]["goal"] == ">= 0.9"
    assert any("load average" in note for note in record["notes"])
    # The CPU budget: every process of the run was found and used CPU in the window.
    budget = record["machine"]["cpus"] * 50 / (0.9 * record["parameters"]["batch"])
    for row in rows.values():
        assert row["generator_ms"] == 50
        assert row["budget_ms_per_job"] == pytest.approx(budget)
        assert row["cpu_ms_per_job"] > 0
    cpu = checks["cpu_ms_per_job"]["pipelined 50 ms"]
    for process in ("worker", "dispatcher", "postgres backends"):
        assert cpu[process] > 0, process
    assert cpu["machine (all)"] >= 0.9 * cpu["the run's processes"]  # ticks, sample times
    assert set(checks["stages_ms"]) == {
        "stage: fetch + decode init image",
        "stage: encode output PNG",
    }
    assert any("CPU time per job" in note for note in record["notes"])


def test_recording_quick_records_a_batch_in_one_transaction(tmp_path: Path) -> None:
    record = _run(recording.main, tmp_path)

    rows = _rows_by(record, "case")
    assert list(rows) == ["per job", "per batch"]
    batch = record["parameters"]["batch"]
    assert rows["per job"]["commits_per_batch"] == batch
    assert rows["per batch"]["commits_per_batch"] == 1
    assert rows["per batch"]["statements_per_batch"] < rows["per job"]["statements_per_batch"]
    assert rows["per job"]["ratio"] == 1.0
    rounds = record["parameters"]["rounds"]
    assert record["checks"] == {"per job": rounds, "per batch": rounds}
