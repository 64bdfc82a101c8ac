"""DoReFa and WbWtAb presets: prepare() on every registry model, the original's API, ConvTranspose2d,
checkpoint round trips, old schemes, and the command line."""

import pytest
import torch
from torch import nn

from micronet.cli import main
from micronet.compression.quantization.core import QuantScheme, quantizers
from micronet.compression.quantization.core.lowbit import (
    BinaryWeightQuantizer,
    DoReFaActivationQuantizer,
    FloatQuantizer,
    SignActivation,
    TernaryWeightQuantizer,
)
from micronet.compression.quantization.core.modules import default_scheme
from micronet.compression.quantization.wbwtab import quantize as wbwtab
from micronet.compression.quantization.wqaq.dorefa import quantize as dorefa
from micronet.engine import load_model, save_checkpoint
from micronet.errors import QuantizationError
from micronet.models import build_model, list_models

# model: (quantized convs, quantized linears, sign activations) — first and last weighted layer float;
# signs replace every ReLU/ReLU6 between them (NIN's last ReLU follows its last conv and stays; nin_bireal's
# activations all precede their convs, so its classifier reads a sign).
WBWTAB_COUNTS = {
    "lenet": (1, 1, 3),
    "nin": (7, 0, 8),
    "nin_bireal": (7, 0, 8),
    "nin_gc": (7, 0, 8),
    "resnet20": (20, 0, 19),
    "resnet56": (56, 0, 55),
    "mobilenetv2": (51, 0, 35),
}
# DoReFa: only the first weighted layer stays float.
DOREFA_COUNTS = {"lenet": (1, 2), "nin": (8, 0), "nin_bireal": (8, 0), "nin_gc": (8, 0), "resnet20": (20, 1), "resnet56": (56, 1),
                 "mobilenetv2": (51, 1)}


def _count(model, cls):
    return sum(1 for m in model.modules() if isinstance(m, cls))


def _train_step_then_eval(model, in_channels):
    x = torch.randn(2, in_channels, 28, 28)
    model.train()
    out = model(x)
    out.sum().backward()
    assert out.shape == (2, 10)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    assert torch.isfinite(model(x)).all()


def test_counts_cover_the_registry():
    assert set(WBWTAB_COUNTS) == set(DOREFA_COUNTS) == set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_wbwtab_on_every_registry_model(name):
    torch.manual_seed(0)
    in_channels = 3 if name == "resnet20" else 1
    model = wbwtab.prepare(build_model(name, num_classes=10, in_channels=in_channels), A=2, W=2)
    report = model.quantization_report
    convs, linears, signs = WBWTAB_COUNTS[name]
    assert (report.count("QuantConv2d"), report.count("QuantLinear"), report.count("SignActivation")) == (convs, linears, signs)
    assert _count(model, SignActivation) == signs and _count(model, BinaryWeightQuantizer) == convs + linears
    assert _count(model, nn.ReLU) + _count(model, nn.ReLU6) == (1 if name in ("nin", "nin_gc") else 0)
    assert report.count("QuantAdd") == 0 and report.count("QuantMaxPool2d") == 0
    assert [reason for _, reason in report.kept_float if "layer" in reason] == ["first layer", "last layer"]
    _train_step_then_eval(model, in_channels)


@pytest.mark.parametrize("name", list_models())
def test_dorefa_on_every_registry_model(name):
    torch.manual_seed(0)
    in_channels = 3 if name == "nin" else 1
    model = dorefa.prepare(build_model(name, num_classes=10, in_channels=in_channels), a_bits=4, w_bits=4)
    report = model.quantization_report
    convs, linears = DOREFA_COUNTS[name]
    assert (report.count("QuantConv2d"), report.count("QuantLinear")) == (convs, linears)
    assert _count(model, DoReFaActivationQuantizer) == convs + linears  # one per quantized layer input
    assert len(report.quantized) == convs + linears  # no pools, activations or adds
    assert [reason for _, reason in report.kept_float if "layer" in reason] == ["first layer"]
    _train_step_then_eval(model, in_channels)


