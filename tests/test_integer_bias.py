"""Eval-mode fake-quant layers add the int32 bias the deployed model adds (core.integer_bias).

The checks compare against what the ONNX export writes (the int32 bias codes and their scale), against the
plain formula, and against ONNX Runtime on a small conv → BN → ReLU network."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from micronet.compression.quantization.core import calibrate
from micronet.compression.quantization.core.integer_bias import IntegerBiasBatchNorm2d, integer_bias_grid
from micronet.compression.quantization.core.quantizers import CALIBRATE
from micronet.compression.quantization.wqaq.iao import quantize as iao
from micronet.deploy.onnx import GraphView, export


class ConvBN(nn.Module):
    """A conv with its own bias, a conv → BN pair (BN with non-trivial statistics) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1, bias=True)
        self.relu1 = nn.ReLU()
        self.conv = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.bn(self.conv(self.relu1(self.stem(x)))))
        return self.head(x.flatten(1))


def _prepared(**options) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = ConvBN()
    with torch.no_grad():
        model.stem.bias.uniform_(-0.3, 0.3)
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(64, 1, 8, 8)
    prepared = iao.prepare(model.eval(), a_bits=8, w_bits=8, **options)
    calibrate(prepared, [x[:32]])
    return prepared.eval(), x


def _bias_initializers(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per Conv/Gemm node: its int32 bias codes and their scale, as the ONNX file holds them."""
    view = GraphView(onnx.load(str(path)))
    found = {}
    for node in view.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            dq = view.producer[node.input[2]]
            assert dq.op_type == "DequantizeLinear"
            found[node.name] = (view.constant(dq.input[0]), view.constant(dq.input[1]))
    return found


def test_eval_adds_the_int32_bias_the_export_writes(tmp_path):
    model, x = _prepared()
    stem = model.stem
    grid = integer_bias_grid(stem.input_quantizer, stem.weight_quantizer)
    codes = torch.round(stem.bias.detach().double() / grid.double())
    rounded = (codes * grid.double()).float()
    assert not torch.equal(rounded, stem.bias.detach())  # the rounding is real, not a no-op
    with torch.no_grad():
        want = torch.nn.functional.conv2d(stem.input_quantizer(x), stem.quantized_weight(), rounded, padding=1)
        assert torch.equal(stem(x), want)
    stem.train()
    assert stem.integer_bias(stem.bias) is stem.bias  # training adds the float bias
    stem.eval()
    mode = int(stem.input_quantizer.mode.item())
    stem.input_quantizer.set_mode(CALIBRATE)
    assert stem.integer_bias(stem.bias) is stem.bias  # calibrating: the scales are not final yet
    stem.input_quantizer.set_mode(mode)

    report = export(model, tmp_path / "m.onnx", x[:1], exporter="legacy")
    biases = _bias_initializers(report.path)
    stem_codes, stem_scale = next(value for name, value in biases.items() if "stem" in name)
    assert stem_codes.dtype == np.int32 and np.array_equal(stem_codes, codes.numpy().astype(np.int32))
    assert np.array_equal(stem_scale, grid.numpy())


def test_unfolded_batchnorm_adds_the_folded_int32_bias(tmp_path):
    model, x = _prepared()
    assert type(model.bn) is IntegerBiasBatchNorm2d
    assert not any("_conv" in key for key in model.state_dict())  # the conv is referenced, not registered
    copied = copy.deepcopy(model)
    assert copied.bn._conv is copied.conv  # a copy reads its own conv
    report = export(model, tmp_path / "m.onnx", x[:1], exporter="legacy")
    codes, scale = next(value for name, value in _bias_initializers(report.path).items() if "conv" in name
                        and "stem" not in name)
    with torch.no_grad():  # BN(0) in eval is exactly the exported bias: DequantizeLinear(codes, scale)
        shift = model.bn(torch.zeros(1, 8, 1, 1)).reshape(-1).numpy()
    assert np.allclose(shift, codes.astype(np.float64) * scale, rtol=2**-23, atol=0)
    plain = nn.BatchNorm2d(8).eval()
    plain.load_state_dict(model.bn.state_dict())
    with torch.no_grad():
        assert not np.allclose(plain(torch.zeros(1, 8, 1, 1)).reshape(-1).numpy(), shift, rtol=1e-6, atol=0)
        model.bn.train()
        y = torch.randn(16, 8, 4, 4)
        plain.train()
        assert torch.equal(model.bn(y), plain(y))  # training is nn.BatchNorm2d's (running statistics too)
        assert torch.equal(model.bn.running_mean, plain.running_mean)


@pytest.mark.parametrize("bn_fuse", [False, True])
def test_fake_quant_equals_onnxruntime_codes(tmp_path, bn_fuse):
    """The whole network: with the int32 biases in eval, fake-quant and ONNX Runtime's int8 kernels differ
    only by float rounding (measured: max 2e-6, top-1 identical)."""
    model, x = _prepared(bn_fuse=bn_fuse, pretrained_model=bn_fuse)
    report = export(model, tmp_path / "m.onnx", x[:1], exporter="legacy")
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    step = np.abs(want).max() / 127
    assert np.abs(got - want).max() <= 0.05 * step, np.abs(got - want).max() / step
    assert (got.argmax(1) == want.argmax(1)).all()
