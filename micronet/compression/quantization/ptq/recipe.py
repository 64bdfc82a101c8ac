"""One call from a float model to a calibrated, quantized one: :func:`post_training_quantize`.

The order matters: equalization changes the float weights, so it runs before ``prepare`` and calibration
(the ranges are those of the equalized model); AdaRound needs the calibrated scales and changes the
weights' codes; bias correction measures the shift the final codes leave, so it runs last.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
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
                                 adaround_blocks: bool, adaround_options: AdaRoundOptions | None,
                                 preset_options: dict[str, Any]) -> tuple[QuantScheme, AdaRoundOptions]:
    """The IAO PTQ scheme and AdaRound's options, after refusing options that do not go together."""
    from micronet.compression.quantization.wqaq.iao.quantize import iao_scheme

    if adaround_blocks and not adaround:
        raise QuantizationError("adaround_blocks reconstructs blocks with AdaRound: set adaround=True or drop it")
    options = adaround_options or AdaRoundOptions()
    if adaround_iterations is not None or adaround_blocks:
        options = AdaRoundOptions(**{**options.__dict__, "blocks": options.blocks or adaround_blocks,
                                     "iterations": options.iterations if adaround_iterations is None else adaround_iterations})
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


def _least_error(candidates: dict[str, tuple[nn.Module, QuantScheme]], reference: nn.Module, data: Iterable[Any],
                 num_batches: int | None, skip: Iterable[str]) -> tuple[str, nn.Module, dict[str, float]]:
    """Quantize each candidate (a float model and a scheme) by calibration and keep the one whose output is
    nearest the ``reference`` float model's on the calibration data: its name, its calibrated quantized
    model and every candidate's error (candidates are tried in order; a tie keeps the earlier)."""
    errors: dict[str, float] = {}
    best: tuple[str, nn.Module] | None = None
    for name, (float_model, scheme) in candidates.items():
        quantized = _calibrated(float_model.eval(), data, num_batches, scheme, skip)
        errors[name] = output_error(quantized, reference, data, num_batches)
        if best is None or errors[name] < errors[best[0]]:
            best = (name, quantized)
    return best[0], best[1], {k: float(f"{v:.6g}") for k, v in errors.items()}


#: Range settings the search tries, each a change of the scheme: the activation observer (the percentile range
#: PTQ uses by default, or the histogram's least-squared-error range) and the weight range (min/max or the
#: least-squared-error clipping of each weight tensor or row).
RANGE_CANDIDATES = {"activation": ("percentile", "histogram"), "weight": ("minmax", "mse")}


@dataclass
class RangeSearchReport:
    """Which range setting the search kept, and every setting's output error on the calibration data."""

    chosen: str
    output_errors: dict[str, float]

    def summary(self) -> str:
        errors = "\n".join(f"    {name}: {error:.3g}" for name, error in self.output_errors.items())
        return f"range search: kept {self.chosen}; output error of each setting on the calibration data:\n{errors}"


def _range_schemes(preset_options: dict[str, Any], a_bits: int, w_bits: int | None) -> dict[str, QuantScheme]:
    """One scheme per combination of the range settings the user did not fix."""
    from micronet.compression.quantization.wqaq.iao.quantize import iao_scheme

    activations = ([preset_options["activation_observer"]] if preset_options.get("activation_observer")
                   else RANGE_CANDIDATES["activation"])
    weights = [preset_options["weight_range"]] if preset_options.get("weight_range") else RANGE_CANDIDATES["weight"]
    fixed = {k: v for k, v in preset_options.items() if k not in ("activation_observer", "weight_range")}
    return {f"activations {a}, weights {w}": iao_scheme(a_bits=a_bits, w_bits=w_bits, ptq=True, activation_observer=a,
                                                          weight_range=w, **fixed)
            for a in activations for w in weights}


def _searched_scheme(model: nn.Module, data: Iterable[Any], num_batches: int | None, schemes: dict[str, QuantScheme],
                     skip: Iterable[str]) -> tuple[QuantScheme, nn.Module, dict[str, Any]]:
    """The range setting with the least output error. Which one wins depends on the network and the bit
    widths (measured: the histogram range rescues 4-bit activations on a NIN and triples the error on a
    ResNet-20; the least-error weight clipping halves per-tensor 8-bit weight error on a NIN and raises a
    ResNet-20's 4-bit output error), so it is measured on the calibration data."""
    reference = copy.deepcopy(model).eval()
    candidates = {name: (reference, scheme) for name, scheme in schemes.items()}
    name, quantized, errors = _least_error(candidates, reference, data, num_batches, skip)
    return schemes[name], quantized, {"chosen": name, "output_errors": errors}