def test_nin_signs_stop_before_the_classifier_conv():
    model = wbwtab.prepare(build_model("nin", 10, 1))
    assert type(model.features[0].conv) is nn.Conv2d and type(model.features[10].conv) is nn.Conv2d
    assert isinstance(model.features[9].act, SignActivation) and type(model.features[10].act) is nn.ReLU


@pytest.mark.parametrize("W,quantizer,levels", [(2, BinaryWeightQuantizer, 2), (3, TernaryWeightQuantizer, 3)])
def test_wbwtab_weights_take_two_or_three_levels_per_channel(W, quantizer, levels):
    torch.manual_seed(0)
    model = wbwtab.prepare(build_model("nin", 10, 1), W=W)
    conv = model.features[4].conv
    assert isinstance(conv.weight_quantizer, quantizer)
    weight = conv.quantized_weight().detach()
    assert all(len(weight[c].unique()) == levels for c in range(weight.shape[0]))
    assert len(weight.abs().unique()) > 2  # one α per output channel, not per layer


def test_float_settings_reproduce_the_float_model():
    torch.manual_seed(0)
    float_model = build_model("resnet20", 10, 1).eval()
    x = torch.randn(2, 1, 28, 28)
    for prepared in (wbwtab.prepare(float_model, A=32, W=32), dorefa.prepare(float_model, a_bits=32, w_bits=32)):
        prepared.eval()
        assert _count(prepared, SignActivation) == 0 and _count(prepared, FloatQuantizer) > 0
        assert torch.equal(prepared(x), float_model(x))
    kept = wbwtab.prepare(float_model, A=32, W=2)
    assert _count(kept, nn.ReLU) == _count(float_model, nn.ReLU) and _count(kept, BinaryWeightQuantizer) == 20


def test_conv_transpose_in_both_presets():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 6, 2, stride=2, bias=False),
                          nn.ReLU(), nn.ConvTranspose2d(6, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(4, 2, 1))
    for prepared, axis in ((wbwtab.prepare(model), 1), (dorefa.prepare(model, w_bits=3, a_bits=3), None)):
        assert type(prepared[2]).__name__ == "QuantConvTranspose2d" and type(prepared[4]).__name__ == "QuantConvTranspose2d"
        assert prepared[2].weight_quantizer.ch_axis == axis  # DoReFa normalises per tensor
        out = prepared(torch.randn(2, 1, 5, 5))
        out.sum().backward()
        assert out.shape == (2, 2, 10, 10) and prepared[2].weight.grad is not None
    binary = wbwtab.prepare(model)
    weight = binary[2].quantized_weight().detach()  # (in, out, kH, kW): α per output channel (axis 1)
    assert all(len(weight[:, c].abs().unique()) == 1 for c in range(6))
    assert binary[4].weight_quantizer.ch_axis is None  # grouped transposed conv: one α per tensor
    assert [type(binary[i]).__name__ for i in (1, 3, 5)] == ["SignActivation"] * 3


def test_shared_activation_used_after_the_last_layer_stays_float():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.relu = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1), nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv2(self.relu(self.conv1(x))))

    model = wbwtab.prepare(Shared())
    assert type(model.relu) is nn.ReLU
    assert ("relu", "activation also used outside the quantized region") in model.quantization_report.kept_float


def test_seed_api():
    conv = dorefa.QuantConv2d(3, 8, 3, padding=1, a_bits=4, w_bits=2)
    assert int(conv.weight_quantizer.bits) == 2 and int(conv.input_quantizer.bits) == 4
    deconv = dorefa.QuantConvTranspose2d(8, 4, 2, stride=2, dilation=1, groups=2, bias=False, w_bits=3)
    assert deconv.groups == 2 and deconv.bias is None and deconv(torch.randn(1, 8, 3, 3)).shape == (1, 4, 6, 6)
    assert isinstance(dorefa.QuantLinear(4, 2, a_bits=32).input_quantizer, FloatQuantizer)
    ternary = wbwtab.QuantConv2d(3, 8, 3, W=3)
    assert isinstance(ternary.weight_quantizer, TernaryWeightQuantizer)
    assert isinstance(ternary.input_quantizer, FloatQuantizer)
    assert isinstance(wbwtab.ActivationQuantizer(2), SignActivation) and type(wbwtab.ActivationQuantizer(32)) is nn.ReLU
    with pytest.raises(QuantizationError, match="A must be 2"):
        wbwtab.ActivationQuantizer(4)


