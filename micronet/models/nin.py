"""Network in Network, the original micronet's ``nin.Net``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from micronet.models.layers import ConvBNReLU, init_weights

__all__ = ["NIN", "Net", "DEFAULT_CFG"]

DEFAULT_CFG = (192, 160, 96, 192, 192, 192, 192, 192)


class NIN(nn.Module):
    """NIN with BatchNorm; returns the original micronet's logits (after the last BN and ReLU, so they are ≥ 0).

    cfg layout (length 8): the output channels ``c0..c7`` of the first eight conv blocks, default
    ``[192, 160, 96, 192, 192, 192, 192, 192]``. Layers (each CBR = conv → BN → ReLU, conv bias=False
    because the BN after it makes a bias redundant; the original had bias=True):

    ``features``: 0 CBR(in→c0, k5 p2), 1 CBR(c0→c1, k1), 2 CBR(c1→c2, k1), 3 MaxPool(3, 2, 1),
    4 CBR(c2→c3, k5 p2), 5 CBR(c3→c4, k1), 6 CBR(c4→c5, k1), 7 MaxPool(3, 2, 1),
    8 CBR(c5→c6, k3 p1), 9 CBR(c6→c7, k1), 10 CBR(c7→num_classes, k1);
    then ``avgpool`` AdaptiveAvgPool2d(1) (the original micronet's AvgPool(8) on 32×32) and ``flatten``.

    Like the original micronet, the last block applies BN and ReLU to the class scores. Initialisation:
    :func:`init_weights`.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, cfg: Sequence[int] | None = None) -> None:
        super().__init__()
        c = list(cfg) if cfg is not None else list(DEFAULT_CFG)
        self.features = nn.Sequential(
            ConvBNReLU(in_channels, c[0], 5, padding=2),
            ConvBNReLU(c[0], c[1], 1),
            ConvBNReLU(c[1], c[2], 1),
            nn.MaxPool2d(3, 2, 1),
            ConvBNReLU(c[2], c[3], 5, padding=2),
            ConvBNReLU(c[3], c[4], 1),
            ConvBNReLU(c[4], c[5], 1),
            nn.MaxPool2d(3, 2, 1),
            ConvBNReLU(c[5], c[6], 3, padding=1),
            ConvBNReLU(c[6], c[7], 1),
            ConvBNReLU(c[7], num_classes, 1),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.avgpool(self.features(x)))


def Net(cfg: Sequence[int] | None = None) -> nn.Module:  # noqa: N802 - the original micronet's name
    """The original micronet's ``nin.Net(cfg=None)``: ``build_model("nin", 10, 3, cfg)``."""
    from micronet.models.registry import build_model

    return build_model("nin", cfg=cfg)
