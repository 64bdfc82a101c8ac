"""The original micronet's self-checks: quantize its LeNet by hand and with ``prepare``.

``quant_test_manual()`` builds LeNet with quantized layers written into the class; ``quant_test_auto()``
quantizes the float LeNet with ``prepare``. Unlike the original, both also run a training step and an
evaluation forward pass, so "ready" means the quantized model really computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from micronet.compression.quantization.wqaq.iao import quantize as iao


class LeNet(nn.Module):
    """The original's example network (1×28×28 input, log-probabilities out)."""

    def __init__(self, conv=nn.Conv2d, linear=nn.Linear, pool=nn.MaxPool2d) -> None:
        super().__init__()
        self.conv1 = conv(1, 10, kernel_size=5)
        self.conv2 = conv(10, 20, kernel_size=5)
        self.fc1 = linear(320, 50)
        self.fc2 = linear(50, 10)
        self.max_pool = pool(kernel_size=2)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.max_pool(self.conv1(x)))
        x = self.relu(self.max_pool(self.conv2(x)))
        x = x.view(-1, 320)
        x = self.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


def _exercise(model: nn.Module) -> None:
    """One QAT step (observers see data) and one eval forward; raises if anything is broken."""
    x = torch.randn(8, 1, 28, 28)
    model.train()
    model(x).sum().backward()
    model.eval()
    out = model(x)
    if out.shape != (8, 10) or not torch.isfinite(out).all():
        raise RuntimeError("the quantized LeNet produced a wrong output")


def _report(quantized: nn.Module) -> nn.Module:
    print("***ori_model***")
    print(LeNet())
    print("***quant_model_iao***")
    print(quantized)
    _exercise(quantized)
    print("quant_model is ready")
    print("micronet is ready")
    return quantized


def quant_test_manual() -> nn.Module:
    return _report(LeNet(conv=iao.QuantConv2d, linear=iao.QuantLinear, pool=iao.QuantMaxPool2d))


def quant_test_auto() -> nn.Module:
    return _report(iao.prepare(LeNet(), inplace=False, a_bits=8, w_bits=8, q_type=0, q_level=0, weight_observer=0,
                               bn_fuse=False, bn_fuse_calib=False, pretrained_model=False, qaft=False, ptq=False,
                               percentile=0.9999))
