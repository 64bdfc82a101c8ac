"""In-memory datasets and the seeded subset / validation-split logic.

All datasets micronet trains on fit in memory as uint8 (Fashion-MNIST is 47 MB, CIFAR-10 150 MB), so a dataset
is just two tensors; that keeps batching vectorised and fully deterministic without worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from micronet.data.info import DatasetInfo
from micronet.data.seeding import generator_for
from micronet.errors import DatasetError


class ArrayDataset:
    """Images as a uint8 N×C×H×W tensor and labels as an int64 N tensor, plus the dataset's info."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise DatasetError(f"dataset {info.name!r} images must be a uint8 N×C×H×W tensor, got "
                               f"{_describe(images)}: convert them before wrapping.")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise DatasetError(f"dataset {info.name!r} labels must be a 1-D integer tensor, got "
                               f"{_describe(labels)}: convert them before wrapping.")
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(f"dataset {info.name!r} has {images.shape[0]} images but {labels.shape[0]} labels: "
                               f"give one label per image.")
        if images.shape[1] != info.in_channels or tuple(images.shape[2:]) != info.image_size:
            raise DatasetError(
                f"dataset {info.name!r} images are {tuple(images.shape[1:])} but its info says "
                f"{(info.in_channels, *info.image_size)}: make the info match the images."
            )
        labels = labels.to(torch.int64)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
            raise DatasetError(
                f"dataset {info.name!r} has labels in {int(labels.min())}..{int(labels.max())} but {info.num_classes} classes: "
                f"labels must lie in 0..{info.num_classes - 1}."
            )
        self.images = images
        self.labels = labels
        self.info = info

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return f"ArrayDataset({self.info.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])})"

    def subset(self, indices: torch.Tensor) -> ArrayDataset:
        """The samples at ``indices`` (in that order; a bool mask selects where True), sharing the info."""
        idx = torch.as_tensor(indices)
        idx = torch.nonzero(idx).flatten() if idx.dtype == torch.bool else idx.to(torch.int64)
        return ArrayDataset(self.images[idx], self.labels[idx], self.info)

    def class_counts(self) -> torch.Tensor:
        """Number of samples per class (length ``info.num_classes``)."""
        return torch.bincount(self.labels, minlength=self.info.num_classes)


@dataclass
class DatasetSplits:
    """Train (for fitting), val (for model selection) and the official test split (for the final report only)."""

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    info: DatasetInfo


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _class_interleaved_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A seeded permutation reordered so classes take turns: any prefix of it is (nearly) class-balanced.

    Sample i's key is its rank among its class in a random permutation; sorting by that key (stably, so the
    random order breaks ties) yields round-robin over the classes.
    """
    n = labels.shape[0]
    perm = torch.randperm(n, generator=generator)
    permuted = labels[perm]
    # Rank within class: position after a stable sort by label minus the start of that label's block.
    by_label = torch.sort(permuted, stable=True)
    counts = torch.bincount(permuted)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.int64)
    rank[by_label.indices] = torch.arange(n) - starts[by_label.values]
    order = torch.sort(rank, stable=True).indices
    return perm[order]


def balanced_subset(dataset: ArrayDataset, n: int, seed: int, salt: str) -> ArrayDataset:
    """The first ``n`` samples of a seeded, class-interleaved permutation (all samples if ``n >= len``)."""
    if n >= len(dataset):
        return dataset
    order = _class_interleaved_order(dataset.labels, generator_for(seed, salt))
    return dataset.subset(torch.sort(order[:n]).values)


def split_train_val(dataset: ArrayDataset, val_fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Split off ``round(val_fraction * n_c)`` seeded samples of every class c as validation (stratified)."""
    if val_fraction == 0 or len(dataset) == 0:
        return dataset, dataset.subset(torch.zeros(0, dtype=torch.int64))
    perm = torch.randperm(len(dataset), generator=generator_for(seed, "val-split"))
    is_val = torch.zeros(len(dataset), dtype=torch.bool)
    permuted_labels = dataset.labels[perm]
    for c in torch.unique(permuted_labels).tolist():
        members = perm[permuted_labels == c]
        is_val[members[: int(round(val_fraction * members.numel()))]] = True
    return dataset.subset(torch.nonzero(~is_val).flatten()), dataset.subset(torch.nonzero(is_val).flatten())


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 N×C×H×W images on the [0, 1] scale, accumulated in float64 chunks.

    Chunking keeps memory flat for large image folders; a constant channel gets std 1.0 so normalising never divides by 0.
    """
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].to(torch.float64) / 255.0
        total += block.sum(dim=(0, 2, 3))
        total_sq += (block * block).sum(dim=(0, 2, 3))
        count += block.shape[0] * block.shape[2] * block.shape[3]
    if count == 0:
        return tuple([0.0] * c), tuple([1.0] * c)
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())
