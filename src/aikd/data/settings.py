"""The data section of a run's config (``data.*``): owned by the data package, which reads it.

The config module composes it into :class:`aikd.config.RunConfig`; keeping it here lets the data
layer name its own settings without importing the config layer above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aikd.checks import positive, positive_or_null, require


@dataclass
class DataConfig:
    """Which dataset, how much of it, and how it is batched and augmented."""

    name: str = "fashion-mnist"
    root: str | None = None  # None: the dataset's conventional location
    train_limit: int | None = None  # stratified subset of the training split
    test_limit: int | None = None
    subset_seed: int = 0  # same subset for every training seed, so seeds are comparable
    batch_size: int = 128  # at least 2 with BatchNorm; a last batch of one is left out of its epoch
    eval_batch_size: int = 512
    num_workers: int | None = None  # None: min(8, cpu count) for image folders
    image_size: int | None = None  # None: the dataset's own (32, 64 or 224)
    augment: Literal["standard", "none"] = "standard"
    # Strength of the in-memory crop + flip ("standard"): padding of the random crop in pixels
    # (null: the dataset's, 4 from 28 px up) and horizontal flips (null: where they keep the label).
    crop_padding: int | None = None
    flip: bool | None = None
    # Images of the training split held out as a validation set that replaces the test split in
    # every evaluation (0: evaluate on the test split). Settings are chosen with it, never on the
    # test set. With train_limit they come from the images the subset leaves out, so the training
    # images are the same as in the final run; otherwise they are carved out of the training split.
    val_size: int = 0
    # Fraction of the training split held out of training (stratified, fixed by subset_seed);
    # used only to fit the temperature of temperature scaling. 0: train on all of it, no TS.
    holdout: float = 0.0
    cutout: int = 0  # side of the Cutout square in pixels (paper Table 7: 16 on 32 px); 0: off
    mix: Literal["none", "mixup", "cutmix"] = "none"  # batch mixing with soft labels (Table 7)
    mix_alpha: float = 1.0  # the mixing ratio is drawn from Beta(mix_alpha, mix_alpha)
    mix_prob: float = 1.0  # share of batches that are mixed
    download: bool = False  # torchvision download where the dataset supports it
    # Image-file datasets: decode every file the run uses before it starts, leave out those that fail and list
    # them (in the log and in the run's summary). Off: a bad file stops the run when its batch comes up.
    skip_bad_files: bool = False

    def __post_init__(self) -> None:
        for key in ("batch_size", "eval_batch_size"):
            positive(f"data.{key}", getattr(self, key))
        for key in ("train_limit", "test_limit", "image_size"):
            positive_or_null(f"data.{key}", getattr(self, key))
        require(self.crop_padding is None or self.crop_padding >= 0, "data.crop_padding", self.crop_padding,
                "is the random crop's padding in pixels (0: no crop, null: the dataset's)")
        require(self.val_size >= 0, "data.val_size", self.val_size, "is a number of training images (0: off)")
        require(0 <= self.holdout < 1, "data.holdout", self.holdout, "is a fraction of the training split in [0, 1)")
        require(self.cutout >= 0, "data.cutout", self.cutout, "is a patch side in pixels (0: off)")
        require(self.mix_alpha > 0, "data.mix_alpha", self.mix_alpha, "must be positive (Beta distribution)")
        require(0 <= self.mix_prob <= 1, "data.mix_prob", self.mix_prob, "is a probability in [0, 1]")
        require(self.num_workers is None or self.num_workers >= 0, "data.num_workers", self.num_workers,
                "must be >= 0")
