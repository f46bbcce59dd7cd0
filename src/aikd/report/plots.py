"""PNG figures of reports: learning curves, forest plots, the error-calibration-cost map and t-SNE maps
(Figure 6); the reliability diagram (Figures 4-5), which every run writes, lives with the calibration metrics
(:mod:`aikd.metrics.reliability`).

matplotlib runs on its file-only Agg backend, so plots work on machines
without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TradeoffPoint:
    """One method in :func:`tradeoff_figure`: its paired differences to the Baseline and its cost."""

    name: str
    error: float  # mean paired difference in Top-1 error (points)
    error_interval: tuple[float, float] | None  # its 95 % interval (None: one seed)
    ece: float  # mean paired difference in ECE (points)
    ece_interval: tuple[float, float] | None
    cost: float | None  # mean training wall time over the Baseline's on the same seed, if recorded


def tradeoff_figure(points: Sequence[TradeoffPoint], title: str = ""):
    """Every method as a point: its paired difference to the Baseline in Top-1 error (x) against ECE (y), each
    on its 95 % interval, the marker's area proportional to its training cost, and a label with the cost.

    The question a user brings to the proxy table is which method to train; better is down and to the left,
    and a method far from the Baseline at a small marker is cheap for its gain. Each point's artists carry its
    name as their ``gid`` (the dot, its two interval lines and its label), so a reader of the figure (and its
    test) finds them. Returns the matplotlib figure."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 5.4), dpi=120)
    colours = plt.get_cmap("tab10" if len(points) <= 10 else "tab20")
    for i, p in enumerate(points):
        colour = colours(i % colours.N)
        if p.error_interval is not None:
            ax.hlines(p.ece, *p.error_interval, color=colour, linewidth=1.2, alpha=0.7, gid=p.name)
        if p.ece_interval is not None:
            ax.vlines(p.error, *p.ece_interval, color=colour, linewidth=1.2, alpha=0.7, gid=p.name)
        size = 7.0 * np.sqrt(p.cost) if p.cost is not None else 5.0
        ax.plot([p.error], [p.ece], "o", color=colour, markersize=size, markeredgecolor="black",
                markeredgewidth=0.5, alpha=0.85, gid=p.name)
        label = p.name if p.cost is None else f"{p.name} ({p.cost:.2f}x)"
        ax.annotate(label, (p.error, p.ece), xytext=(6, 5), textcoords="offset points", fontsize=8, gid=p.name)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(xlabel="Top-1 error: method - Baseline (points; left is better)",
           ylabel="ECE: method - Baseline (points; down is better)",
           title=(f"{title}: " if title else "") + "paired differences, 95 % intervals; marker area = cost")
    ax.grid(alpha=0.3)
    return fig


def tradeoff_plot(points: Sequence[TradeoffPoint], path: str | Path, title: str = "") -> Path:
    """:func:`tradeoff_figure`, saved as a PNG."""
    return save_figure(tradeoff_figure(points, title), path)


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
