"""Post-training recipes on the IAO mechanism: cross-layer equalization (:mod:`.equalize`), bias correction
(:mod:`.bias_correction`), AdaRound (:mod:`.adaround`), and :func:`post_training_quantize`, which runs them
in order."""

from micronet.compression.quantization.ptq.adaround import AdaRoundOptions, AdaRoundReport, adaround
from micronet.compression.quantization.ptq.bias_correction import BiasCorrectionReport, correct_bias, output_shift
from micronet.compression.quantization.ptq.equalize import EqualizationReport, equalize
from micronet.compression.quantization.ptq.recipe import describe, post_training_quantize

__all__ = ["AdaRoundOptions", "AdaRoundReport", "BiasCorrectionReport", "EqualizationReport", "adaround",
           "correct_bias", "describe", "equalize", "output_shift", "post_training_quantize"]