def _best_equalization(model: nn.Module, data: Iterable[Any], num_batches: int | None, scheme: QuantScheme,
                       skip: Iterable[str]) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """The float model, its calibrated quantized copy and the record of the equalization that leaves the
    least output error on the calibration data, among: classic scales (even weight ranges), scales for the
    least rounding noise (per-channel weights only) and none. Which scaling helps depends on the network
    (measured at 4 bits: the noise scales rescue a MobileNetV2 the classic ones break, and the classic ones
    do better on a NIN), so it is measured rather than assumed; a user asking for equalization never gets a
    model that is worse on the calibration data than plain PTQ."""
    reference = copy.deepcopy(model).eval()
    equalized: dict[str, tuple[nn.Module, Any]] = {"ranges": equalize_layers(model, calibration=batches(data, num_batches))}
    if scheme.weight.per_channel:
        equalized["noise"] = equalize_layers(model, calibration=batches(data, num_batches), scheme=scheme)
    equalized["none"] = (copy.deepcopy(model).eval(), None)
    candidates = {name: (float_model, scheme) for name, (float_model, _) in equalized.items()}
    name, quantized, errors = _least_error(candidates, reference, data, num_batches, skip)
    float_model = equalized[name][0]
    report = equalized[name][1] or EqualizationReport(objective="none")
    report.chosen, report.output_errors = name, errors
    float_model.equalization_report = report
    return float_model, quantized, report.to_json()


def _learned_in_blocks(recipe: dict[str, Any]) -> dict[str, str]:
    """Layers whose roundings AdaRound learned with their block, which bias correction leaves alone: the
    block's output is what was matched, and a block-internal layer may keep a mean shift that the layers
    after it repay (measured on a ResNet-20 at W4A4: correcting those layers after block reconstruction
    raised the logit error against the float model 4- to 11-fold)."""
    return {f"{row['layer']}.{name}": "learned with their block by AdaRound, which matched the block's output"
            for row in recipe.get("adaround_layers", []) for name in row.get("block_layers") or []}


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
    range_search: bool = False,
    adaround_iterations: int | None = None,
    adaround_blocks: bool = False,
    adaround_options: AdaRoundOptions | None = None,
    skip: Iterable[str] = (),
    progress: bool | None = None,
    **preset_options: Any,
) -> nn.Module:
    """Quantize a float ``model`` with the IAO preset by calibration on ``num_batches`` batches of ``data``
    (a re-iterable loader or list yielding inputs or (input, target) pairs), optionally with cross-layer
    equalization, AdaRound and bias correction (:mod:`micronet.compression.quantization.ptq`).

    ``range_search``: calibrate with each range setting the options leave open (activations: percentile or
    least-squared-error histogram range; weights: min/max or least-squared-error clipping) and keep the one
    whose output is nearest the float model's on the calibration data; the other recipes start from it.

    ``adaround_blocks``: AdaRound learns the roundings of each residual / inverted-residual block's layers
    together against the block's float output (BRECQ-style), the other layers one by one.

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
    scheme, options = _scheme_and_adaround_options(w_bits, a_bits, adaround, adaround_iterations, adaround_blocks,
                                                   adaround_options, preset_options)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    recipe: dict[str, Any] = {"range_search": range_search, "equalize": equalize, "bias_correction": bias_correction,
                              "adaround": adaround}
    quantized = None
    if range_search:
        schemes = _range_schemes(preset_options, a_bits, w_bits)
        scheme, quantized, recipe["ranges"] = _searched_scheme(model, data, num_batches, schemes, skip)
        timings["range_search_s"] = time.perf_counter() - started
    if equalize:
        mark = time.perf_counter()
        float_model, quantized, recipe["equalization"] = _best_equalization(model, data, num_batches, scheme, skip)
        timings["equalize_s"] = time.perf_counter() - mark
    else:
        float_model = copy.deepcopy(model).eval()
        if quantized is None:
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
        corrected = correct_bias(quantized, float_model, data, num_batches, leave=_learned_in_blocks(recipe))
        recipe["bias_corrected"] = corrected.to_json()
        timings["bias_correction_s"] = time.perf_counter() - mark
        quantized.bias_correction_report = corrected
    if range_search:
        quantized.range_search_report = RangeSearchReport(**recipe["ranges"])
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
    reports = ("range_search_report", "equalization_report", "adaround_report", "bias_correction_report")
    parts = [getattr(model, attr).summary() for attr in reports if getattr(model, attr, None) is not None]
    return "\n".join(parts)
