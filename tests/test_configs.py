"""Every shipped config validates, follows the naming convention and keeps the paper's recipe."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from aikd.config import load_config
from aikd.data import DATASETS
from aikd.methods import METHODS
from aikd.models import MODELS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
PROXY_REGIMES = {"fmnist_proxy": "fashion-mnist"}  # folders named after a regime, not a dataset


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_validates_and_is_named_after_its_contents(path):
    cfg = load_config(path)
    assert cfg.data.name in DATASETS and cfg.model.name in MODELS
    folder = PROXY_REGIMES.get(path.parent.name, path.parent.name)
    assert folder.replace("_", "-") == cfg.data.name.replace("_", "-")
    stem = path.stem
    assert stem.startswith("ce" if cfg.method == "ce" else cfg.method)
    if cfg.data.name != "fashion-mnist":  # the paper's settings: its recipe, untouched
        assert stem.endswith(cfg.model.name)
        assert cfg.train.epochs == 300 and cfg.train.lr == 0.1 and cfg.train.milestones == [0.5, 0.75]
        assert cfg.data.batch_size == (128 if cfg.data.name in ("cifar100", "tiny-imagenet") else 32)


@pytest.mark.parametrize("regime", sorted(PROXY_REGIMES))
def test_a_proxy_regime_has_every_method_on_one_recipe(regime):
    configs = [load_config(p) for p in CONFIGS if p.parent.name == regime]
    assert {c.method for c in configs} == set(METHODS.names())
    base = next(c for c in configs if c.method == "aikd")
    for cfg in configs:  # one data, model and recipe; only the equal-compute Baseline trains twice as long,
        # and the CutMix Baseline mixes its batches
        data = replace(cfg.data, mix="none") if cfg.method == "ce" and cfg.data.mix == "cutmix" else cfg.data
        assert (data, cfg.model) == (base.data, base.model)
        longer = cfg.method == "ce" and cfg.train.epochs == 2 * base.train.epochs
        assert cfg.train.epochs == base.train.epochs or longer


def test_every_paper_setting_has_aikd_and_baseline_configs():
    names = {f"{p.parent.name}/{p.stem}" for p in CONFIGS}
    for folder, models in (("cifar100", ["preact_resnet18", "densenet121"]),
                           ("tiny_imagenet", ["preact_resnet18", "densenet121"]),
                           *((f, ["resnet18", "densenet121"]) for f in ("cub200", "stanford_dogs", "mit67",
                                                                       "fgvc_aircraft"))):
        for model in models:
            assert {f"{folder}/ce_{model}", f"{folder}/aikd_{model}"} <= names
    for ablation in ("aikd", "aikd_no_adv", "aikd_only_progressive", "aikd_only_guide", "ce"):
        assert f"fashion_mnist/{ablation}" in names
