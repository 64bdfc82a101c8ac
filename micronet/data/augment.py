"""Batched, on-tensor training augmentation driven by an explicit generator.

Augmenting whole batches with tensor indexing is fast in the main process, and taking the generator as an
argument (never global RNG) makes each epoch's augmentation reproducible from (seed, epoch, rank).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from micronet.errors import ConfigError


def crop_with_padding(images: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Zero-pad N×C×H×W images by ``padding`` on each side and crop H×W back at per-sample offsets.

    ``top``/``left`` are int tensors of length N in 0..2*padding; offset (padding, padding) is the identity.
    """
    n, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    # Two gathers (rows, then columns) with broadcast index views: ~2.5× faster than one 4-D fancy index.
    rows = (top.to(dev)[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]  # N×1×H×1
    out = padded.gather(2, rows.expand(n, c, h, w + 2 * padding))
    cols = (left.to(dev)[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]  # N×1×1×W
    return out.gather(3, cols.expand(n, c, h, w))


class Augment:
    """Random crop with zero padding and/or horizontal flip (p = 0.5), applied per sample to a float batch."""

    def __init__(self, crop_padding: int = 0, hflip: bool = False) -> None:
        if not isinstance(crop_padding, int) or crop_padding < 0:
            raise ConfigError(f"crop padding {crop_padding!r} is invalid: use an int >= 0.")
        self.crop_padding = crop_padding
        self.hflip = bool(hflip)

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, hflip={self.hflip})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Augment) and (self.crop_padding, self.hflip) == (other.crop_padding, other.hflip)

    @property
    def is_identity(self) -> bool:
        """True when this augmentation changes nothing."""
        return self.crop_padding == 0 and not self.hflip

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment float N×C×H×W ``images``; draws crop offsets first, then flips, from ``generator``."""
        n = images.shape[0]
        out = images
        if self.crop_padding > 0:
            p = self.crop_padding
            top = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=generator.device)
            left = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=generator.device)
            out = crop_with_padding(out, p, top, left)
        if self.hflip:
            flip = torch.rand(n, generator=generator, device=generator.device) < 0.5
            out = torch.where(flip.to(out.device)[:, None, None, None], out.flip(-1), out)
        return out


def default_augment(name: str) -> Augment:
    """The standard training augmentation for a dataset: crop+flip for fashion-mnist and cifar10, none otherwise."""
    if name == "fashion-mnist":
        return Augment(crop_padding=2, hflip=True)
    if name == "cifar10":
        return Augment(crop_padding=4, hflip=True)
    return Augment()
