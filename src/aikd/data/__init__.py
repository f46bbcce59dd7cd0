"""Datasets, augmentation and loaders; every batch is (images, labels, dataset indices)."""

from aikd.data.loaders import DataBundle, EpochBatchSampler, load_data
from aikd.data.readers import DATASETS
from aikd.data.splits import ArraySplit, FileSplit, stratified_indices

__all__ = ["DATASETS", "ArraySplit", "DataBundle", "EpochBatchSampler", "FileSplit", "load_data",
           "stratified_indices"]
