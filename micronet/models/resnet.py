"""CIFAR ResNets (He et al. 2016, §4.2): ResNet-20 and ResNet-56 with BasicBlocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from micronet.base_module.op import Add
from micronet.models.layers import init_weights

__all__ = ["BasicBlock", "CifarResNet", "default_resnet_cfg", "resnet20", "resnet56"]


def default_resnet_cfg(n: int) -> tuple[int, ...]:
    """``[16, 32, 64] + [16]*n + [32]*n + [64]*n``: stage widths, then each block's inner width."""
    widths = (16, 32, 64)
    return widths + tuple(w for w in widths for _ in range(n))


class BasicBlock(nn.Module):
    """conv3×3(stride) → BN → ReLU → conv3×3 → BN, plus shortcut, then ``relu2(add(residual, shortcut))``.

    ``inner`` is the width between the two convs (prunable freely); ``out_channels`` is tied to the
    stage through the residual addition. The shortcut is conv1×1(stride) → BN (option B) when the
    stride is not 1 or the width changes, otherwise ``nn.Identity``.
    """

    def __init__(self, in_channels: int, inner: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(inner, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.add = Add()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.add(residual, self.shortcut(x)))


class CifarResNet(nn.Module):
    """CIFAR ResNet with 3 stages of ``n`` BasicBlocks (depth 6n + 2); returns raw logits.

    cfg layout (length 3 + 3n): ``[s0, s1, s2]`` the stage widths (every block output in stage k has
    width s_k; the stem has width s0, tied to stage 1 by the residual adds), then the inner width of
    every block in order (stage 1 blocks, stage 2 blocks, stage 3 blocks). Default
    ``[16, 32, 64] + [16]*n + [32]*n + [64]*n``; ResNet-20 is n=3 (length 12), ResNet-56 n=9 (length 30).

    Layers: ``conv1`` 3×3 (in→s0) → ``bn1`` → ``relu``; ``layer1..layer3`` (strides 1, 2, 2); ``avgpool``
    AdaptiveAvgPool2d(1) → ``flatten`` → ``fc`` Linear(s2→num_classes). All convs have bias=False.
    Initialisation: :func:`init_weights`.
    """

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3, cfg: Sequence[int] | None = None) -> None:
        super().__init__()
        c = list(cfg) if cfg is not None else list(default_resnet_cfg(n))
        stages, inner = c[:3], c[3:]
        self.conv1 = nn.Conv2d(in_channels, stages[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stages[0])
        self.relu = nn.ReLU()
        width = stages[0]
        for s, (out, stride) in enumerate(zip(stages, (1, 2, 2))):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(width, inner[s * n + b], out, stride if b == 0 else 1))
                width = out
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet20(num_classes: int = 10, in_channels: int = 3, cfg: Sequence[int] | None = None) -> CifarResNet:
    """ResNet-20 (n=3): cfg length 12."""
    return CifarResNet(3, num_classes, in_channels, cfg)


def resnet56(num_classes: int = 10, in_channels: int = 3, cfg: Sequence[int] | None = None) -> CifarResNet:
    """ResNet-56 (n=9): cfg length 30."""
    return CifarResNet(9, num_classes, in_channels, cfg)
