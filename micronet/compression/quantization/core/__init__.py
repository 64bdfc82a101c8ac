"""The quantization mechanism: rounding, observers, quantizers, quantized modules, prepare/calibrate/freeze.

Every preset (IAO integer, DoReFa, binary/ternary) is a :class:`QuantScheme` fed to the same
:func:`prepare`; see :mod:`micronet.compression.quantization.wqaq.iao.quantize` for the IAO preset.
"""

from micronet.compression.quantization.core.affine import affine_qparams, fake_quantize, quant_range
from micronet.compression.quantization.core.modules import (
    QuantAdaptiveAvgPool2d,
    QuantAdd,
    QuantAvgPool2d,
    QuantConcat,
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantHardswish,
    QuantizedModule,
    QuantLeakyReLU,
    QuantLinear,
    QuantMaxPool2d,
    QuantReLU,
    QuantReLU6,
    QuantSigmoid,
    default_scheme,
)
from micronet.compression.quantization.core.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    build_observer,
)
from micronet.compression.quantization.core.quantizers import CALIBRATE, FROZEN, QAT, AffineQuantizer, Quantizer
from micronet.compression.quantization.core.scheme import QuantizerSpec, QuantScheme, register_quantizer_family
from micronet.compression.quantization.core.workflow import (
    QuantizationReport,
    calibrate,
    convert,
    enable_qat,
    freeze,
    is_prepared,
    prepare,
    quantizers,
    set_fake_quant,
)

__all__ = [
    "register_quantizer_family",
    "QuantScheme",
    "QuantizerSpec",
    "Quantizer",
    "AffineQuantizer",
    "QAT",
    "FROZEN",
    "CALIBRATE",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QuantAdaptiveAvgPool2d",
    "QuantAdd",
    "QuantAvgPool2d",
    "QuantConcat",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConvTranspose2d",
    "QuantHardswish",
    "QuantLeakyReLU",
    "QuantLinear",
    "QuantMaxPool2d",
    "QuantReLU",
    "QuantReLU6",
    "QuantSigmoid",
    "QuantizationReport",
    "QuantizedModule",
    "affine_qparams",
    "build_observer",
    "calibrate",
    "convert",
    "default_scheme",
    "enable_qat",
    "fake_quantize",
    "freeze",
    "is_prepared",
    "prepare",
    "quant_range",
    "quantizers",
    "set_fake_quant",
]
