"""Writing tables out: the report's tables as Markdown, LaTeX (booktabs) or CSV, and Markdown pipe tables.

Rendering only formats what a :class:`aikd.report.tables.Table` already holds (its cells' text and marks), so
that every format shows the same numbers; :func:`pipe_table` is the one Markdown table writer, also for the
demo's table (:func:`markdown_table`) and the benchmark report (src/aikd/bench/report.py).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aikd.errors import AikdError

if TYPE_CHECKING:
    from aikd.report.tables import Table

SUMMARY_COLUMNS = (("Top-1 err %", "top1_err", "{:.2f}"), ("Top-5 err %", "top5_err", "{:.2f}"),
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
    body = [[name, *(fmt.format(s[key]) for _, key, fmt in SUMMARY_COLUMNS)] for name, s in rows]
    return "\n".join(pipe_table(["Method", *(c[0] for c in SUMMARY_COLUMNS)], body))


def render(tables: Sequence[Table], fmt: str) -> str:
    """Markdown, LaTeX (booktabs) or CSV (one tidy row per cell and metric)."""
    renderers = {"md": _markdown, "latex": _latex, "csv": _csv}
    if fmt not in renderers:
        raise AikdError(f"Unknown report format '{fmt}': choose md, csv or latex.")
    return renderers[fmt](tables)


def _markdown(tables: Sequence[Table]) -> str:
    marks = {"best": "**{}**", "second": "<u>{}</u>", "significant": "**{}**", "": "{}"}
    out = []
    for t in tables:
        head = ["Method", *t.lead] + [f"{g}: {m.title}" for g in t.groups for m in t.metrics]
        rows = [[name, *(t.lead_cells[i] if t.lead else []), *(marks[c.mark].format(c.text) for c in t.cells[i])]
                for i, name in enumerate(t.row_names)]
        align = "l" + "c" * len(t.lead) + "r" * (len(head) - 1 - len(t.lead))
        out += [f"### {t.title}", "", *pipe_table(head, rows, align), ""]
        out += [*t.notes, ""] if t.notes else []
    return "\n".join(out)


def _latex(tables: Sequence[Table]) -> str:
    marks = {"best": "\\textbf{{{}}}", "second": "\\underline{{{}}}", "significant": "\\textbf{{{}}}", "": "{}"}

    def tex(text: str) -> str:
        return text.replace("±", "$\\pm$").replace("_", "\\_").replace("✓", "\\checkmark").replace("–", "--")

    out = []
    for t in tables:
        k = len(t.metrics)
        out += ["\\begin{table}[t]", "\\centering", f"\\caption{{{tex(t.title)}}}",
                "\\begin{tabular}{l" + "c" * len(t.lead) + "c" * (k * len(t.groups)) + "}", "\\toprule"]
        first = ["", *[""] * len(t.lead)] + [f"\\multicolumn{{{k}}}{{c}}{{{tex(g)}}}" for g in t.groups]
        second = ["Method", *(tex(x) for x in t.lead)] + [tex(m.title) for _ in t.groups for m in t.metrics]
        out += [" & ".join(first) + " \\\\", " & ".join(second) + " \\\\", "\\midrule"]
        for i, name in enumerate(t.row_names):
            lead = [tex(x) for x in t.lead_cells[i]] if t.lead else []
            cells = [marks[c.mark].format(tex(c.text)) for c in t.cells[i]]
            out.append(" & ".join([tex(name), *lead, *cells]) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


def _csv(tables: Sequence[Table]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "method", "dataset", "model", "metric", "mean", "std", "seeds", "rank",
                     "ci_low", "ci_high"])
    for t in tables:
        for i, name in enumerate(t.row_names):
            for j, cell in enumerate(t.cells[i]):
                if cell.mean is None:
                    continue
                dataset, model = t.groups[j // len(t.metrics)].split(" / ")
                metric = t.metrics[j % len(t.metrics)]
                low, high = (f"{x:.6g}" for x in cell.interval) if cell.interval else ("", "")
                std = "" if cell.std is None else f"{cell.std:.6g}"
                title = t.title.split(":")[0].split(" (")[0]
                writer.writerow([title, name, dataset, model, metric.key, f"{cell.mean:.6g}", std, cell.n,
                                 cell.mark, low, high])
    return buffer.getvalue()
