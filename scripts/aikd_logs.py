"""AI-KD's own logs over a run, averaged over seeds: what the critic and each loss term did.

For every folder given (each holding seed<k>/student/metrics.jsonl, or runs below it), print a
Markdown table of the epoch records' critic gap, gradient penalty, L_D, L_A, L_P, L_G and
training accuracy at the chosen epochs, as the mean over the runs found.

    .venv/bin/python scripts/aikd_logs.py results/fmnist_proxy/runs/selection/crop_padding_1/fmnist_proxy/aikd/*
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COLUMNS = (("stat.critic_gap", "critic gap", 3), ("stat.gp", "GP", 3), ("stat.L_D", "L_D", 3),
           ("stat.L_A", "L_A", 2), ("stat.L_P", "L_P", 4), ("stat.L_G", "L_G", 4), ("train.acc", "train acc %", 2))


def histories(folder: Path) -> list[dict[int, dict]]:
    runs = []
    for path in sorted(folder.rglob("metrics.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        runs.append({r["epoch"]: r for r in records})
    return runs


def table(folder: Path, epochs: list[int]) -> list[str]:
    runs = histories(folder)
    if not runs:
        return [f"(no runs under {folder})"]
    lines = [f"{folder.name} ({len(runs)} runs)", "",
             "| epoch | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---:|" + "---:|" * len(COLUMNS)]
    for epoch in epochs:
        cells = []
        for key, _, digits in COLUMNS:
            values = [run[epoch][key] for run in runs if epoch in run and key in run[epoch]]
            cells.append(f"{statistics.fmean(values):.{digits}f}" if values else "–")
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--epochs", nargs="+", type=int, default=[1, 5, 10, 20, 30, 40, 50, 60])
    args = parser.parse_args()
    for folder in args.folders:
        print("\n".join(table(folder, args.epochs)), end="\n\n")


if __name__ == "__main__":
    main()
