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

Block reconstruction (``blocks=True``, after BRECQ, Li et al. 2021): the layers of one residual or
inverted-residual block (a module holding 2-4 quantized layers, each called once) learn their roundings
together against the block's float output, so a rounding error of the first conv can be repaid by the
second; the loss is the same squared error (not BRECQ's Fisher weighting), the block runs with its
activation quantizers on. Layers outside such blocks are reconstructed one by one as above.

Memory is bounded: the inputs and targets of one layer (or block) are cached for at most ``max_cache_bytes`` (the
calibration batches are streamed through both models, each stopped at the layer), and every iteration
draws a mini-batch from that cache.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from micronet.compression.quantization.core.integer_bias import batchnorm_factor_and_bias
from micronet.compression.quantization.ptq.layers import LayerUnit, batches, layer_units, run_to
from micronet.errors import QuantizationError

ZETA, GAMMA = 1.1, -0.1

#: The most quantized layers a module may hold to be reconstructed as one block: a residual block's two
#: convs and its shortcut, an inverted residual's three, a bottleneck's three and shortcut. A larger module
#: is a stage or a whole network, where joint reconstruction overfits the calibration images (BRECQ, Table 1).
MAX_BLOCK_LAYERS = 4


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
    blocks: bool = False  # learn each residual block's layers together (block reconstruction)

    def check(self) -> None:
        if self.iterations < 1:
            raise QuantizationError(f"AdaRound needs at least 1 iteration per layer (got {self.iterations}): "
                                    "raise --adaround-iters")
        if self.batch_size < 1:
            raise QuantizationError(f"AdaRound's batch size must be at least 1 (got {self.batch_size})")


@dataclass
class AdaRoundReport:
    # One row per reconstruction: "layer" (the layer's or block's name), "block_layers" (a block's layers),
    # images, iterations, error before/after, share of weights rounded the other way.
    layers: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        blocks = sum(1 for r in self.layers if r.get("block_layers"))
        counted = f"{len(self.layers) - blocks} layers" + (f" and {blocks} blocks" if blocks else "")
        lines = [f"AdaRound: {counted}, {self.layers[0]['iterations'] if self.layers else 0} iterations each; "
                 "reconstruction error (mean squared, cached calibration images) nearest → learned:"]
        lines += [f"  {_row_name(r)}: {r['error_nearest']:.4g} → {r['error_learned']:.4g} "
                  f"({r['rounded_other_way'] * 100:.1f}% of weights rounded the other way)" for r in self.layers]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"layers": self.layers}


def _row_name(row: dict[str, Any]) -> str:
    block = row.get("block_layers")
    return f"{row['layer']} (block of {', '.join(block)})" if block else row["layer"]


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


@dataclass(frozen=True)
class _Step:
    """What one reconstruction learns: one layer against its output, or a block's layers against the
    block's output (``block`` is then the block's name)."""

    units: tuple[LayerUnit, ...]
    block: str | None = None

    @property
    def name(self) -> str:
        return self.block or self.units[0].name

    def row(self) -> dict[str, Any]:
        prefix = f"{self.block}."
        return {"layer": self.name, "block_layers": [u.name.removeprefix(prefix) for u in self.units]} if self.block \
            else {"layer": self.name}


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _block_of(unit: LayerUnit, modules: dict[str, nn.Module], units_in: Counter) -> str | None:
    """The innermost module above ``unit`` that is not a container and holds 2 to MAX_BLOCK_LAYERS units."""
    parts = unit.name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:depth])
        if isinstance(modules[name], _CONTAINERS):
            continue
        if units_in[name] >= 2:
            return name if units_in[name] <= MAX_BLOCK_LAYERS else None
    return None


@torch.no_grad()
def _runnable_alone(model: nn.Module, blocks: dict[str, list[LayerUnit]], x: torch.Tensor) -> set[str]:
    """The blocks that one forward of ``model`` on ``x`` calls exactly once, with one tensor, calling each of
    their layers exactly once. (A model whose functional ops ``prepare`` rewrote as a graph calls its layers
    directly, never the blocks' forwards; a layer called twice has no single input to reconstruct from.)"""
    modules = dict(model.named_modules())
    calls: Counter = Counter()
    arity: dict[str, int] = {}

    def counter(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[name] += 1
            arity[name] = len(args) + len(kwargs)
        return hook

    watched = {name: modules[name] for name in blocks}
    watched.update({unit.name: unit.layer for members in blocks.values() for unit in members})
    handles = [module.register_forward_pre_hook(counter(name), with_kwargs=True) for name, module in watched.items()]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name for name, members in blocks.items()
            if calls[name] == 1 and arity[name] == 1 and all(calls[unit.name] == 1 for unit in members)}


