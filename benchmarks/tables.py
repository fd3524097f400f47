"""Markdown for the docs: tables and wrapped paragraphs for the benchmarks' renderers.

Pure string functions: no torch, no I/O, so a benchmark's table renders without building anything.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

WIDTH = 105  # the README's line width for prose
_ALIGN = {"l": "---", "r": "---:"}


def paragraph(text: str) -> str:
    """Wraps one paragraph (given on one line) at `WIDTH`, never inside a word or at a hyphen."""
    return textwrap.fill(text, WIDTH, break_long_words=False, break_on_hyphens=False)


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A Markdown table.

    Args:
        header: The column titles.
        rows: The cells of each row, already formatted.
        align: One letter per column: `l` (left) or `r` (right).

    Returns:
        The table's lines, joined by newlines.

    Raises:
        ValueError: If `align` or a row does not have one entry per column.
    """
    if len(align) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row and `align` need {len(header)} columns")
    lines = [_row(header), "|" + "|".join(_ALIGN[a] for a in align) + "|"]
    lines += [_row(row) for row in rows]
    return "\n".join(lines)


def bold_if(text: str, condition: bool) -> str:
    """`text` in bold when `condition` holds, else as it is."""
    return f"**{text}**" if condition else text


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
