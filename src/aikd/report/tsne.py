"""t-SNE of penultimate features (paper Figure 6): several models, the same test images, one PNG.

The report reads no model: the caller hands it each model's features (``aikd tsne`` computes them with
:func:`aikd.evaluation.tsne_panels`), and this module embeds and draws them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# One model's panel: its title, its features (N, D) and the class index of each row (N,).
FeaturePanel = tuple[str, np.ndarray, np.ndarray]


def tsne_plot(panels: Sequence[FeaturePanel], classes: Sequence[int], class_names: Sequence[str],
              out: str | Path, seed: int = 0) -> Path:
    """Embed each model's features with scikit-learn's TSNE and draw the maps side by side, one panel each."""
    from sklearn.manifold import TSNE

    from aikd.report.plots import tsne_figure

    remap = {c: k for k, c in enumerate(classes)}
    maps = []
    for title, feats, labels in panels:
        perplexity = float(min(30, (len(labels) - 1) // 3))
        points = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(
            feats.astype(np.float64))
        maps.append((title, points, np.array([remap[int(c)] for c in labels])))
    return tsne_figure(maps, class_names, out)
