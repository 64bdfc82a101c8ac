"""A binary-friendly NIN: every conv inside a real-valued shortcut (Bi-Real Net), a learned threshold before
each activation (ReActNet's RSign), max pooling on the real-valued stream.

Binarizing the plain NIN puts a sign after every block, so each layer sees only the ±1 output of the one
before it and the network forgets everything the signs drop. Here the blocks are residual in
pre-activation order, ``x + BN(conv(act(x + t)))``: the sum ``x`` stays real-valued from the first conv to
the last, each binary conv reads its sign, and its output is added back to it (Liu et al. 2018, Bi-Real
Net). In float training ``act`` is a ReLU; the wbwtab preset replaces it with the sign, which gives binary
activations everywhere but the real stream. ``t`` (:class:`ChannelBias`) is each sign's learned per-channel
threshold: the input of a sign is a sum, not a BatchNorm output, so no BatchNorm shift can play that role
(Liu et al. 2020, ReActNet). On the default pipeline's budget this variant of the demo NIN binarizes with
about 7 points less loss than the plain NIN at a few percent fewer MACs (README, low-bit section).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from micronet.base_module.op import Add
from micronet.errors import ModelConfigError
from micronet.models.layers import ChannelBias, ChannelRepeat, init_weights

__all__ = ["BiRealBlock", "BiRealNIN", "DEFAULT_CFG", "check_cfg"]

DEFAULT_CFG = (128, 128, 128, 128, 128, 128, 256, 256)

# One row per conv: kernel size, MaxPool(3, 2, 1) after it? Conv i maps cfg[i-1] → cfg[i] (conv 0 reads the
# image, conv 8 writes the class scores), as in NIN.
LAYERS: tuple[tuple[int, bool], ...] = ((5, False), (1, False), (1, True), (5, False), (1, False), (1, True),
                                        (3, False), (1, False), (1, False))


def check_cfg(cfg: Sequence[int]) -> None:
    """No block may be narrower than the one before it: its shortcut carries every input channel."""
    for i in range(1, len(cfg)):
        if cfg[i] < cfg[i - 1]:
            raise ModelConfigError(
                f"cfg[{i}] = {cfg[i]} for nin_bireal is narrower than cfg[{i - 1}] = {cfg[i - 1]}: the shortcut around "
                f"conv {i} carries every input channel, so widths may only stay or grow (use e.g. {cfg[i - 1]})")


class BiRealBlock(nn.Module):
    """``x + BN(conv(act(x + t)))``: ``threshold`` (t), ``act`` (ReLU; a sign once binarized), ``conv``, ``bn``,
    ``shortcut`` (Identity, or :class:`ChannelRepeat` when the conv widens), ``add``. Without ``shortcut``
    (the classifier) the block returns ``BN(conv(act(x + t)))``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, shortcut: bool = True) -> None:
        super().__init__()
        self.threshold = ChannelBias(in_channels)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, 1, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        if shortcut:
            self.shortcut: nn.Module | None = (nn.Identity() if out_channels == in_channels
                                               else ChannelRepeat(in_channels, out_channels))
            self.add: Add | None = Add()
        else:
            self.shortcut = self.add = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(self.act(self.threshold(x))))
        if self.add is None or self.shortcut is None:
            return y
        return self.add(y, self.shortcut(x))


class BiRealNIN(nn.Module):
    """NIN's convs and pools (:class:`~micronet.models.nin.NIN`, same cfg layout) as Bi-Real blocks.

    ``features``: 0 conv(in→c0, k5) → BN (the stem: no activation, its output starts the real stream),
    1 block(c0→c1, k1), 2 block(c1→c2, k1), 3 MaxPool(3, 2, 1), 4 block(c2→c3, k5), 5 block(c3→c4, k1),
    6 block(c4→c5, k1), 7 MaxPool(3, 2, 1), 8 block(c5→c6, k3), 9 block(c6→c7, k1), 10 the classifier
    block(c7→num_classes, k1, no shortcut); then ``avgpool`` and ``flatten``. No cfg entry may be smaller
    than the one before it; default ``[128]*6 + [256]*2`` (≈ 180 M MACs on 32×32, NIN's
    default ≈ 223 M). The pipeline's binary row uses ``[48]*6 + [128]*2``: 29.0 M MACs against the demo NIN's
    30.7 M.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, cfg: Sequence[int] | None = None) -> None:
        super().__init__()
        c = list(cfg) if cfg is not None else list(DEFAULT_CFG)
        check_cfg(c)
        stem = nn.Sequential(nn.Conv2d(in_channels, c[0], 5, 1, 2, bias=False), nn.BatchNorm2d(c[0]))
        blocks: list[nn.Module] = [stem]
        for i, (kernel, pool) in enumerate(LAYERS[1:], start=1):
            last = i == len(LAYERS) - 1
            blocks.append(BiRealBlock(c[i - 1], num_classes if last else c[i], kernel, shortcut=not last))
            if pool:
                blocks.append(nn.MaxPool2d(3, 2, 1))
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.avgpool(self.features(x)))
