"""Figures: t-SNE of penultimate features (Figure 6) and pooled reliability diagrams (Figures 4-5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from aikd.config import load_config
from aikd.engine import Trainer
from aikd.errors import AikdError
from aikd.evaluation import load_model, penultimate_features, tsne_panels
from aikd.metrics.calibration import reliability_bins
from aikd.report.figures import reliability_figures
from aikd.report.runs import collect_runs
from aikd.report.tsne import tsne_plot

DIGITS = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "deterministic=true", "train.epochs=3"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for seed in (0, 1):
        Trainer(load_config(None, [*DIGITS, f"seed={seed}"]), root / f"seed{seed}", quiet=True).fit()
        paths.append(root / f"seed{seed}" / "checkpoints" / "last.safetensors")
    return paths


def test_features_are_the_penultimate_layer_of_the_same_images(checkpoints):
    a, b = load_model(checkpoints[0]), load_model(checkpoints[1])
    feats_a, labels_a = penultimate_features(a, [1, 3], per_class=20)
    feats_b, labels_b = penultimate_features(b, [1, 3], per_class=20)
    assert torch.equal(labels_a, labels_b) and sorted(set(labels_a.tolist())) == [1, 3] and len(labels_a) == 40
    assert feats_a.shape == feats_b.shape == (40, a.model.num_features)
    assert not torch.allclose(feats_a, feats_b)  # two models, two feature spaces, same images
    with torch.no_grad():
        logits = a.model.head(feats_a.to(a.device))  # the head on these features gives the model's own logits
    assert (logits.argmax(1) == labels_a).float().mean() > 0.5


def test_tsne_png_has_one_panel_per_model(checkpoints, tmp_path):
    panels, class_names = tsne_panels(checkpoints, ["student", "superior"], [0, 1, 2], 30)
    assert [title for title, _, _ in panels] == ["student", "superior"] and len(class_names) == 3
    path = tsne_plot(panels, [0, 1, 2], class_names, tmp_path / "tsne.png")
    width, height = Image.open(path).size
    assert width > 1.8 * height  # two square panels side by side
    with pytest.raises(AikdError, match=r"Classes \[12\] do not exist"):
        tsne_panels(checkpoints[:1], None, [0, 12], 30)
    with pytest.raises(AikdError, match="2 names for 1 checkpoints"):
        tsne_panels(checkpoints[:1], ["a", "b"], [0, 1], 30)


def test_report_pools_reliability_bins_over_seeds(tmp_path):
    g = torch.Generator().manual_seed(0)
    for seed in (0, 1):
        run = tmp_path / f"aikd/seed{seed}"
        run.mkdir(parents=True)
        logits, labels = torch.randn(500, 5, generator=g) * 3, torch.randint(0, 5, (500,), generator=g)
        bins = reliability_bins(logits, labels)
        (run / "reliability.json").write_text(json.dumps({"temperature": 2.0, "raw": bins.to_dict(),
                                                          "ts": bins.to_dict()}))
        (run / "summary.json").write_text(json.dumps({"method": "aikd", "dataset": "digits", "model": "small_cnn",
                                                      "seed": seed, "top1_err": 1.0, "macro_f1": 0.5,
                                                      "recipe": "aikd"}))
    (written,) = reliability_figures(collect_runs(tmp_path)[0], tmp_path / "figures")
    assert written.name == "reliability_digits_small_cnn.png"
    pixels = np.asarray(Image.open(written).convert("L"))
    assert pixels.std() > 10  # something was drawn