def reconstruction_steps(model: nn.Module, x: torch.Tensor | None, *, blocks: bool) -> list[_Step]:
    """The layers to reconstruct, in call order, grouped into blocks where ``blocks`` asks for it and the
    block can be run alone (probed on ``x``, one calibration batch: see :func:`_runnable_alone`)."""
    units = layer_units(model)
    if not blocks or x is None:
        return [_Step((unit,)) for unit in units]
    modules = dict(model.named_modules())
    units_in = Counter(".".join(unit.name.split(".")[:depth]) for unit in units
                       for depth in range(1, unit.name.count(".") + 1))
    owner = {unit.name: _block_of(unit, modules, units_in) for unit in units}
    members: dict[str, list[LayerUnit]] = {}
    for unit in units:
        if owner[unit.name] is not None:
            members.setdefault(owner[unit.name], []).append(unit)
    runnable = _runnable_alone(model, members, x)
    steps: list[_Step] = []
    for unit in units:
        block = owner[unit.name]
        if block not in runnable:
            steps.append(_Step((unit,)))
        elif not steps or steps[-1].block != block:
            steps.append(_Step((unit,), block))
        else:
            steps[-1] = _Step(steps[-1].units + (unit,), block)
    return steps


@contextmanager
def _weights_in_use(layers: list[nn.Module], weights: list[torch.Tensor]) -> Iterator[None]:
    """Make each layer's forward use the given weight in place of its quantized weight."""
    for layer, weight in zip(layers, weights):
        layer.quantized_weight = lambda weight=weight: weight
    try:
        yield
    finally:
        for layer in layers:
            del layer.quantized_weight


def _forward(step: _Step, quantized: nn.Module) -> Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]:
    """The step's output for cached inputs and candidate weights: the layer (and its BatchNorm) alone, or
    the quantized block with those weights in its layers."""
    if step.block is None:
        return lambda x, weights: _layer_output(step.units[0], x, weights[0])
    block = quantized.get_submodule(step.block)
    layers = [unit.layer for unit in step.units]

    def run(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        with _weights_in_use(layers, weights):
            return block(x)
    return run


@torch.no_grad()
def _cache(quantized: nn.Module, float_model: nn.Module, step: _Step, data: Iterable[Any],
           num_batches: int | None, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized input, float target) for as many calibration images as ``max_bytes`` holds: a layer's
    input after its input quantizer and its float output, or a block's input and its float output."""
    if step.block is None:
        unit = step.units[0]
        float_out = float_model.get_submodule(unit.output_name)

        def quantized_input(x: torch.Tensor) -> torch.Tensor:
            return unit.layer.input_quantizer(run_to(quantized, unit.layer, x, want="input"))
    else:
        block = quantized.get_submodule(step.block)
        float_out = float_model.get_submodule(step.block)

        def quantized_input(x: torch.Tensor) -> torch.Tensor:
            return run_to(quantized, block, x, want="input")
    inputs, targets, used = [], [], 0
    for x in batches(data, num_batches):
        q_in = quantized_input(x)
        target = run_to(float_model, float_out, x)
        per_image = (q_in[0].numel() + target[0].numel()) * 4
        room = (max_bytes - used) // per_image
        if room <= 0:
            break
        inputs.append(q_in[:room])
        targets.append(target[:room])
        used += per_image * len(inputs[-1])
    return torch.cat(inputs), torch.cat(targets)


def _reconstruction_error(forward: Callable, inputs: torch.Tensor, targets: torch.Tensor,
                          weights: list[torch.Tensor]) -> float:
    total = 0.0
    for start in range(0, len(inputs), 256):
        y = forward(inputs[start:start + 256], weights)
        total += float(((y - targets[start:start + 256]) ** 2).sum(1).sum())
    return total / (targets.numel() / targets.shape[1])


def _beta(options: AdaRoundOptions, step: int) -> float:
    start = options.warm_start * options.iterations
    progress = (step - start) / max(options.iterations - start, 1)
    return options.beta_end + (options.beta_start - options.beta_end) * max(0.0, 1.0 - progress)


def _optimize(roundings: list[_Rounding], forward: Callable, inputs: torch.Tensor, targets: torch.Tensor,
              options: AdaRoundOptions, generator: torch.Generator, bar: Any) -> None:
    optimizer = torch.optim.Adam([r.v for r in roundings], lr=options.lr)
    warm = int(options.warm_start * options.iterations)
    count = len(inputs)
    order = torch.randperm(count, generator=generator)
    position = 0
    for step in range(options.iterations):
        if position + options.batch_size > count:
            order, position = torch.randperm(count, generator=generator), 0
        index = order[position:position + options.batch_size]
        position += options.batch_size
        soft = [r.soft() for r in roundings]
        y = forward(inputs[index], [r.weight(h) for r, h in zip(roundings, soft)])
        loss = ((y - targets[index]) ** 2).sum(1).mean()
        if step >= warm:
            beta = _beta(options, step)
            loss = loss + options.regularization * sum((1 - (2 * h - 1).abs().pow(beta)).sum() for h in soft)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)