def test_quant_inference_uses_the_stored_weights():
    torch.manual_seed(0)
    float_model = build_model("lenet", 10, 1)
    training = dorefa.prepare(float_model, w_bits=2, a_bits=4).eval()
    inference = dorefa.prepare(float_model, w_bits=2, a_bits=4, quant_inference=True).eval()
    x = torch.randn(3, 1, 28, 28)
    assert not torch.equal(training(x), inference(x))
    with torch.no_grad():
        for name in ("conv2", "fc1", "fc2"):
            getattr(inference, name).weight.copy_(getattr(training, name).quantized_weight())
    assert torch.equal(training(x), inference(x))


@pytest.mark.parametrize("make", [lambda m: wbwtab.prepare(m, W=3), lambda m: dorefa.prepare(m, a_bits=3, w_bits=2),
                                  lambda m: wbwtab.prepare(m, quant_inference=True)])
def test_checkpoint_reloads_to_identical_outputs(make, tmp_path):
    torch.manual_seed(0)
    model = make(build_model("resnet20", 10, 1))
    model.train()
    model(torch.randn(4, 1, 28, 28)).sum().backward()  # BN statistics move
    save_checkpoint(tmp_path / "q", model)
    again = load_model(tmp_path / "q")
    assert again.quant_scheme == model.quant_scheme
    assert [type(m).__name__ for m in again.modules()] == [type(m).__name__ for m in model.modules()]
    assert [int(q.enabled) for _, q in quantizers(again)] == [int(q.enabled) for _, q in quantizers(model)]
    x = torch.randn(3, 1, 28, 28)
    model.eval(), again.eval()
    assert torch.equal(model(x), again(x))


def test_scheme_json_round_trip_and_old_schemes():
    for scheme in (wbwtab.wbwtab_scheme(2, 3), wbwtab.wbwtab_scheme(32, 2), dorefa.dorefa_scheme(4, 1, pre_scale=0.1)):
        assert QuantScheme.from_json(scheme.to_json()) == scheme
    old = default_scheme().to_json()
    for key in ("quantize_joins", "activation_replacement", "replaced_activations"):
        del old[key]  # a scheme written before these fields existed
    assert QuantScheme.from_json(old) == default_scheme()


@pytest.mark.parametrize("call,fragment", [
    (lambda: dorefa.dorefa_scheme(w_bits=0), "w_bits must be 1 to 16"),
    (lambda: dorefa.dorefa_scheme(w_bits=17), "w_bits must be 1 to 16"),
    (lambda: dorefa.dorefa_scheme(a_bits=20), "a_bits must be 1 to 16"),
    (lambda: dorefa.dorefa_scheme(pre_scale=-1), "pre_scale must be positive"),
    (lambda: dorefa.dorefa_scheme(rounding="stochastic"), "unknown rounding"),
    (lambda: wbwtab.wbwtab_scheme(W=4), "W must be 2"),
    (lambda: wbwtab.wbwtab_scheme(A=8), "A must be 2"),
])
def test_bad_preset_settings(call, fragment):
    with pytest.raises(QuantizationError, match=fragment):
        call()


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("lowbit") / "lenet"
    assert main(["train", "--model", "lenet", "--data", "synthetic", "--epochs", "3", "--batch-size", "32",
                 "--out", str(run), "--no-progress"]) == 0
    return run


