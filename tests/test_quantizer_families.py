"""A quantizer family describes its own export: registering one touches quantization/core only.

``register_quantizer_family`` builds the quantizer; the quantizer's ``activation_grid()`` (float, sign or
integer codes with scale, zero point and clip) and ``weight_codes()`` are all the exporter reads. Here a
family that exists nowhere in micronet (a fixed-grid unsigned 3-bit activation, codes 0..7 at step 1/4)
exports and runs on ONNX Runtime's integer kernels, and a quantizer that describes nothing is refused with
the fix named.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from micronet.compression.quantization.core.quantizers import ActivationGrid, Quantizer
from micronet.compression.quantization.core.scheme import QuantizerSpec, register_quantizer_family
from micronet.compression.quantization.core.workflow import calibrate, prepare
from micronet.compression.quantization.wqaq.iao.quantize import iao_scheme
from micronet.deploy.onnx import export
from micronet.deploy.onnxruntime import int8_coverage
from micronet.errors import DeployError
from micronet.models import build_model

STEP, TOP = 0.25, 7


class FixedGridQuantizer(Quantizer):
    """clamp(round(x / ¼), 0, 7) · ¼: a fixed unsigned 3-bit grid, no observer."""

    def __init__(self) -> None:
        super().__init__(3)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        codes = torch.clamp(torch.round(x / STEP), 0, TOP)
        return x + (codes * STEP - x).detach()

    def activation_grid(self) -> ActivationGrid:
        return ActivationGrid("codes", STEP, 0, 0, TOP, bits=3)


class SilentQuantizer(FixedGridQuantizer):
    def activation_grid(self) -> ActivationGrid:
        return Quantizer.activation_grid(self)


register_quantizer_family("fixed_grid_test", lambda spec, ch_axis, num_channels: FixedGridQuantizer())
register_quantizer_family("silent_test", lambda spec, ch_axis, num_channels: SilentQuantizer())


def _prepared(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    base = iao_scheme(w_bits=7, a_bits=8)
    scheme = type(base)(**{**base.__dict__, "name": f"{family}-acts", "activation": QuantizerSpec(family=family, bits=3)})
    model = prepare(build_model("nin", num_classes=10, in_channels=1), scheme)
    calibrate(model, [torch.rand(16, 1, 28, 28) for _ in range(2)])
    return model.eval()


def test_a_new_family_exports_from_its_own_description(tmp_path):
    model = _prepared("fixed_grid_test")
    report = export(model, tmp_path / "m.onnx", torch.zeros(1, 1, 28, 28), exporter="legacy")
    assert int8_coverage(report.path).int8_compute >= 7  # its codes feed QLinearConv like affine codes
    x = torch.rand(32, 1, 28, 28)
    with torch.no_grad():
        reference = model(x).numpy()
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    assert (got.argmax(1) == reference.argmax(1)).mean() >= 0.9
    assert np.abs(got - reference).max() <= 0.05 * np.abs(reference).max()


def test_a_quantizer_without_a_description_is_refused(tmp_path):
    with pytest.raises(DeployError, match="SilentQuantizer has no ONNX mapping: give it an activation_grid"):
        export(_prepared("silent_test"), tmp_path / "m.onnx", torch.zeros(1, 1, 28, 28), exporter="legacy")
