"""Low-bit presets on ONNX Runtime's integer kernels.

DoReFa k ≤ 7 weights are odd integers over 2^k − 1, binary and ternary weights are ±α / {−α, 0, α} per
channel: int8 codes times a per-channel step. With integer codes on the input too (a DoReFa k-bit grid on
[0, 1], or ±1 signs), the export writes ``DQ → Conv → Q`` groups that ONNX Runtime fuses into QLinearConv /
QGemm. The export's report says per layer which kernel it expects; these tests hold it to what ONNX Runtime
actually runs, and check the layers that must stay float say why.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from micronet.compression.quantization.core.integer_bias import int8_weight_codes
from micronet.compression.quantization.core.lowbit import (
    BinaryWeightQuantizer,
    DoReFaWeightQuantizer,
    TernaryWeightQuantizer,
)
from micronet.compression.quantization.core.workflow import convert
from micronet.compression.quantization.wbwtab import quantize as wbwtab
from micronet.compression.quantization.wqaq.dorefa import quantize as dorefa
from micronet.deploy.onnx import export
from micronet.deploy.onnxruntime import int8_coverage
from micronet.models import build_model

IMAGES = torch.rand(32, 1, 28, 28)


def _nin(prepare) -> torch.nn.Module:
    torch.manual_seed(0)
    model = prepare(build_model("nin", num_classes=10, in_channels=1))
    model.train()
    with torch.no_grad():  # BatchNorm statistics from data, so that every channel carries signal
        model(IMAGES)
    return model.eval()


def _ort(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


# ------------------------------------------------------------------------------------------ weight codes
FAMILIES = {
    "binary": lambda: BinaryWeightQuantizer(0),
    "binary_centred_clipped": lambda: BinaryWeightQuantizer(0, center=True, clip=True),
    "ternary": lambda: TernaryWeightQuantizer(0),
    "dorefa_1": lambda: DoReFaWeightQuantizer(1, 0),
    "dorefa_2": lambda: DoReFaWeightQuantizer(2),
    "dorefa_4": lambda: DoReFaWeightQuantizer(4),
    "dorefa_7": lambda: DoReFaWeightQuantizer(7),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_frozen_low_bit_weights_keep_their_int8_codes(family):
    """After ``convert`` the weight holds its quantized values and the quantizer is off: the int8 codes and
    steps read off those values are the ones of the live quantizer, exactly (encoding them again is not the
    identity for DoReFa's tanh or binary centring). A float weight that is not on the grid is refused."""
    torch.manual_seed(1)
    weight = torch.randn(6, 5, 3, 3) * 0.3
    quantizer = FAMILIES[family]()
    live = int8_weight_codes(quantizer, weight, 0)
    frozen_values = quantizer(weight).detach()
    quantizer.enabled.fill_(0)
    frozen = int8_weight_codes(quantizer, frozen_values, 0)
    assert not isinstance(live, str) and not isinstance(frozen, str), (live, frozen)
    assert torch.equal(live[0], frozen[0]) and torch.equal(live[1].expand(6), frozen[1].expand(6))
    assert isinstance(int8_weight_codes(quantizer, weight, 0), str)  # raw float weights: not on any grid


def test_dorefa_8_bit_weights_need_more_than_int8():
    quantizer = DoReFaWeightQuantizer(8)
    reason = int8_weight_codes(quantizer, torch.randn(4, 3, 3, 3), 0)
    assert isinstance(reason, str) and "more than int8" in reason


# ------------------------------------------------------------------------------------------ kernels
LOW_BIT = {
    "dorefa_w2a2": lambda m: dorefa.prepare(m, a_bits=2, w_bits=2),
    "dorefa_w4a4": lambda m: dorefa.prepare(m, a_bits=4, w_bits=4, pre_scale=0.25),
    "dorefa_w7a7": lambda m: dorefa.prepare(m, a_bits=7, w_bits=7),
    "binary_w2a2": lambda m: wbwtab.prepare(m, W=2, A=2),
    "ternary_w3a2": lambda m: wbwtab.prepare(m, W=3, A=2),
}


@pytest.mark.parametrize("preset", list(LOW_BIT))
def test_report_names_the_layers_onnxruntime_runs_on_integer_kernels(preset, tmp_path):
    """Every quantized NIN conv whose output a quantizer reads runs as QLinearConv in ONNX Runtime, and the
    report's count is what ONNX Runtime fuses. The presets keep the first conv float (WbWtAb the last one
    too); DoReFa's quantized last conv feeds the float average pool, so it has no output codes and stays
    float, with that reason."""
    model = _nin(LOW_BIT[preset])
    report = export(model, tmp_path / "m.onnx", IMAGES[:1], exporter="legacy")
    layers = report.form.layers
    middle = [f"features.{i}.conv" for i in (1, 2, 4, 5, 6, 8, 9)]
    if preset.startswith("dorefa"):
        assert [row.name for row in layers] == [*middle, "features.10.conv"]
        assert layers[-1].kernel.startswith("float: float output"), layers[-1].kernel
        layers = layers[:-1]
    assert [row.name for row in layers] == middle
    assert all(layer.kernel == "integer" for layer in layers), [(row.name, row.kernel) for row in layers]
    coverage = int8_coverage(report.path)
    assert coverage.int8_compute == report.form.integer_layers == len(middle)
    with torch.no_grad():
        reference = model(IMAGES).numpy()
    got = _ort(report.path, IMAGES)
    assert (got.argmax(1) == reference.argmax(1)).mean() >= 0.9, "ONNX Runtime computes another network"


def test_low_bit_weights_with_float_activations_stay_float(tmp_path):
    """Ternary weights beside float activations: no integer kernel multiplies a float input, so every layer
    runs float, and the report says why."""
    model = _nin(lambda m: wbwtab.prepare(m, W=3, A=32))
    report = export(model, tmp_path / "m.onnx", IMAGES[:1], exporter="legacy")
    assert report.form.integer_layers == 0 == int8_coverage(report.path).int8_compute
    assert all(layer.kernel.startswith("float: float input") for layer in report.form.layers)


@pytest.mark.parametrize("preset", ["dorefa_w4a4", "binary_w2a2"])
def test_converted_low_bit_model_exports_the_same_integer_network(preset, tmp_path):
    """``convert`` stores quantized weights and switches their quantizers off; its export keeps every
    integer kernel, and ONNX Runtime gives the same top-1 as for the unconverted model's file (the first,
    float conv has its BatchNorm folded by ``convert``, which changes float rounding only)."""
    model = _nin(LOW_BIT[preset])
    original = export(model, tmp_path / "a.onnx", IMAGES[:1], exporter="legacy")
    converted = export(convert(model), tmp_path / "b.onnx", IMAGES[:1], exporter="legacy")
    assert [row.kernel for row in converted.form.layers] == [row.kernel for row in original.form.layers]
    a, b = _ort(original.path, IMAGES), _ort(converted.path, IMAGES)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95
