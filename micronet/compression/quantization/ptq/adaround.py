"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020):
learn, per weight, whether to round down or up, so that the layer's output stays close to the float one.

Per quantized conv/linear layer, in call order, with its weight scale fixed by calibration:

* soft weight  W̃ = s·(clamp(⌊W/s⌋ + h(V) + z, q_min, q_max) − z), with the rectified sigmoid
  h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1), ζ = 1.1, γ = −0.1, and V initialised so that h(V) = W/s − ⌊W/s⌋
  (the soft weight starts at the float weight);
* loss  ‖f(Wx) − f(W̃x̃)‖² + λ·Σ(1 − |2h(V) − 1|^β): x is the float model's input of the layer, x̃ the
  quantized model's (the layers before are already rounded, its input quantizer applied), f the BatchNorm
  the export folds into the layer (if any); λ = 0.01, no regulariser for the first 20% of the iterations,
  then β annealed linearly from 20 to 2 so that h(V) is pushed to 0 or 1;
* then the rounding is made hard (h = 1 where V ≥ 0) and the layer's float weight replaced by its
  dequantized codes s·(q − z): nearest rounding of that weight gives back the learned codes, so the
  ordinary fake-quant forward, checkpoints and the ONNX export carry them unchanged.

Memory is bounded: the inputs and targets of one layer are cached for at most ``max_cache_bytes`` (the
calibration batches are streamed through both models, each stopped at the layer), and every iteration
draws a mini-batch from that cache.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from micronet.compression.quantization.core.integer_bias import batchnorm_factor_and_bias
from micronet.compression.quantization.ptq.layers import LayerUnit, batches, layer_units, run_to
from micronet.errors import QuantizationError

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundOptions:
    """Settings of :func:`adaround`: the paper's, except 1,000 iterations per layer instead of 10,000 (CPU
    time) with a learning rate 10× the paper's 1e-3, so that V can still travel as far."""

    iterations: int = 1000
    batch_size: int = 32
    regularization: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warm_start: float = 0.2
    lr: float = 1e-2
    max_cache_bytes: int = 256 * 2**20
    seed: int = 0

    def check(self) -> None:
        if self.iterations < 1:
            raise QuantizationError(f"AdaRound needs at least 1 iteration per layer (got {self.iterations}): "
                                    "raise --adaround-iters")
        if self.batch_size < 1:
            raise QuantizationError(f"AdaRound's batch size must be at least 1 (got {self.batch_size})")


@dataclass
class AdaRoundReport:
    layers: list[dict[str, Any]] = field(default_factory=list)  # name, images, error before/after, flipped

    def summary(self) -> str:
        lines = [f"AdaRound: {len(self.layers)} layers, {self.layers[0]['iterations'] if self.layers else 0} "
                 "iterations each; reconstruction error (mean squared, cached calibration images) nearest → learned:"]
        lines += [f"  {r['layer']}: {r['error_nearest']:.4g} → {r['error_learned']:.4g} "
                  f"({r['rounded_other_way'] * 100:.1f}% of weights rounded the other way)" for r in self.layers]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"layers": self.layers}


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with rectified_sigmoid(V) = h for h in (0, 1)."""
    p = torch.clamp((h - GAMMA) / (ZETA - GAMMA), 1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


class _Rounding:
    """The per-weight rounding of one layer: ⌊W/s⌋ and the learned offsets V."""

    def __init__(self, layer: nn.Module) -> None:
        quantizer = layer.weight_quantizer
        self.quant_min, self.quant_max = quantizer.quant_min_max
        w = layer.weight.detach().float()
        shape = [1] * w.dim()
        if quantizer.ch_axis is not None:
            shape[quantizer.ch_axis] = -1
        self.scale = quantizer.scale.detach().float().reshape(shape)
        self.zero_point = (quantizer.zero_point.detach().float() if not quantizer.symmetric
                           else torch.zeros_like(quantizer.scale, dtype=torch.float32)).reshape(shape)
        scaled = w * (1.0 / self.scale)  # as fake_quantize computes it
        self.floor = torch.floor(scaled)
        self.nearest = torch.round(scaled)
        self.v = nn.Parameter(_inverse_rectified_sigmoid(scaled - self.floor))

    def weight(self, h: torch.Tensor) -> torch.Tensor:
        codes = torch.clamp(self.floor + h + self.zero_point, self.quant_min, self.quant_max)
        return (codes - self.zero_point) * self.scale

    def soft(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def hard(self) -> torch.Tensor:
        return (self.v.detach() >= 0).float()

    def nearest_weight(self) -> torch.Tensor:
        return self.weight(self.nearest - self.floor)


def _layer_output(unit: LayerUnit, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The unit's float output for an already-quantized input ``x``: the layer, then the BatchNorm after it
    in its eval form (one per-channel affine map, as the export folds it)."""
    layer = unit.layer
    y = F.linear(x, weight) if isinstance(layer, nn.Linear) else layer._conv_forward(x, weight, None)
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if unit.bn is not None:
        factor, shift = batchnorm_factor_and_bias(unit.bn, layer.bias)
        return y * factor.float().reshape(shape) + shift.float().reshape(shape)
    return y if layer.bias is None else y + layer.bias.detach().reshape(shape)


