"""Deterministic, DDP-aware batching of an in-memory dataset in the main process.

Training resumes bit-exactly after a crash at an epoch boundary only if an epoch's order and augmentation are a
function of (seed, epoch, rank) alone, so both come from generators created fresh in ``__iter__``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from micronet.data.augment import Augment
from micronet.data.dataset import ArrayDataset
from micronet.data.seeding import generator_for
from micronet.errors import ConfigError


class BatchLoader:
    """Iterates (x float32 normalized N×C×H×W, y int64) batches from an ArrayDataset, in the main process.

    Sharding follows ``DistributedSampler``: every rank draws the same permutation, pads it by wrap-around to a
    multiple of ``world_size`` and takes ``indices[rank::world_size]``, so all ranks see the same number of batches.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size} is invalid: use a batch size >= 1.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} with world size {world_size} is invalid: need world_size >= 1 and 0 <= rank < world_size.")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.epoch = 0
        info = dataset.info
        self._mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next ``__iter__`` reproduces."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (padded share of the dataset, before ``drop_last``)."""
        return math.ceil(len(self.dataset) / self.world_size)

    def __len__(self) -> int:
        """Number of batches for this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """The dataset indices this rank visits in the current epoch, in order."""
        n = len(self.dataset)
        if n == 0:
            return torch.zeros(0, dtype=torch.int64)
        if self.shuffle:
            order = torch.randperm(n, generator=generator_for(self.seed, self.epoch, "shuffle"))
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:
            repeats = math.ceil(total / n)
            order = order.repeat(repeats)[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        aug_gen = generator_for(self.seed, self.epoch, self.rank, "augment")
        for b in range(len(self)):
            batch = idx[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.dataset.images[batch].to(torch.float32).div_(255.0)
            if self.augment is not None:
                x = self.augment(x, aug_gen)
            x = (x - self._mean) / self._std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.dataset.labels[batch]
