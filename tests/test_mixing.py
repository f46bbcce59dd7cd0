"""Cutout, Mixup and CutMix: soft labels, image range, pairing, and training with every method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aikd.config import load_config
from aikd.data.mixing import BatchMixer, cutmix, cutout, neighbour_permutation
from aikd.errors import ConfigError


def normalized_batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    g = torch.Generator().manual_seed(seed)
    mean, std = 0.5, 0.25
    images = (torch.rand(n, 3, 32, 32, generator=g) - mean) / std
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels, (0 - mean) / std, (1 - mean) / std


def mixer(**data) -> BatchMixer:
    cfg = load_config(None, [f"data.{k}={v}" for k, v in data.items()])
    return BatchMixer(cfg.data, num_classes=10)


@pytest.mark.parametrize("settings", [{"mix": "mixup"}, {"mix": "cutmix"}, {"cutout": 16},
                                      {"cutout": 8, "mix": "cutmix", "mix_alpha": 0.4}])
def test_augmentations_keep_labels_summing_to_one_and_images_in_range(settings):
    images, labels, low, high = normalized_batch()
    out, targets = mixer(**settings)(images, labels, torch.Generator().manual_seed(3))
    assert out.shape == images.shape
    assert out.min() >= low - 1e-6 and out.max() <= high + 1e-6
    if "mix" in settings:
        assert targets.shape == (16, 10)
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(16))
        assert (targets >= 0).all()
        # Position i mixes its own label with its neighbour's, with one ratio for the whole batch.
        own, other = labels, labels.roll(1)
        support = torch.zeros_like(targets).scatter(1, own[:, None], 1.0).scatter(1, other[:, None], 1.0)
        assert (targets[support == 0] == 0).all()
        distinct = own != other
        lam = targets[torch.arange(16), own][distinct]
        torch.testing.assert_close(lam, lam[:1].expand_as(lam))
    else:
        assert torch.equal(targets, labels)


def test_cutout_zeroes_one_square_of_the_requested_side_inside_the_image():
    images = torch.ones(64, 1, 32, 32)
    out = cutout(images, 8, torch.Generator().manual_seed(0))
    zeroed = (out == 0).flatten(1).sum(1)
    assert zeroed.max() == 64 and zeroed.min() >= 16  # a full 8x8 square, or a clipped one at the border


def test_cutmix_label_weight_equals_the_pasted_area():
    images = torch.zeros(4, 1, 10, 10)
    images += torch.arange(4).view(4, 1, 1, 1).float()
    partner = neighbour_permutation(4, False, images.device)
    out, lam = cutmix(images, partner, 0.64, np.random.default_rng(1))
    pasted = (out != images).flatten(1).float().mean(1)
    assert pasted[1].item() == pytest.approx(1 - lam)  # image 1 got pixels of image 0 over 1 - lam of its area


def test_paired_batches_are_mixed_within_each_half():
    assert neighbour_permutation(6, True, torch.device("cpu")).tolist() == [2, 0, 1, 5, 3, 4]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])  # anchors | partners of the same classes
    cfg = load_config(None, ["data.mix=mixup"])
    images = torch.randn(6, 1, 8, 8)
    _, targets = BatchMixer(cfg.data, 3, paired=True)(images, labels, torch.Generator().manual_seed(0))
    torch.testing.assert_close(targets[:3], targets[3:])  # anchor i and partner i keep one soft label


def test_mix_probability_zero_leaves_hard_labels():
    images, labels, _, _ = normalized_batch()
    out, targets = mixer(mix="cutmix", mix_prob=0.0)(images, labels, torch.Generator().manual_seed(0))
    assert torch.equal(out, images) and torch.equal(targets, labels)


@pytest.mark.parametrize("bad, match", [("data.mix=blend", "data.mix"), ("data.mix_alpha=0", "mix_alpha"),
                                        ("data.cutout=-1", "data.cutout"), ("data.holdout=1.5", "holdout")])
def test_bad_augmentation_settings_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [bad])


# ---------------------------------------------------------------------- every method with mixed batches

DIGITS = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "deterministic=true",
          "data.train_limit=384", "data.test_limit=200"]


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory, one_thread):
    from aikd.engine import Trainer

    out = tmp_path_factory.mktemp("teacher")
    Trainer(load_config(None, [*DIGITS, "train.epochs=2"]), out, quiet=True).fit()
    return out / "checkpoints" / "last.safetensors"


def all_methods() -> list[str]:
    import aikd.methods  # noqa: F401  (registers them)
    from aikd.methods import METHODS

    return sorted(METHODS.names())


@pytest.mark.parametrize("method", all_methods())
def test_every_method_trains_on_cutmix_and_cutout_batches(tmp_path, digits_teacher, method, one_thread):
    from aikd.engine import Trainer
    from aikd.methods import METHODS

    cfg = load_config(None, [*DIGITS, f"method={method}", "train.epochs=1", "data.mix=cutmix", "data.cutout=4",
                             f"teacher.checkpoint={digits_teacher}"])
    if not METHODS.get(method).needs_teacher(cfg.hparams):
        cfg.teacher.checkpoint = None
    trainer = Trainer(cfg, tmp_path, quiet=True)
    soft = []
    original = trainer.method.training_step

    def step(model, batch):
        soft.append(batch.targets.ndim == 2 and torch.allclose(batch.targets.sum(1), torch.ones(len(batch.targets))))
        return original(model, batch)

    trainer.method.training_step = step
    summary = trainer.fit()
    assert soft and all(soft)  # every batch reached the method mixed, with soft labels summing to 1
    assert 0 <= summary["top1_err"] <= 100
    record = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert "NaN" not in record and "Infinity" not in record
    method = trainer.method  # a method's own buffer, or AI-KD's previous predictions' (BufferPrevious.buffer)
    for buffer in (getattr(method, "buffer", None), getattr(getattr(method, "previous", None), "buffer", None)):
        if buffer is not None and hasattr(buffer, "filled"):
            assert bool(buffer.filled.all())  # every dataset index got its (mixed) prediction
