"""Quantization: one mechanism (:mod:`.core`) and presets configuring it (:mod:`.wqaq.iao`)."""

from micronet.compression.quantization.core import (
    QuantizerSpec,
    QuantScheme,
    calibrate,
    convert,
    enable_qat,
    freeze,
    prepare,
)
from micronet.compression.quantization.ptq import post_training_quantize

__all__ = ["QuantScheme", "QuantizerSpec", "calibrate", "convert", "enable_qat", "freeze", "post_training_quantize", "prepare"]
