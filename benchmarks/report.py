"""What every benchmark prints and writes: a table of figures and a JSON record of the run.

Figures are medians and percentiles over repeated measurements, always beside a baseline taken
in the same run on the same machine, because these machines are noisy and absolute numbers
from different runs do not compare.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` percentile (0..1) of `values`, by linear interpolation."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    """The median of `values`."""
    return float(statistics.median(values))


def machine() -> dict[str, Any]:
    """Where the run happened: host, CPU count, Python, and the GPU if torch sees one."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            info["gpu"] = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def git_commit() -> str | None:
    """The commit the benchmark ran on, if this is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


@dataclass
class Report:
    """One benchmark run: rows of named figures, printed as a table and saved as JSON."""

    name: str
    parameters: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Facts that show the run did what it claims (rows stored, messages queued, failures),
    # so a test can assert them without parsing the table.
    checks: dict[str, Any] = field(default_factory=dict)

    def add(self, **row: Any) -> None:
        """Add one row (the same keys in every row make the table's columns)."""
        self.rows.append(row)

    def table(self) -> str:
        """The rows as an aligned text table."""
        if not self.rows:
            return "(no rows)"
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        cells = [[_cell(row.get(col)) for col in columns] for row in self.rows]
        widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
        lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
        return "\n".join(lines)

    def emit(self, out: Path | None) -> dict[str, Any]:
        """Print the table (and notes) and write the JSON record to `out` if given."""
        host = machine()
        record: dict[str, Any] = {
            "benchmark": self.name,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": git_commit(),
            "machine": host,
            "parameters": self.parameters,
            "rows": self.rows,
            "notes": self.notes,
            "checks": self.checks,
        }
        print(f"# {self.name}  {record['date']}  {host.get('gpu', 'no GPU')}")
        print(self.table())
        for note in self.notes:
            print(f"note: {note}")
        for name, value in self.checks.items():
            print(f"check: {name} = {value}")
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=2) + "\n")
            print(f"wrote {out}")
        return record


def _cell(value: Any) -> str:
    """A table cell: floats to 4 significant figures, the rest as text."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
