"""Markdown tables of run summaries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COLUMNS = (("Top-1 err %", "top1_err", "{:.2f}"), ("Top-5 err %", "top5_err", "{:.2f}"),
           ("Macro F1", "macro_f1", "{:.4f}"), ("ECE %", "ece", "{:.2f}"),
           ("NLL", "nll", "{:.4f}"))


RULES = {"l": "---", "r": "---:", "c": ":-:"}


def pipe_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> list[str]:
    """The lines of a Markdown pipe table; ``align`` has one letter per column, l(eft), r(ight) or c(entre)
    (default: the first column left, the others right, as for a name followed by numbers)."""
    align = align or "l" + "r" * (len(header) - 1)
    return ["| " + " | ".join(cells) + " |" for cells in (header, [RULES[a] for a in align], *rows)]


def markdown_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One row per (name, summary), the paper's metrics as columns."""
    body = [[name, *(fmt.format(s[key]) for _, key, fmt in COLUMNS)] for name, s in rows]
    return "\n".join(pipe_table(["Method", *(c[0] for c in COLUMNS)], body))