def required_images(options: AdaRoundOptions) -> int:
    """The calibration images AdaRound needs: one mini-batch per iteration, drawn from them."""
    return options.batch_size


def _reconstruct(step: _Step, quantized: nn.Module, float_model: nn.Module, data: Iterable[Any],
                 num_batches: int | None, options: AdaRoundOptions, generator: torch.Generator,
                 bar: Any) -> dict[str, Any]:
    """Learn the step's roundings, write the learned codes into its layers' weights; the report row."""
    inputs, targets = _cache(quantized, float_model, step, data, num_batches, options.max_cache_bytes)
    if len(inputs) < options.batch_size:
        raise QuantizationError(
            f"AdaRound draws {options.batch_size} calibration images per iteration but only {len(inputs)} "
            f"were available for {step.name}: calibrate on more batches (--ptq_batch)")
    bar.set_postfix_str(step.name)
    roundings = [_Rounding(unit.layer) for unit in step.units]
    forward = _forward(step, quantized)
    _optimize(roundings, forward, inputs, targets, options, generator, bar)
    with torch.no_grad():
        learned = [r.weight(r.hard()) for r in roundings]
        flipped = sum(float((r.hard() != r.nearest - r.floor).sum()) for r in roundings)
        row = {
            **step.row(), "images": len(inputs), "iterations": options.iterations,
            "error_nearest": _reconstruction_error(forward, inputs, targets, [r.nearest_weight() for r in roundings]),
            "error_learned": _reconstruction_error(forward, inputs, targets, learned),
            "rounded_other_way": flipped / sum(r.v.numel() for r in roundings),
        }
        for unit, weight in zip(step.units, learned):
            unit.layer.weight.copy_(weight.to(unit.layer.weight.dtype))
    return row


def adaround(quantized: nn.Module, float_model: nn.Module, data: Iterable[Any], *, num_batches: int | None = None,
             options: AdaRoundOptions | None = None, progress: bool | None = None) -> AdaRoundReport:
    """Learn the rounding of every quantized conv/linear weight of ``quantized`` (calibrated, frozen) against
    the same layers (or blocks, ``options.blocks``) of ``float_model`` on the first ``num_batches`` batches
    of ``data``; ``quantized``'s weights are replaced by their learned dequantized codes, in place."""
    options = options or AdaRoundOptions()
    options.check()
    from tqdm import tqdm

    report = AdaRoundReport()
    generator = torch.Generator().manual_seed(options.seed)
    show = progress if progress is not None else sys.stderr.isatty()
    was_training = quantized.training, float_model.training
    quantized.eval()
    float_model.eval()
    try:
        sample = next(batches(data, num_batches), None) if options.blocks else None
        steps = reconstruction_steps(quantized, sample, blocks=options.blocks)
        with tqdm(total=options.iterations * len(steps), desc="AdaRound", leave=False, disable=not show) as bar:
            for step in steps:
                report.layers.append(_reconstruct(step, quantized, float_model, data, num_batches, options,
                                                  generator, bar))
    finally:
        quantized.train(was_training[0])
        float_model.train(was_training[1])
    return report
