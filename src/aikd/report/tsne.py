"""t-SNE of penultimate features (paper Figure 6): several models, the same test images, one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aikd.errors import AikdError


def tsne_plot(checkpoints: Sequence[str | Path], names: Sequence[str] | None, classes: Sequence[int],
              per_class: int, out: str | Path, overrides: Sequence[str] = (), seed: int = 0) -> Path:
    """Embed each checkpoint's features of the chosen classes with scikit-learn's TSNE; one panel each."""
    from sklearn.manifold import TSNE

    from aikd.evaluation import load_model, penultimate_features
    from aikd.report.plots import tsne_figure

    if names is not None and len(names) != len(checkpoints):
        raise AikdError(f"--names gives {len(names)} names for {len(checkpoints)} checkpoints.")
    panels, class_names = [], None
    for i, path in enumerate(checkpoints):
        loaded = load_model(path, list(overrides))
        feats, labels = penultimate_features(loaded, list(classes), per_class, seed)
        if len(labels) < 5:
            raise AikdError(f"Only {len(labels)} test images in classes {list(classes)}: t-SNE needs more.")
        perplexity = float(min(30, (len(labels) - 1) // 3))
        points = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(
            feats.numpy().astype(np.float64))
        remap = {c: k for k, c in enumerate(classes)}
        panel_labels = np.array([remap[int(c)] for c in labels])
        title = names[i] if names else f"{loaded.cfg.method} ({Path(path).parent.parent.name})"
        panels.append((title, points, panel_labels))
        class_names = [loaded.data.test.classes[c] for c in classes]
    return tsne_figure(panels, class_names, out)
