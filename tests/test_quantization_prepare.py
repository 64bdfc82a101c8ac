"""prepare() on every registry model, BN folding through prepare, the original's API, checkpoints and CLI."""

import pytest
import torch
from torch import nn

import micronet
from micronet.base_module.op import Add
from micronet.compression.quantization.core import calibrate, freeze, prepare, quantizers
from micronet.compression.quantization.core.modules import default_scheme
from micronet.compression.quantization.wqaq.iao import quantize as iao
from micronet.engine import load_model, save_checkpoint
from micronet.models import build_model, list_models

POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def _count(model, types):
    return sum(1 for m in model.modules() if type(m) in (types if isinstance(types, tuple) else (types,)))


@pytest.mark.parametrize("name", list_models())
def test_prepare_quantizes_every_layer_of_every_registry_model(name):
    torch.manual_seed(0)
    float_model = build_model(name, num_classes=10, in_channels=1)
    convs, linears, adds = _count(float_model, nn.Conv2d), _count(float_model, nn.Linear), _count(float_model, Add)
    pools = _count(float_model, POOLS)
    model = prepare(float_model, default_scheme())
    report = model.quantization_report
    assert report.count("QuantConv2d") == convs > 0
    assert report.count("QuantLinear") == linears
    assert report.count("QuantAdd") == adds
    assert sum(report.count(t) for t in ("QuantMaxPool2d", "QuantAvgPool2d", "QuantAdaptiveAvgPool2d")) == pools
    assert _count(model, nn.Conv2d) == 0  # exact type: nothing left in float
    assert not report.unsupported
    x = torch.randn(4, 1, 28, 28)
    model.train()
    out = model(x)
    out.sum().backward()
    assert out.shape == (4, 10)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", ["nin", "resnet20", "mobilenetv2"])
def test_bn_folding_through_prepare(name):
    torch.manual_seed(0)
    float_model = build_model(name, num_classes=10, in_channels=1)
    bns = _count(float_model, nn.BatchNorm2d)
    model = iao.prepare(float_model, bn_fuse=True)
    assert len(model.quantization_report.folded_bn) == bns  # every BN in these models follows a conv
    assert _count(model, nn.BatchNorm2d) == 0
    model.train()
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    model.eval()
    assert torch.isfinite(model(torch.randn(2, 1, 28, 28))).all()


def test_resnet_add_quantizes_both_inputs_with_one_scale():
    model = prepare(build_model("resnet20", 10, 1), default_scheme())
    adds = [m for m in model.modules() if type(m).__name__ == "QuantAdd"]
    assert len(adds) == 9 and all(len(list(a.children())) == 1 for a in adds)


def test_seed_api_builds_and_runs(capsys):
    manual = micronet.quant_test_manual()
    auto = micronet.quant_test_auto()
    out = capsys.readouterr().out
    assert out.count("quant_model is ready") == 2 and "micronet is ready" in out
    assert isinstance(manual.conv1, iao.QuantConv2d)
    report = auto.quantization_report
    assert (report.count("QuantConv2d"), report.count("QuantLinear"), report.count("QuantMaxPool2d")) == (2, 2, 1)


def test_seed_constructor_keywords():
    conv = iao.QuantConv2d(3, 8, 3, padding=1, a_bits=4, w_bits=6, q_type=1, q_level=1)
    assert int(conv.weight_quantizer.bits) == 6 and int(conv.input_quantizer.bits) == 4
    assert conv.weight_quantizer.ch_axis is None and not conv.weight_quantizer.symmetric
    frozen = iao.QuantLinear(4, 2, qaft=True)
    assert all(int(q.mode) == 2 for q in frozen.quantizers().values())


def test_quantized_checkpoint_reloads_with_its_state(tmp_path):
    torch.manual_seed(0)
    model = iao.prepare(build_model("resnet20", 10, 1), ptq=True, q_type=1)
    calibrate(model, [torch.randn(8, 1, 28, 28) for _ in range(3)])
    save_checkpoint(tmp_path / "q", model)
    again = load_model(tmp_path / "q")
    x = torch.randn(4, 1, 28, 28)
    model.eval(), again.eval()
    assert torch.equal(model(x), again(x))
    assert all(int(q.mode) == 2 for _, q in quantizers(again))  # still frozen after reload
    assert again.quant_scheme == model.quant_scheme


def test_qaft_freezes_after_prepare_and_weights_still_train():
    model = iao.prepare(build_model("lenet", 10, 1))
    model.train()
    model(torch.randn(8, 1, 28, 28))
    freeze(model)
    scales = [q.scale.clone() for _, q in quantizers(model)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.fc1.weight.clone()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 1, 28, 28) * 3).sum().backward()
        opt.step()
    assert all(torch.equal(a, q.scale) for a, (_, q) in zip(scales, quantizers(model)))
    assert not torch.equal(before, model.fc1.weight)
