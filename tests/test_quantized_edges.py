"""Quantized edges: the layers a low-bit preset keeps in float (the first, which reads the image; WbWtAb's
last) and the average pools quantized as integer-arithmetic-only layers (``edge_bits``), so that every conv
of the network runs on ONNX Runtime's integer kernels."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx_probes import onnxruntime_codes, with_outputs
from torch import nn

from micronet.compression.quantization.core.integer_bias import (
    folded_channel_scale,
    input_step,
    int8_weight_codes,
    weight_step,
)
from micronet.compression.quantization.core.lowbit import SignActivation
from micronet.compression.quantization.core.presets import with_quantized_edges
from micronet.compression.quantization.core.quantizers import AffineQuantizer
from micronet.compression.quantization.core.scheme import QuantScheme
from micronet.compression.quantization.core.workflow import calibrate
from micronet.compression.quantization.wbwtab import quantize as wbwtab
from micronet.compression.quantization.wqaq.dorefa import quantize as dorefa
from micronet.deploy.integer import IntegerModel, compare_codes
from micronet.deploy.onnx import export
from micronet.deploy.onnx.graph import GraphView
from micronet.deploy.onnxruntime import int8_coverage
from micronet.engine import load_checkpoint, save_checkpoint
from micronet.errors import ConfigError, QuantizationError
from micronet.models import build_model

IMAGES = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
NIN_CONVS = [f"features.{i}.conv" for i in (0, 1, 2, 4, 5, 6, 8, 9, 10)]

EDGED = {
    "dorefa_w4a4": lambda m: dorefa.prepare(m, a_bits=4, w_bits=4, pre_scale=0.25, edge_bits=8),
    "dorefa_w2a2": lambda m: dorefa.prepare(m, a_bits=2, w_bits=2, edge_bits=8),
    "binary_w2a2": lambda m: wbwtab.prepare(m, W=2, A=2, edge_bits=8),
    "ternary_w3a2": lambda m: wbwtab.prepare(m, W=3, A=2, edge_bits=8),
}


def _nin(prepare) -> nn.Module:
    torch.manual_seed(0)
    model = prepare(build_model("nin", num_classes=10, in_channels=1))
    model.train()
    with torch.no_grad():  # BatchNorm statistics from data, so that every channel carries signal
        model(IMAGES)
    calibrate(model, [IMAGES])  # the edges' input and pool quantizers observe the images
    return model.eval()


def _ort(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("preset", list(EDGED))
def test_every_nin_conv_runs_on_integer_kernels(preset, tmp_path):
    """With 8-bit edges all nine NIN convs are integer (without: seven), as ONNX Runtime fuses them, and
    ONNX Runtime computes the model's network."""
    model = _nin(EDGED[preset])
    first = model.features[0].conv
    assert isinstance(first.input_quantizer, AffineQuantizer) and int(first.input_quantizer.bits) == 8
    assert int(first.weight_quantizer.bits) == 7  # the portable target's weights: exact on every x86 CPU
    report = export(model, tmp_path / "m.onnx", IMAGES[:1], exporter="legacy")
    assert [row.name for row in report.form.layers] == NIN_CONVS
    assert all(row.kernel == "integer" for row in report.form.layers), [(r.name, r.kernel) for r in report.form.layers]
    assert int8_coverage(report.path).int8_compute == report.form.integer_layers == 9
    with torch.no_grad():
        reference = model(IMAGES).numpy()
    got = _ort(report.path, IMAGES)
    assert (got.argmax(1) == reference.argmax(1)).mean() >= 0.9, "ONNX Runtime computes another network"
    if preset.startswith("dorefa"):  # no sign to amplify a one-code input difference: outputs stay close
        assert np.abs(got - reference).max() <= 0.05 * np.abs(reference).max()


@pytest.mark.parametrize("preset", ["dorefa_w4a4", "binary_w2a2"])
def test_integer_reference_equals_onnxruntime_on_every_code(preset, tmp_path):
    """With 8-bit edges the whole file is integer, so the integer-only reference runs it: DoReFa's codes
    clipped to their k-bit grid and the signs (a saturating requantization at step 2^-100, clipped to codes
    127..129) included. ONNX Runtime's codes equal the reference's on every quantized tensor end to end, and
    the outputs within float32 rounding of their dequantization: 7-bit weights keep ONNX Runtime's sums
    exact on every x86 CPU."""
    model = _nin(EDGED[preset])
    report = export(model, tmp_path / "m.onnx", IMAGES[:1], exporter="legacy")
    reference = IntegerModel.from_onnx(report.path)
    ours = reference.run_codes(IMAGES.numpy())
    theirs = onnxruntime_codes(onnx.load(report.path), IMAGES.numpy())
    compared = [name for name in reference.quantized if name in theirs]
    assert len(compared) >= 10
    for name in compared:
        assert compare_codes(ours[name], theirs[name])["identical_fraction"] == 1.0, name
    np.testing.assert_allclose(reference(IMAGES.numpy()), theirs["output"], rtol=1e-6, atol=1e-7)  # float32 rounding


