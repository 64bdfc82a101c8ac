"""LeNet as used by the original micronet's ``quant_test_manual``/``quant_test_auto`` (without the log_softmax)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from micronet.models.layers import init_weights

__all__ = ["LeNet", "DEFAULT_CFG"]

DEFAULT_CFG = (10, 20, 50)


class LeNet(nn.Module):
    """LeNet-5-style CNN for 28×28 (and 32×32) images; returns raw logits.

    cfg layout (length 3): ``[conv1 channels, conv2 channels, fc1 width]``, default ``[10, 20, 50]``.

    conv1 (in→c0, k5) → MaxPool2 → ReLU → conv2 (c0→c1, k5) → MaxPool2 → ReLU → AdaptiveAvgPool2d(4)
    → flatten → fc1 (16·c1→c2) → ReLU → Dropout(0.5) → fc2 (c2→num_classes).
    The adaptive pool is the identity on 28×28 inputs (4×4 maps already) and makes 32×32 inputs work.
    Convs keep their bias (no BatchNorm follows). Initialisation: :func:`init_weights`
    (conv kaiming-normal fan_out/relu, zero bias; Linear N(0, 0.01), zero bias).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, cfg: Sequence[int] | None = None) -> None:
        super().__init__()
        c0, c1, c2 = cfg if cfg is not None else DEFAULT_CFG
        self.conv1 = nn.Conv2d(in_channels, c0, kernel_size=5)
        self.pool1 = nn.MaxPool2d(2)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c0, c1, kernel_size=5)
        self.pool2 = nn.MaxPool2d(2)
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(4)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c1 * 16, c2)
        self.relu3 = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(c2, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.pool1(self.conv1(x)))
        x = self.relu2(self.pool2(self.conv2(x)))
        x = self.flatten(self.avgpool(x))
        x = self.dropout(self.relu3(self.fc1(x)))
        return self.fc2(x)