@pytest.mark.parametrize("args,scheme,floor", [
    (["dorefa", "--w_bits", "4", "--a-bits", "4"], "dorefa-w4a4", 0.7),
    (["wbwtab", "--W", "3", "--A", "2", "--lr", "0.01"], "wbwtab-W3A2", 0.6),
])
def test_cli_qat(trained, tmp_path, capsys, args, scheme, floor):
    out_dir = tmp_path / "q"
    assert main(["quantize", *args, "--checkpoint", str(trained), "--epochs", "1", "--batch-size", "32",
                 "--out", str(out_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"QAT {scheme}" in out
    acc = float(out.split("test accuracy ")[1].split("%")[0]) / 100
    assert acc >= floor, out  # measured 0.83 (dorefa) and 0.78 (wbwtab) after one epoch; 10 classes
    model = load_model(out_dir)
    assert model.quant_scheme.name == scheme
    assert main(["evaluate", "--checkpoint", str(out_dir)]) == 0
    assert f"{acc * 100:.2f}" in capsys.readouterr().out


@pytest.mark.parametrize("flags,center", [([], False), (["--center-weights"], True)])
def test_cli_binary_weight_centring_is_opt_in(trained, tmp_path, flags, center):
    out_dir = tmp_path / "b"
    assert main(["quantize", "wbwtab", "--W", "2", "--A", "2", *flags, "--checkpoint", str(trained), "--epochs", "1",
                 "--batch-size", "32", "--out", str(out_dir), "--no-progress"]) == 0
    model = load_model(out_dir)
    assert model.quant_scheme.weight.options == {"center": center, "clip": True}
    quantizers = [m for m in model.modules() if isinstance(m, BinaryWeightQuantizer)]
    assert quantizers and all(q.center is center for q in quantizers)


@pytest.mark.parametrize("args,fragment", [
    (["wbwtab", "--W", "4"], "W must be 2 (binary), 3 (ternary) or 32"),
    (["wbwtab", "--A", "8"], "A must be 2"),
    (["dorefa", "--w_bits", "0"], "w_bits must be 1 to 16"),
    (["dorefa", "--w-bits", "17"], "w_bits must be 1 to 16"),
    (["dorefa", "--ptq"], "no observers to calibrate"),
    (["wbwtab", "--bn_fuse"], "--bn_fuse apply to iao only"),
    (["iao", "--W", "2"], "--W, --A and --center-weights belong to"),
    (["dorefa", "--center-weights"], "--W, --A and --center-weights belong to"),
    (["wbwtab", "--W", "3", "--center-weights"], "--center-weights applies to binary weights (--W 2), not --W 3"),
])
def test_cli_bad_flags(capsys, args, fragment):
    assert main(["quantize", *args, "--checkpoint", "does-not-matter", "--data", "synthetic"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and fragment in err, err


def test_cli_help_shows_the_low_bit_examples(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    assert "micronet quantize dorefa" in out and "micronet quantize wbwtab" in out and "--pre-scale" in out


def test_report_lists_binarized_layers_with_real_valued_inputs():
    """--A 2 turns ReLUs into signs; a binary-weight layer with no ReLU before it (MobileNetV2's expansion convs read
    the linear bottleneck) still gets real values: the report names each one and why, NIN and ResNet have none."""
    model = wbwtab.prepare(build_model("mobilenetv2", 10, 3))
    listed = dict(model.quantization_report.real_valued_inputs)
    assert len(listed) == 17
    assert set(listed) == {f"features.{i}.expand.conv" for i in range(2, 18)} | {"features.18.conv"}
    assert listed["features.2.expand.conv"].startswith("its input is features.1.project.bn")
    assert all("not a ReLU turned into a sign" in why for why in listed.values())
    summary = model.quantization_report.summary()
    assert summary.count("binarized layer with real-valued inputs:") == 17
    for name in ("nin", "nin_gc", "resnet20"):
        assert wbwtab.prepare(build_model(name, 10, 3)).quantization_report.real_valued_inputs == []
    assert wbwtab.prepare(build_model("mobilenetv2", 10, 3), A=32).quantization_report.real_valued_inputs == []
