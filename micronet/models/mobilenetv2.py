"""MobileNetV2 (Sandler et al. 2018), CIFAR variant: stride-1 stem and stride 1 in the 24-channel stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from micronet.base_module.op import Add
from micronet.errors import ModelConfigError
from micronet.models.layers import ConvBNAct, init_weights

__all__ = ["InvertedResidual", "MobileNetV2", "SETTINGS", "DEFAULT_CFG", "check_cfg"]

# (expansion t, output channels c, blocks n, first stride s) per stage.
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM, LAST = 32, 1280
NUM_BLOCKS = sum(n for _, _, n, _ in SETTINGS)  # 17


def _default_cfg() -> tuple[int, ...]:
    hidden: list[int] = []
    width = STEM
    for t, c, n, _ in SETTINGS:
        for _ in range(n):
            hidden.append(width * t)
            width = c
    return (STEM, *(c for _, c, _, _ in SETTINGS), *hidden, LAST)


DEFAULT_CFG = _default_cfg()


def _blocks(cfg: Sequence[int]):
    """Yield (block index, in width, hidden width, out width, stride, expand?, residual?) per block."""
    stem, stages, hidden = cfg[0], cfg[1:8], cfg[8:8 + NUM_BLOCKS]
    width, k = stem, 0
    for (t, _, n, s), out in zip(SETTINGS, stages):
        for i in range(n):
            yield k, width, hidden[k], out, (s if i == 0 else 1), t != 1, i > 0
            width = out
            k += 1


def check_cfg(cfg: Sequence[int]) -> None:
    """A block without expansion (t = 1) runs its depthwise conv on its input, so its hidden width is its input width."""
    for k, width, hid, _, _, expand, _ in _blocks(cfg):
        if not expand and hid != width:
            raise ModelConfigError(
                f"cfg[{8 + k}] = {hid} for mobilenetv2 must equal the width feeding block {k} ({width}) because that "
                f"block has no expansion conv: set cfg[{8 + k}] = {width}")


class InvertedResidual(nn.Module):
    """[``expand`` 1×1 → BN → ReLU6] → ``depthwise`` 3×3(stride, groups=hidden) → BN → ReLU6 →
    ``project`` 1×1 → BN (linear), plus ``add(out, x)`` when ``residual``."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, stride: int, expand: bool,
                 residual: bool) -> None:
        super().__init__()
        self.expand = ConvBNAct(in_channels, hidden, 1, act="relu6") if expand else None
        self.depthwise = ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act="relu6")
        self.project = ConvBNAct(hidden, out_channels, 1, act=None)
        self.add = Add() if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(out))
        return self.add(out, x) if self.add is not None else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2; returns raw logits.

    Stem conv3×3 stride 1 → 32, 17 inverted-residual blocks with (t, c, n, s) = (1,16,1,1), (6,24,2,1),
    (6,32,3,2), (6,64,4,2), (6,96,3,1), (6,160,3,2), (6,320,1,1), then conv1×1 → 1280, AdaptiveAvgPool2d(1),
    flatten, Dropout(0.2) and Linear(→num_classes). All convs bias=False + BN + ReLU6 (the projection has no
    activation). Residual ``Add`` in every block except the first of each stage (those blocks always have
    stride 1 and equal in/out widths, whatever the cfg).

    cfg layout (length 26): ``[stem] + [7 stage output widths] + [17 block hidden widths] + [last width]``;
    cfg[8 + k] is the depthwise width of block k (input width × t by default). Block 0 has t = 1 and no
    expansion conv, so cfg[8] must equal cfg[0]. Default
    ``[32, 16, 24, 32, 64, 96, 160, 320, 32, 96, 144, 144, 192, 192, 192, 384, 384, 384, 384, 576, 576, 576,
    960, 960, 960, 1280]``. Initialisation: :func:`init_weights`.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, cfg: Sequence[int] | None = None) -> None:
        super().__init__()
        c = list(cfg) if cfg is not None else list(DEFAULT_CFG)
        check_cfg(c)
        layers: list[nn.Module] = [ConvBNAct(in_channels, c[0], 3, 1, act="relu6")]
        for _, width, hid, out, stride, expand, residual in _blocks(c):
            layers.append(InvertedResidual(width, hid, out, stride, expand, residual))
        layers.append(ConvBNAct(c[7], c[-1], 1, act="relu6"))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(c[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.avgpool(self.features(x)))
        return self.classifier(self.dropout(x))
