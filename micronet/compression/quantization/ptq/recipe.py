"""One call from a float model to a calibrated, quantized one: :func:`post_training_quantize`.

The order matters: equalization changes the float weights, so it runs before ``prepare`` and calibration
(the ranges are those of the equalized model); AdaRound needs the calibrated scales and changes the
weights' codes; bias correction measures the shift the final codes leave, so it runs last.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from micronet.compression.quantization.core.scheme import QuantScheme
from micronet.compression.quantization.core.workflow import calibrate, is_prepared, prepare
from micronet.compression.quantization.ptq.adaround import AdaRoundOptions
from micronet.compression.quantization.ptq.adaround import adaround as learn_rounding
from micronet.compression.quantization.ptq.bias_correction import correct_bias
from micronet.compression.quantization.ptq.equalize import EqualizationReport
from micronet.compression.quantization.ptq.equalize import equalize as equalize_layers
from micronet.compression.quantization.ptq.layers import batches, layer_units
from micronet.errors import QuantizationError


def _check_data(data: Iterable[Any]) -> None:
    if isinstance(data, Iterator):
        raise QuantizationError("post_training_quantize reads the calibration data several times: pass a loader or "
                                "a list of batches, not a one-shot iterator or generator")


def _scheme_and_adaround_options(w_bits: int | None, a_bits: int, adaround: bool, adaround_iterations: int | None,
                                 adaround_options: AdaRoundOptions | None,
                                 preset_options: dict[str, Any]) -> tuple[QuantScheme, AdaRoundOptions]:
    """The IAO PTQ scheme and AdaRound's options, after refusing options that do not go together."""
    from micronet.compression.quantization.wqaq.iao.quantize import iao_scheme

    if adaround_iterations is not None:
        adaround_options = AdaRoundOptions(**{**(adaround_options or AdaRoundOptions()).__dict__,
                                              "iterations": adaround_iterations})
    options = adaround_options or AdaRoundOptions()
    if adaround:
        options.check()
    for unknown in ("ptq", "qaft", "inplace"):
        if unknown in preset_options:
            raise QuantizationError(f"post_training_quantize sets {unknown} itself: drop that option")
    scheme = iao_scheme(a_bits=a_bits, w_bits=w_bits, ptq=True, **preset_options)
    if adaround and scheme.weight.family != "affine":
        raise QuantizationError("AdaRound learns the rounding of affine integer weights: drop learned scales (--lsq) "
                                "or AdaRound")
    return scheme, options


def _calibrated(float_model: nn.Module, data: Iterable[Any], num_batches: int | None, scheme: QuantScheme,
                skip: Iterable[str]) -> nn.Module:
    quantized = prepare(float_model, scheme, skip=skip)
    if not any(True for _ in layer_units(quantized)):
        raise QuantizationError("the model has no conv or linear layer that IAO quantizes (or all were skipped): "
                                "nothing to post-training quantize")
    calibrate(quantized, data, num_batches=num_batches)
    return quantized


@torch.no_grad()
def output_error(quantized: nn.Module, reference: nn.Module, data: Iterable[Any], num_batches: int | None) -> float:
    """Mean squared difference of the two models' outputs over the reference's mean square, on ``data``."""
    error = power = 0.0
    for x in batches(data, num_batches):
        expected = reference(x)
        error += float((quantized(x) - expected).double().pow(2).sum())
        power += float(expected.double().pow(2).sum())
    return error / max(power, 1e-300)


def _best_equalization(model: nn.Module, data: Iterable[Any], num_batches: int | None, scheme: QuantScheme,
                       skip: Iterable[str]) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """The float model, its calibrated quantized copy and the record of the equalization that leaves the
    least output error on the calibration data, among: classic scales (even weight ranges), scales for the
    least rounding noise (per-channel weights only) and none. Which scaling helps depends on the network
    (measured at 4 bits: the noise scales rescue a MobileNetV2 the classic ones break, and the classic ones
    do better on a NIN), so it is measured rather than assumed; a user asking for equalization never gets a
    model that is worse on the calibration data than plain PTQ."""
    reference = copy.deepcopy(model).eval()
    candidates: dict[str, tuple[nn.Module, Any]] = {"ranges": equalize_layers(model, calibration=batches(data, num_batches))}
    if scheme.weight.per_channel:
        candidates["noise"] = equalize_layers(model, calibration=batches(data, num_batches), scheme=scheme)
    candidates["none"] = (copy.deepcopy(model).eval(), None)
    errors: dict[str, float] = {}
    best: tuple[str, nn.Module, nn.Module] | None = None
    for name, (float_model, _) in candidates.items():
        float_model.eval()
        quantized = _calibrated(float_model, data, num_batches, scheme, skip)
        errors[name] = output_error(quantized, reference, data, num_batches)
        if best is None or errors[name] < errors[best[0]]:
            best = (name, float_model, quantized)
    name, float_model, quantized = best
    report = candidates[name][1] or EqualizationReport(objective="none")
    report.chosen, report.output_errors = name, {k: float(f"{v:.6g}") for k, v in errors.items()}
    float_model.equalization_report = report
    return float_model, quantized, report.to_json()


