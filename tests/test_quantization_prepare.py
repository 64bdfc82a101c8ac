"""prepare() on every registry model, BN folding through prepare, the original's API, checkpoints and CLI."""

import copy

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

POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)  # max pools stay float: see test_max_pools_are_not_quantized_by_default


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
    assert sum(report.count(t) for t in ("QuantAvgPool2d", "QuantAdaptiveAvgPool2d")) == pools
    assert report.count("QuantMaxPool2d") == 0
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


def test_resnet_add_quantizes_each_input_with_its_own_range():
    model = prepare(build_model("resnet20", 10, 1), default_scheme())
    adds = [m for m in model.modules() if type(m).__name__ == "QuantAdd"]
    assert len(adds) == 9 and all(len(list(a.children())) == 2 for a in adds)
    calibrate(model, [torch.randn(8, 1, 28, 28) for _ in range(2)])
    block = model.layer1[1]  # identity shortcut: the second summand is the previous block's ReLU output
    assert not block.add.second_input_quantizer.signed.item()  # unsigned codes, like the next conv's input
    assert block.add.input_quantizer.signed.item()  # the conv branch is signed
    a, b = torch.randn(2, 16, 7, 7), torch.rand(2, 16, 7, 7) * 3
    expected = block.add.input_quantizer(a) + block.add.second_input_quantizer(b)
    assert torch.equal(block.add(a, b), expected)


def test_schemes_written_before_per_input_add_quantizers_keep_one_shared_quantizer():
    data = default_scheme().to_json()
    del data["shared_add_quantizer"]
    old = type(default_scheme()).from_json(data)
    assert old.shared_add_quantizer
    model = prepare(build_model("resnet20", 10, 1), old)
    adds = [m for m in model.modules() if type(m).__name__ == "QuantAdd"]
    assert len(adds) == 9 and all(len(list(a.children())) == 1 and a.second_input_quantizer is None for a in adds)


def test_seed_api_builds_and_runs(capsys):
    manual = micronet.quant_test_manual()
    auto = micronet.quant_test_auto()
    out = capsys.readouterr().out
    assert out.count("quant_model is ready") == 2 and "micronet is ready" in out
    assert isinstance(manual.conv1, iao.QuantConv2d)
    report = auto.quantization_report
    assert (report.count("QuantConv2d"), report.count("QuantLinear"), report.count("QuantMaxPool2d")) == (2, 2, 0)


def test_max_pools_are_not_quantized_by_default():
    """Max commutes with a monotone quantizer, so a max pool's input quantizer only rounded twice; schemes
    written before ``quantize_max_pools`` existed (checkpoints) keep quantizing them."""
    from dataclasses import replace

    from micronet.compression.quantization.core.scheme import QuantScheme

    x = torch.randn(4, 1, 28, 28)
    model = prepare(build_model("nin", 10, 1), default_scheme())
    assert not any(type(m).__name__ == "QuantMaxPool2d" for m in model.modules())
    legacy = default_scheme().to_json()
    del legacy["quantize_max_pools"]
    old = QuantScheme.from_json(legacy)
    assert old.quantize_max_pools and not QuantScheme.from_json(default_scheme().to_json()).quantize_max_pools
    with_pools = prepare(build_model("nin", 10, 1), replace(default_scheme(), quantize_max_pools=True))
    assert sum(type(m).__name__ == "QuantMaxPool2d" for m in with_pools.modules()) == 2
    assert model(x).shape == with_pools(x).shape == (4, 10)


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


