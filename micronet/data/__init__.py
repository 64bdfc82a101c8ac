"""Datasets, splits, augmentation and deterministic batching for micronet.

Everything is held in memory as uint8 tensors and batched in the main process, so runs are reproducible from
(seed, epoch, rank) alone and need no worker processes.
"""

from micronet.data.augment import Augment, crop_with_padding, default_augment
from micronet.data.dataset import ArrayDataset, DatasetSplits
from micronet.data.info import DatasetInfo
from micronet.data.loader import BatchLoader
from micronet.data.registry import list_datasets, load_dataset, register_dataset

__all__ = [
    "ArrayDataset",
    "Augment",
    "BatchLoader",
    "DatasetInfo",
    "DatasetSplits",
    "crop_with_padding",
    "default_augment",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]