def post_training_quantize(
    model: nn.Module,
    data: Iterable[Any],
    *,
    w_bits: int | None = None,  # None: the target's (7 bits for the default portable target)
    a_bits: int = 8,
    num_batches: int | None = 200,
    equalize: bool = False,
    bias_correction: bool = False,
    adaround: bool = False,
    adaround_iterations: int | None = None,
    adaround_options: AdaRoundOptions | None = None,
    skip: Iterable[str] = (),
    progress: bool | None = None,
    **preset_options: Any,
) -> nn.Module:
    """Quantize a float ``model`` with the IAO preset by calibration on ``num_batches`` batches of ``data``
    (a re-iterable loader or list yielding inputs or (input, target) pairs), optionally with cross-layer
    equalization, AdaRound and bias correction (:mod:`micronet.compression.quantization.ptq`).

    ``preset_options`` are :func:`~micronet.compression.quantization.wqaq.iao.quantize.iao_scheme`'s
    (``q_type``, ``q_level``, ``percentile``, ``activation_observer``, ...). Returns the calibrated, frozen
    model; ``model`` is not modified. The result records what was done in ``ptq_recipe`` (checkpoints store
    it) and evaluates, saves and exports like any PTQ model: AdaRound's codes are in its weights.
    """
    if is_prepared(model):
        raise QuantizationError("post_training_quantize takes a float model, but this one is already quantized: "
                                "pass the float model it came from")
    _check_data(data)
    if num_batches is not None and num_batches < 1:
        raise QuantizationError(f"num_batches must be at least 1 (got {num_batches})")
    scheme, options = _scheme_and_adaround_options(w_bits, a_bits, adaround, adaround_iterations, adaround_options,
                                                   preset_options)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    recipe: dict[str, Any] = {"equalize": equalize, "bias_correction": bias_correction, "adaround": adaround}
    if equalize:
        float_model, quantized, recipe["equalization"] = _best_equalization(model, data, num_batches, scheme, skip)
        timings["equalize_s"] = time.perf_counter() - started
    else:
        float_model = copy.deepcopy(model).eval()
        quantized = _calibrated(float_model, data, num_batches, scheme, skip)
        timings["calibrate_s"] = time.perf_counter() - started
    if adaround:
        mark = time.perf_counter()
        ada = learn_rounding(quantized, float_model, data, num_batches=num_batches, options=options, progress=progress)
        recipe["adaround_options"] = {k: v for k, v in options.__dict__.items()}
        recipe["adaround_layers"] = ada.layers
        timings["adaround_s"] = time.perf_counter() - mark
        quantized.adaround_report = ada
    if bias_correction:
        mark = time.perf_counter()
        corrected = correct_bias(quantized, float_model, data, num_batches)
        recipe["bias_corrected"] = corrected.to_json()
        timings["bias_correction_s"] = time.perf_counter() - mark
        quantized.bias_correction_report = corrected
    if getattr(float_model, "equalization_report", None) is not None:
        quantized.equalization_report = float_model.equalization_report
    fusion = getattr(float_model, "fusion_record", None)
    if fusion:
        quantized.fusion_record = fusion
    recipe["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    quantized.ptq_recipe = recipe
    return quantized


def describe(model: nn.Module) -> str:
    """The reports of the recipes ``model`` went through, one block each."""
    parts = [getattr(model, attr).summary() for attr in ("equalization_report", "adaround_report", "bias_correction_report")
             if getattr(model, attr, None) is not None]
    return "\n".join(parts)
