"""How operator commands print: one JSON object per line, or left-aligned text columns."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def print_row(row: dict[str, Any]) -> None:
    """One JSON object on one line: readable, and scriptable with `jq`."""
    print(json.dumps(row, default=str))


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns under `header`, two spaces apart, no trailing blanks."""
    lines = [list(header), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
