"""The original micronet's self-checks: quantize its LeNet by hand and with ``prepare``.

``quant_test_manual()`` builds LeNet with quantized layers written into the class; ``quant_test_auto()``
quantizes the float LeNet with ``prepare``. Unlike the original, both also run a training step and an
evaluation forward pass, so "ready" means the quantized model really computes. ``method`` picks the
preset: ``"iao"`` (the original's check), ``"dorefa"`` (4-bit) or ``"wbwtab"`` (binary weights and
activations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from micronet.compression.quantization.core.lowbit import SignActivation
from micronet.compression.quantization.wbwtab import quantize as wbwtab
from micronet.compression.quantization.wqaq.dorefa import quantize as dorefa
from micronet.compression.quantization.wqaq.iao import quantize as iao
from micronet.errors import QuantizationError

METHODS = ("iao", "dorefa", "wbwtab")


class LeNet(nn.Module):
    """The original's example network (1×28×28 input, log-probabilities out)."""

    def __init__(self, conv=nn.Conv2d, linear=nn.Linear, pool=nn.MaxPool2d, act=nn.ReLU) -> None:
        super().__init__()
        self.conv1 = conv(1, 10, kernel_size=5)
        self.conv2 = conv(10, 20, kernel_size=5)
        self.fc1 = linear(320, 50)
        self.fc2 = linear(50, 10)
        self.max_pool = pool(kernel_size=2)
        self.relu = act()

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


def _check(method: str) -> None:
    if method not in METHODS:
        raise QuantizationError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")


def _report(quantized: nn.Module, method: str) -> nn.Module:
    print("***ori_model***")
    print(LeNet())
    print(f"***quant_model_{method}***")
    print(quantized)
    _exercise(quantized)
    print("quant_model is ready")
    print("micronet is ready")
    return quantized


def quant_test_manual(method: str = "iao") -> nn.Module:
    _check(method)
    if method == "dorefa":
        model = LeNet(conv=lambda *a, **k: dorefa.QuantConv2d(*a, a_bits=4, w_bits=4, **k),
                      linear=lambda *a, **k: dorefa.QuantLinear(*a, a_bits=4, w_bits=4, **k))
    elif method == "wbwtab":
        model = LeNet(conv=wbwtab.QuantConv2d, linear=wbwtab.QuantLinear, act=SignActivation)
    else:
        model = LeNet(conv=iao.QuantConv2d, linear=iao.QuantLinear, pool=iao.QuantMaxPool2d)
    return _report(model, method)


def quant_test_auto(method: str = "iao") -> nn.Module:
    _check(method)
    if method == "dorefa":
        model = dorefa.prepare(LeNet(), inplace=False, a_bits=4, w_bits=4)
    elif method == "wbwtab":
        model = wbwtab.prepare(LeNet(), inplace=False, A=2, W=2)
    else:
        model = iao.prepare(LeNet(), inplace=False, a_bits=8, w_bits=8, q_type=0, q_level=0, weight_observer=0,
                            bn_fuse=False, bn_fuse_calib=False, pretrained_model=False, qaft=False, ptq=False,
                            percentile=0.9999)
    return _report(model, method)