@torch.no_grad()
def _cache(quantized: nn.Module, float_model: nn.Module, unit: LayerUnit, data: Iterable[Any],
           num_batches: int | None, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized input x̃ after the layer's input quantizer, float target) for as many calibration images
    as ``max_bytes`` holds."""
    float_out = float_model.get_submodule(unit.output_name)
    inputs, targets, used = [], [], 0
    for x in batches(data, num_batches):
        q_in = unit.layer.input_quantizer(run_to(quantized, unit.layer, x, want="input"))
        target = run_to(float_model, float_out, x)
        per_image = (q_in[0].numel() + target[0].numel()) * 4
        room = (max_bytes - used) // per_image
        if room <= 0:
            break
        inputs.append(q_in[:room])
        targets.append(target[:room])
        used += per_image * len(inputs[-1])
    return torch.cat(inputs), torch.cat(targets)


def _reconstruction_error(unit: LayerUnit, inputs: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> float:
    total = 0.0
    for start in range(0, len(inputs), 256):
        y = _layer_output(unit, inputs[start:start + 256], weight)
        total += float(((y - targets[start:start + 256]) ** 2).sum(1).sum())
    return total / (targets.numel() / targets.shape[1])


def _beta(options: AdaRoundOptions, step: int) -> float:
    start = options.warm_start * options.iterations
    progress = (step - start) / max(options.iterations - start, 1)
    return options.beta_end + (options.beta_start - options.beta_end) * max(0.0, 1.0 - progress)


def _optimize(unit: LayerUnit, inputs: torch.Tensor, targets: torch.Tensor, options: AdaRoundOptions,
              generator: torch.Generator, bar: Any) -> _Rounding:
    rounding = _Rounding(unit.layer)
    optimizer = torch.optim.Adam([rounding.v], lr=options.lr)
    warm = int(options.warm_start * options.iterations)
    count = len(inputs)
    order = torch.randperm(count, generator=generator)
    position = 0
    for step in range(options.iterations):
        if position + options.batch_size > count:
            order, position = torch.randperm(count, generator=generator), 0
        index = order[position:position + options.batch_size]
        position += options.batch_size
        h = rounding.soft()
        y = _layer_output(unit, inputs[index], rounding.weight(h))
        loss = ((y - targets[index]) ** 2).sum(1).mean()
        if step >= warm:
            beta = _beta(options, step)
            loss = loss + options.regularization * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
    return rounding


def required_images(options: AdaRoundOptions) -> int:
    """The calibration images AdaRound needs: one mini-batch per iteration, drawn from them."""
    return options.batch_size


def adaround(quantized: nn.Module, float_model: nn.Module, data: Iterable[Any], *, num_batches: int | None = None,
             options: AdaRoundOptions | None = None, progress: bool | None = None) -> AdaRoundReport:
    """Learn the rounding of every quantized conv/linear weight of ``quantized`` (calibrated, frozen) against
    the same layers of ``float_model`` on the first ``num_batches`` batches of ``data``; ``quantized``'s
    weights are replaced by their learned dequantized codes, in place."""
    options = options or AdaRoundOptions()
    options.check()
    from tqdm import tqdm

    units = layer_units(quantized)
    report = AdaRoundReport()
    generator = torch.Generator().manual_seed(options.seed)
    show = progress if progress is not None else sys.stderr.isatty()
    was_training = quantized.training, float_model.training
    quantized.eval()
    float_model.eval()
    bar = tqdm(total=options.iterations * len(units), desc="AdaRound", leave=False, disable=not show)
    try:
        for unit in units:
            inputs, targets = _cache(quantized, float_model, unit, data, num_batches, options.max_cache_bytes)
            if len(inputs) < options.batch_size:
                raise QuantizationError(
                    f"AdaRound draws {options.batch_size} calibration images per iteration but only {len(inputs)} "
                    f"were available for {unit.name}: calibrate on more batches (--ptq_batch)")
            bar.set_postfix_str(unit.name)
            rounding = _optimize(unit, inputs, targets, options, generator, bar)
            with torch.no_grad():
                learned = rounding.weight(rounding.hard())
                nearest = rounding.nearest_weight()
                row = {
                    "layer": unit.name, "images": len(inputs), "iterations": options.iterations,
                    "error_nearest": _reconstruction_error(unit, inputs, targets, nearest),
                    "error_learned": _reconstruction_error(unit, inputs, targets, learned),
                    "rounded_other_way": float((rounding.hard() != rounding.nearest - rounding.floor).float().mean()),
                }
                unit.layer.weight.copy_(learned.to(unit.layer.weight.dtype))
            report.layers.append(row)
            del inputs, targets
    finally:
        bar.close()
        quantized.train(was_training[0])
        float_model.train(was_training[1])
    return report

