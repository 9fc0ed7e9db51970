"""Markdown tables: the one helper every printed or written table goes through (eval, diagnostics, benchmarks,
data summaries), so they all render the same way.

    from medllava.reports import markdown_table
    print(markdown_table(["split", "rows"], [["train", 1200], ["test", 600]]))
    # | split | rows |
    # |---|---|
    # | train | 1200 |
    # | test | 600 |
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _cell(value: Any) -> str:
    # a "|" inside a cell would start a new column
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], pad: bool = False) -> str:
    """A GitHub-flavoured markdown table. `pad` aligns the columns with spaces (for tables read in a terminal)."""
    cells = [[_cell(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    for i, row in enumerate(cells[1:], start=1):
        if len(row) != len(headers):
            raise ValueError(f"table row {i} has {len(row)} cells, the header has {len(headers)}")
    if pad:
        widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
        lines = [
            "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells
        ]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    else:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "|" + "---|" * len(headers))
    return "\n".join(lines)
