"""Empirical bias correction (Nagel et al. 2019, §4.2; Finkelstein et al. 2019): quantizing a layer's
weights (and its input) shifts the expected value of its output channels, E[ŷ] − E[y] = ε, and the layers
after it see that shift as a systematic error. Measured on calibration data, layer by layer in call order
(each measurement sees the corrections made before it), the shift is subtracted where the layer's bias
lives: from the conv's own bias, or, when a BatchNorm follows that the export folds into the conv, added to
that BatchNorm's running mean (μ' = μ + ε/(γ/σ) subtracts exactly ε after the BatchNorm).

The measurement runs the quantized model in eval mode, so it sees the int32-grid biases the deployed
model adds (:mod:`~micronet.compression.quantization.core.integer_bias`); the corrected bias is again
rounded to that grid, so the shift left is at most half a grid step s_x·s_w per channel and the exported
model computes exactly what the corrected fake-quant model does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from micronet.compression.quantization.core.integer_bias import batchnorm_factor_and_bias
from micronet.compression.quantization.ptq.layers import LayerUnit, batches, channel_mean_sum, layer_units, run_to


@dataclass
class BiasCorrectionReport:
    corrected: list[tuple[str, float]] = field(default_factory=list)  # (layer, largest |shift| removed)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        worst = max((shift for _, shift in self.corrected), default=0.0)
        line = f"bias correction: {len(self.corrected)} layers corrected (largest channel shift removed {worst:.3g})"
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.skipped:
            by_reason.setdefault(reason, []).append(name)
        return "\n".join([line] + [f"  not corrected ({reason}): {', '.join(names)}" for reason, names in by_reason.items()])

    def to_json(self) -> dict:
        return {"corrected": [list(c) for c in self.corrected], "skipped": [list(s) for s in self.skipped]}


@torch.no_grad()
def output_shift(quantized: nn.Module, float_model: nn.Module, unit: LayerUnit, data: Iterable[Any],
                 num_batches: int | None = None) -> torch.Tensor:
    """E[quantized output] − E[float output] per channel of ``unit`` over the batches of ``data``."""
    float_module = float_model.get_submodule(unit.output_name)
    total, count = None, 0
    for x in batches(data, num_batches):
        q = run_to(quantized, unit.bn or unit.layer, x)
        f = run_to(float_model, float_module, x)
        diff = channel_mean_sum(q) - channel_mean_sum(f)
        total = diff if total is None else total + diff
        count += q.numel() // q.shape[1]
    if total is None:
        raise ValueError("no calibration batch")
    return total / count


def _rounding_offset(unit: LayerUnit) -> torch.Tensor | float:
    """What the eval forward adds beyond the float bias, per channel: the int32 rounding of the bias (or of
    the folded BatchNorm shift), which the correction must not count as a shift of the weights."""
    if unit.bn is not None:
        folded = unit.bn.integer_shift()
        return 0.0 if folded is None else folded[2] - folded[1]
    bias = unit.layer.bias
    if bias is None:
        return 0.0
    return (unit.layer.integer_bias(bias).detach().double() - bias.detach().double())


@torch.no_grad()
def _remove_shift(unit: LayerUnit, shift: torch.Tensor) -> str:
    """Move the unit's float bias by −``shift`` (its rounding to the int32 grid then leaves at most half a
    grid step); the reason it cannot, or ''."""
    if unit.bn is not None:
        factor, _ = batchnorm_factor_and_bias(unit.bn, None)
        usable = factor != 0
        mean = unit.bn.running_mean
        mean.copy_((mean.double() + torch.where(usable, shift / torch.where(usable, factor, 1.0), 0.0)).to(mean.dtype))
        return ""
    bias = unit.layer.bias
    if bias is None:
        return "no bias to correct (a layer without bias and without BatchNorm)"
    bias.copy_((bias.double() - shift).to(bias.dtype))
    return ""


@torch.no_grad()
def correct_bias(quantized: nn.Module, float_model: nn.Module, data: Iterable[Any],
                 num_batches: int | None = None, *, leave: dict[str, str] | None = None) -> BiasCorrectionReport:
    """Remove, layer by layer, the mean output shift of each quantized conv/linear layer of ``quantized``
    (calibrated, frozen) against the same layer of ``float_model`` (the float model it was prepared from,
    with the same module names). ``quantized`` is modified in place. ``leave`` maps layers not to correct to
    the reason the report gives."""
    leave = leave or {}
    report = BiasCorrectionReport()
    was_training = quantized.training, float_model.training
    quantized.eval()
    float_model.eval()
    try:
        for unit in layer_units(quantized):
            if unit.name in leave:
                report.skipped.append((unit.name, leave[unit.name]))
                continue
            shift = output_shift(quantized, float_model, unit, data, num_batches)
            reason = _remove_shift(unit, shift - _rounding_offset(unit))
            if reason:
                report.skipped.append((unit.name, reason))
            else:
                report.corrected.append((unit.name, float(shift.abs().max())))
    finally:
        quantized.train(was_training[0])
        float_model.train(was_training[1])
    return report