class _FunctionalResidual(nn.Module):
    """Functional ops everywhere: prepare must reach them through the fx pass."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = torch.nn.functional.relu(self.conv1(x))
        z = self.conv2(y) + y
        z = torch.cat([z, y], dim=1)
        z = torch.nn.functional.adaptive_avg_pool2d(z, 1)
        return self.fc(torch.flatten(z, 1))


class _Untraceable(_FunctionalResidual):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow defeats torch.fx
            x = x * 2
        return super().forward(x)


def test_functional_ops_are_quantized_through_the_fx_pass():
    torch.manual_seed(0)
    float_model = _FunctionalResidual()
    model = prepare(float_model, default_scheme())
    report = model.quantization_report
    assert report.traced
    assert report.count("QuantAdd") == 1 and report.count("QuantConcat") == 1
    assert report.count("QuantAdaptiveAvgPool2d") == 1 and report.count("QuantConv2d") == 2
    model.train()
    x = torch.randn(4, 1, 8, 8)
    model(x).sum().backward()
    model.eval()
    # fake-quant output stays close to the float model's (8 bits, one observed batch)
    assert (model(x) - float_model(x)).abs().max().item() < 0.05


def test_untraceable_models_are_still_quantized_by_module_swapping():
    model = prepare(_Untraceable(), default_scheme())
    report = model.quantization_report
    assert not report.traced and "control flow" in report.trace_error
    assert report.count("QuantConv2d") == 2 and report.count("QuantLinear") == 1
    assert "could not trace" in report.summary()
    model.train()
    model(torch.randn(2, 1, 8, 8)).sum().backward()


def test_conv_transpose_and_conv1d_are_quantized():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Unflatten(1, (4, 2, 3)),
                          nn.ConvTranspose2d(4, 6, 2, stride=2))
    q = prepare(model, default_scheme())
    assert type(q[0]).__name__ == "QuantConv1d" and type(q[4]).__name__ == "QuantConvTranspose2d"
    assert q[4].weight_quantizer.ch_axis == 1 and q[4].weight_quantizer.scale.shape == (6,)
    q.train()
    out = q(torch.randn(3, 2, 8))
    out.sum().backward()
    assert out.shape == (3, 6, 4, 6) and q[4].weight.grad is not None


def test_nan_activations_during_calibration_are_an_error():
    from micronet.errors import QuantizationError

    model = prepare(build_model("lenet", 10, 1), default_scheme())
    bad = torch.randn(2, 1, 28, 28)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(QuantizationError, match="NaN"):
        calibrate(model, [bad])


def test_cli_ptq_equals_the_python_flow(tmp_path, capsys):
    """`micronet quantize iao --ptq` and prepare(ptq=True) + calibrate on the same batches give the same model."""
    from micronet.cli import main
    from micronet.data import BatchLoader, load_dataset
    from micronet.engine import load_checkpoint

    run = tmp_path / "lenet"
    assert main(["train", "--model", "lenet", "--data", "synthetic", "--epochs", "3", "--batch-size", "32",
                 "--out", str(run), "--no-progress"]) == 0
    assert main(["quantize", "iao", "--checkpoint", str(run), "--ptq", "--ptq_batch", "5", "--batch-size", "32",
                 "--percentile", "0.999", "--out", str(tmp_path / "ptq")]) == 0
    assert "PTQ iao-w7a8-sym-per-channel-ptq: 5 calibration batches"  # the portable target's 7-bit weights in capsys.readouterr().out
    cli_model = load_model(tmp_path / "ptq")
    splits = load_dataset("synthetic", val_fraction=0.1, seed=0)
    python_model = iao.prepare(load_model(run), ptq=True, percentile=0.999, pretrained_model=True)
    calibrate(python_model, BatchLoader(splits.train, 32, shuffle=True, seed=0), num_batches=5)
    a, b = cli_model.state_dict(), python_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = load_checkpoint(tmp_path / "ptq" / "best").metrics
    assert metrics["calibration_batches"] == 5 and metrics["float_test_acc"] >= 0.9
    assert metrics["float_test_acc"] - metrics["test_acc"] <= 0.02


def test_qat_run_resumes_as_a_quantized_model(tmp_path, capsys):
    from micronet.cli import main

    run = tmp_path / "lenet"
    assert main(["train", "--model", "lenet", "--data", "synthetic", "--epochs", "3", "--batch-size", "32",
                 "--out", str(run), "--no-progress"]) == 0
    qat = tmp_path / "qat"
    assert main(["quantize", "iao", "--checkpoint", str(run), "--bn_fuse", "--w_bits", "6", "--epochs", "1", "--batch-size", "32",
                 "--out", str(qat), "--no-progress"]) == 0
    assert main(["quantize", "iao", "--resume", str(qat), "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resumed at epoch 1/2" in out
    model = load_model(qat)
    assert int(model.conv1.weight_quantizer.bits) == 6 and model.quant_scheme.weight.bits == 6


def test_resumed_qat_keeps_its_freeze_bn_epoch(tmp_path, capsys, cli_fails):
    """--freeze-bn-after is saved with the run: a resume without the flag still freezes at that epoch."""
    from micronet.cli import main

    run = tmp_path / "nin"
    assert main(["train", "--model", "nin", "--cfg", "8,8,8,8,8,8,8,8", "--data", "synthetic", "--epochs", "1",
                 "--batch-size", "32",
                 "--out", str(run), "--no-progress"]) == 0
    qat = tmp_path / "qat"
    assert main(["quantize", "iao", "--checkpoint", str(run), "--bn_fuse", "--freeze-bn-after", "1", "--epochs", "1",
                 "--batch-size", "32", "--out", str(qat), "--no-progress"]) == 0
    assert "statistics frozen" not in capsys.readouterr().out
    cli_fails(["quantize", "iao", "--resume", str(qat), "--epochs", "2", "--freeze-bn-after", "0"],
              "started with --freeze-bn-after 1")
    assert main(["quantize", "iao", "--resume", str(qat), "--epochs", "2", "--no-progress"]) == 0
    assert "epoch 2: BatchNorm statistics frozen in the folded convolutions" in capsys.readouterr().out
    model = load_model(qat / "last")
    frozen = [m.freeze_bn_stats.item() for m in model.modules() if hasattr(m, "freeze_bn_stats")]
    assert frozen and all(frozen)


def test_iao_quant_inference_uses_the_stored_weights(tmp_path):
    """The original's quant_inference=True: layers use their weights as stored (already quantized ones, say), inputs
    are still quantized; the switch survives a checkpoint."""
    torch.manual_seed(0)
    float_model = build_model("lenet", 10, 1)
    model = iao.prepare(float_model, ptq=True, quant_inference=True)
    assert all(not q.enabled.item() for name, q in quantizers(model) if name.endswith("weight_quantizer"))
    assert all(q.enabled.item() for name, q in quantizers(model) if name.endswith("input_quantizer"))
    x = torch.randn(8, 1, 28, 28)
    calibrate(model, [x])
    conv = model.conv1 if hasattr(model, "conv1") else next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    inputs = torch.randn(2, conv.in_channels, 12, 12)
    expected = torch.nn.functional.conv2d(conv.input_quantizer(inputs), conv.weight, conv.integer_bias(conv.bias),
                                          conv.stride, conv.padding, conv.dilation, conv.groups)
    assert torch.equal(conv(inputs), expected)
    save_checkpoint(tmp_path / "q", model)
    again = load_model(tmp_path / "q").eval()
    assert torch.equal(again(x), model.eval()(x))
    layer = iao.QuantConv2d(3, 4, 3, quant_inference=True)
    assert not layer.weight_quantizer.enabled.item() and layer.input_quantizer.enabled.item()


def _weight_overshoot(model):
    """Largest |W| / (scale · q_max) over the channels of every quantized weight (> 1: the top codes clip)."""
    from micronet.compression.quantization.core.modules import WeightedQuantizedModule

    worst = 0.0
    for module in model.modules():
        if isinstance(module, WeightedQuantizedModule) and module.weight_quantizer.enabled.item():
            q = module.weight_quantizer
            weight = module.folded_weight_and_bias()[0] if hasattr(module, "folded_weight_and_bias") else module.weight
            peak = weight.detach().abs().flatten(1).amax(1)
            worst = max(worst, float((peak / (q.scale * q.quant_min_max[1])).max()))
    return worst


@pytest.mark.parametrize("bn_fuse", [False, True])
def test_weight_scales_fit_the_weights_after_the_last_optimizer_step(bn_fuse):
    """Observers see the weights in the forward, the optimizer moves them after: leaving training (eval, freeze,
    convert) re-observes them, so the scales used in eval and export fit the current weights and nothing clips."""
    from micronet.compression.quantization.core import convert

    torch.manual_seed(0)
    model = iao.prepare(build_model("nin", 10, 1, cfg=[8] * 8), bn_fuse=bn_fuse)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    assert _weight_overshoot(model) == pytest.approx(1.0, abs=1e-5)  # the largest weight is exactly the top code
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # eval itself observes nothing
    model.train()
    optimizer.step()  # weights move again after the last observation
    frozen = freeze(model)
    assert _weight_overshoot(frozen) == pytest.approx(1.0, abs=1e-5)
    model.train()
    optimizer.step()
    converted = convert(model)  # a copy, folded and frozen: its weights are the codes the scales give
    reference = convert(freeze(copy.deepcopy(model)))
    for got, want in zip(converted.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(got, want)
