"""PNG figures of reports: learning curves, forest plots and t-SNE maps (Figure 6); the reliability diagram
(Figures 4-5), which every run writes, lives with the calibration metrics (:mod:`aikd.metrics.reliability`).

matplotlib runs on its file-only Agg backend, so plots work on machines
without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from aikd.metrics.reliability import pyplot, save_figure


def learning_curves(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]],
                    path: str | Path, title: str = "") -> Path:
    """One panel per metric, one line per method: the mean over seeds against epoch, with a band of +-1 std.

    ``curves[metric title][method] = (epochs, mean, std)``.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4.2), dpi=120, squeeze=False)
    names = list(dict.fromkeys(name for per_method in curves.values() for name in per_method))
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for ax, (metric, per_method) in zip(axes[0], curves.items(), strict=True):
        for name, (epochs, mean, std) in per_method.items():
            colour = colours(names.index(name) % colours.N)
            ax.plot(epochs, mean, linewidth=1.3, color=colour, label=name)
            ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.15, linewidth=0)
        ax.set(xlabel="epoch", ylabel=metric, title=f"{title}: {metric}" if title else metric)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    return save_figure(fig, path)


ForestRow = tuple[str, float, tuple[float, float] | None]  # (row label, mean difference, 95 % interval or None)


def forest_figure(panels: Mapping[str, Sequence[ForestRow]], title: str = ""):
    """One panel per metric, one row per method (the first at the top): each paired difference to the Baseline
    as a dot on its 95 % interval, and a line at zero. A row without an interval (one seed) is a dot alone;
    a row whose interval excludes zero is drawn in a strong colour. Returns the matplotlib figure."""
    plt = pyplot()
    rows = max((len(r) for r in panels.values()), default=1)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.6, 0.32 * rows + 1.2), dpi=120,
                             squeeze=False, sharey=True)
    for ax, (metric, entries) in zip(axes[0], panels.items(), strict=True):
        for y, (_, mean, interval) in enumerate(entries):
            clear = interval is not None and (interval[0] > 0 or interval[1] < 0)
            colour = "tab:blue" if clear else "0.55"
            if interval is not None:
                ax.hlines(y, interval[0], interval[1], color=colour, linewidth=2.2)
            ax.plot([mean], [y], "o", color=colour, markersize=4)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set(xlabel=f"{metric}: method - Baseline", title=f"{title}: {metric}" if title else metric)
        ax.grid(axis="x", alpha=0.3)
    first = next(iter(panels.values()), [])
    axes[0][0].set_yticks(range(len(first)), [name for name, _, _ in first], fontsize=8)
    axes[0][0].set_ylim(len(first) - 0.5, -0.5)  # the table's order, top to bottom
    return fig


def forest_plot(panels: Mapping[str, Sequence[ForestRow]], path: str | Path, title: str = "") -> Path:
    """:func:`forest_figure`, saved as a PNG."""
    return save_figure(forest_figure(panels, title), path)


def tsne_figure(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], class_names: Sequence[str],
                path: str | Path) -> Path:
    """Side-by-side 2-D embeddings, one panel per model: (title, points (N, 2), labels (N,))."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), dpi=120, squeeze=False)
    colours = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for ax, (title, points, labels) in zip(axes[0], panels, strict=True):
        for k, name in enumerate(class_names):
            pick = labels == k
            ax.scatter(points[pick, 0], points[pick, 1], s=4, color=colours(k % colours.N), label=name)
        ax.set(title=title, xticks=[], yticks=[])
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=3)
    return save_figure(fig, path)
