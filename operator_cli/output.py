"""How the operator CLI prints: JSON for scripts (``--json``), aligned tables for people.

Results go to stdout; every problem goes to stderr as ``error: ...`` (one style for all).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

PREVIEW_CHARS = 80  # the longest text (a message body, an error) a table cell shows


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters (``...`` marks the cut)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Lines of a table: a header row, then one line per row, columns aligned."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells])
              for i, header in enumerate(headers)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [list(headers), *cells]]


def fields(pairs: Sequence[tuple[str, object]]) -> list[str]:
    """Lines of ``name  value`` pairs, values aligned (a table of one record)."""
    width = max((len(name) for name, _ in pairs), default=0)
    return [f"{name.ljust(width)}  {'-' if value is None or value == '' else value}"
            for name, value in pairs]


@dataclass
class Output:
    """Where and how results are printed."""

    as_json: bool
    out: TextIO
    err: TextIO

    def data(self, value: Any) -> None:
        """Print a JSON document."""
        print(json.dumps(value, indent=2, default=str), file=self.out)

    def line(self, text: str) -> None:
        """Print one line of human-readable output."""
        print(text, file=self.out)

    def lines(self, texts: Sequence[str]) -> None:
        """Print lines of human-readable output."""
        for text in texts:
            self.line(text)

    def error(self, text: str) -> None:
        """Print a problem on stderr."""
        print(f"error: {text}", file=self.err)