def _sign_net() -> nn.Module:
    """conv → BN → ReLU (a sign once prepared) → conv → BN → ReLU → pool: both convs are edges."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 1.5).mul_(torch.where(torch.rand(bn.num_features) < 0.3, -1.0, 1.0))
            bn.bias.uniform_(-0.3, 0.3)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_sign_after_an_integer_input_layer_follows_the_models_int32_bias(tmp_path):
    """The first layer reads 8-bit codes and adds its BatchNorm as an int32 bias B (as the model computes in
    eval); the sign after it must be sign(a + B) for the integer accumulator a, exactly. ONNX Runtime's
    signs equal that integer reference on every element (inputs on the 8-bit grid, so no input rounding
    differs), and torch's equal it except where torch's float sum sits within rounding of 0."""
    model = wbwtab.prepare(_sign_net(), W=2, A=2, edge_bits=8)
    step = 1 / 255
    x = torch.randint(0, 256, (64, 1, 12, 12), generator=torch.Generator().manual_seed(4)).float() * step
    calibrate(model, [x])
    model.eval()
    conv, bn = model[0], model[1]
    assert isinstance(model[2], SignActivation)
    x_step = float(conv.input_quantizer.activation_grid().scale)
    w_codes, _ = int8_weight_codes(conv.weight_quantizer, conv.deployed_weight(), 0)
    factor, shift, int_shift = bn.integer_shift()
    accumulator = torch.nn.functional.conv2d(torch.round(x.double() / x_step), w_codes.double(), padding=1)
    w_step = weight_step(conv.weight_quantizer, conv.deployed_weight(), 0)
    grid = (input_step(conv.input_quantizer) * folded_channel_scale(w_step, factor)).float().double()
    bias_codes = torch.round(int_shift / grid)
    assert torch.equal(bias_codes * grid, int_shift)
    # the float bias's own threshold ⌈−b/s⌉ differs from −B on some channel: the test tells the two apart
    assert bool((torch.ceil(-shift / grid) != -bias_codes).any())
    signed = accumulator * torch.sign(factor).reshape(1, -1, 1, 1) + bias_codes.reshape(1, -1, 1, 1)
    reference = torch.where(signed >= 0, 1.0, -1.0)

    report = export(model, tmp_path / "m.onnx", x[:1], exporter="legacy")
    assert all(row.kernel == "integer" for row in report.form.layers), [(r.name, r.kernel) for r in report.form.layers]
    proto = onnx.load(report.path)
    view = GraphView(proto)
    clips = [n.output[0] for n in proto.graph.node if n.op_type == "Clip"
             and view.producer.get(n.input[0]) is not None and view.producer[n.input[0]].op_type == "QuantizeLinear"]
    session = ort.InferenceSession(with_outputs(proto, {clips[0]: onnx.TensorProto.UINT8}).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    codes = session.run([clips[0]], {"input": x.numpy()})[0].astype(np.int64) - 128
    assert set(np.unique(codes)) <= {-1, 1}
    assert np.array_equal(codes, reference.numpy().astype(np.int64)), int((codes != reference.numpy()).sum())

    captured = {}
    model[2].register_forward_hook(lambda m, i, o: captured.update(pre=i[0].detach(), out=o.detach()))
    with torch.no_grad():
        model(x)
    differ = captured["out"] != reference.float()
    tolerance = 1e-5 * float(captured["pre"].abs().max())
    assert bool((captured["pre"][differ].abs() <= tolerance).all())


def test_edges_round_trip_through_a_checkpoint(tmp_path):
    model = _nin(EDGED["binary_w2a2"])
    assert model.quant_scheme.name == "wbwtab-W2A2-edges8"
    save_checkpoint(tmp_path / "ck", model)
    back = load_checkpoint(tmp_path / "ck")
    assert back.quant_scheme == model.quant_scheme
    rebuilt = back.build_model().eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(IMAGES), model(IMAGES))


def test_edge_bits_follow_the_target_and_refuse_impossible_widths():
    scheme = wbwtab.wbwtab_scheme(W=2, A=2)
    vnni = with_quantized_edges(QuantScheme.from_json({**scheme.to_json(), "target": "vnni"}), 8)
    assert vnni.edge_weight.bits == 8 and with_quantized_edges(scheme, 8).edge_weight.bits == 7
    assert with_quantized_edges(scheme, None) is scheme
    with pytest.raises(QuantizationError, match="edge bits must be 2 to 8"):
        with_quantized_edges(scheme, 16)
    with pytest.raises(QuantizationError, match="edge_weight and edge_activation go together"):
        QuantScheme.from_json({**scheme.to_json(), "edge_weight": vnni.edge_weight.to_json()})


def test_edge_bits_belong_to_the_low_bit_methods():
    from micronet.workflows.quantize import QuantizeOptions
    from micronet.workflows.scheme import lowbit_scheme

    options = QuantizeOptions(checkpoint="x", method="iao", edge_bits=8)
    with pytest.raises(ConfigError, match="--edge-bits belongs to dorefa and wbwtab"):
        lowbit_scheme(options)
    dorefa_options = QuantizeOptions(checkpoint="x", method="dorefa", w_bits=4, a_bits=4, edge_bits=8, target="vnni")
    scheme = lowbit_scheme(dorefa_options)
    assert scheme.name == "dorefa-w4a4-edges8" and scheme.edge_weight.bits == 8 and scheme.target == "vnni"
