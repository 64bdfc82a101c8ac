"""Cross-layer equalization and high-bias absorption (Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019), on the float model before ``prepare``.

Two layers joined by a positively homogeneous function f (ReLU, LeakyReLU, identity, max-pool, dropout:
f(x/s) = f(x)/s for s > 0) compute the same function when output channel i of the first is divided by
s_i and input channel i of the second multiplied by s_i. Choosing s_i = sqrt(r1_i·r2_i)/r2_i, with r1_i
the range of the first layer's output channel i and r2_i the range of the second layer's input channel i,
gives both the range sqrt(r1_i·r2_i): channels with tiny ranges no longer waste the codes of a
per-tensor scale (nor, at 4 bits, of a per-channel one), as in depthwise-separable networks. Chains of
three or more layers are iterated until the scales settle. BatchNorms are folded into their convs first
(:func:`micronet.compression.fusion.fuse`), since a BatchNorm in between would normalise the scaling away.

High-bias absorption: equalization can leave large biases in front of a ReLU. Where the BatchNorm that was
folded says channel i's pre-activation is ≈ N(β_i, γ_i²), c_i = max(0, β_i − 3γ_i) is (almost) always
below it, so ReLU(x − c) = ReLU(x) − c; the first layer's bias gives up c_i and the second adds W·c.
Done only where the second layer has no zero padding (padded zeros would be compensated too) and the
path between them is exactly one ReLU.

ReLU6 (and any Hardtanh clipping at 0 and c): after scaling, channel i is clipped at c in the new units, at
c·S_i in the old ones (S_i the total scale of the channel). The function is unchanged where the channel never
reaches c·min(1, S_i): with a bound m_i on the pre-activation, a channel with m_i < c may be scaled with
S_i ≥ m_i/c, and a channel that reaches the clip (m_i ≥ c) keeps S_i = 1. The bound is the folded
BatchNorm's β_i + 3γ_i (the one high-bias absorption uses), raised to the largest pre-activation seen on
calibration data when ``calibration`` is given: on a trained MobileNetV2 the BatchNorm bound alone was
exceeded often enough that the equalized float model lost 0.15 pt of accuracy; with the observed maxima it
kept it. Pairs joined by a clip with no folded BatchNorm to bound the first layer's output are left as they
are and listed in the report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from micronet.compression.quantization.core.scheme import QuantScheme
from micronet.compression.quantization.ptq.noise_scales import InputStatistics, noise_minimizing_scale
from micronet.errors import QuantizationError

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class EqualizationReport:
    """What :func:`equalize` did: equalized pairs, pairs left alone and why, biases absorbed."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, reason)
    absorbed: list[tuple[str, str]] = field(default_factory=list)
    folded_bn: int = 0
    iterations: int = 0
    objective: str = "ranges"  # "ranges": classic; "noise": for per-channel weights (noise_scales); "none"
    chosen: str | None = None  # post_training_quantize: the scaling kept ("ranges", "noise" or "none")
    output_errors: dict[str, float] = field(default_factory=dict)  # ... and each one's error on calibration data
    held_by_clip: list[tuple[str, int]] = field(default_factory=list)  # (layer, channels that reach a ReLU6 clip)

    def summary(self) -> str:
        choice = ""
        if self.output_errors:
            errors = ", ".join(f"{name} {error:.3g}" for name, error in self.output_errors.items())
            choice = f"\n  chosen by the quantized model's output error on the calibration data: {errors}"
        if self.chosen == "none":
            return "cross-layer equalization: not applied, plain PTQ left the least error" + choice
        how = f"in {self.iterations} sweeps" if self.objective == "ranges" else "for the least rounding noise"
        line = (f"cross-layer equalization: {len(self.pairs)} layer pairs equalized {how}, "
                f"{self.folded_bn} BatchNorms folded first, high bias absorbed into {len(self.absorbed)} layers") + choice
        held = [f"  {name}: {count} channels reach the ReLU6 clip and keep their scale" for name, count in self.held_by_clip]
        return "\n".join([line] + held + [f"  not equalized: {name} ({reason})" for name, reason in self.skipped])

    def to_json(self) -> dict:
        return {"pairs": [list(p) for p in self.pairs], "absorbed": [list(p) for p in self.absorbed],
                "skipped": [list(p) for p in self.skipped], "folded_bn": self.folded_bn, "iterations": self.iterations,
                "objective": self.objective, "chosen": self.chosen, "output_errors": self.output_errors,
                "held_by_clip": [list(p) for p in self.held_by_clip]}


def _bn_statistics(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(β, |γ|) of each BatchNorm that follows a conv, keyed by the conv's name: the mean and standard
    deviation of its output, what high-bias absorption needs once the BatchNorm is folded."""
    from micronet.compression.fusion import _candidates

    modules = dict(model.named_modules())
    stats = {}
    for conv_name, bn_name, _, problem in _candidates(model)[0]:
        bn = modules[bn_name]
        if conv_name is None or problem or bn.weight is None or bn.bias is None:
            continue
        stats[conv_name] = (bn.bias.detach().double().clone(), bn.weight.detach().double().abs().clone())
    return stats


def _follow(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node | None, list[nn.Module], str]:
    """The weighted layer that alone consumes ``node`` through homogeneous modules, the modules passed and
    why there is none."""
    passed: list[nn.Module] = []
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None, passed, "its output has several consumers" if users else "its output is the model's"
        user = users[0]
        module = modules.get(user.target) if user.op == "call_module" else None
        if module is None:
            return None, passed, f"followed by {user.target if user.op != 'call_module' else user.op}"
        if isinstance(module, _WEIGHTED):
            if user.args[0] is not node:
                return None, passed, "feeds a layer other than as its input"
            return user, passed, ""
        if isinstance(module, nn.Hardtanh) and module.min_val != 0:
            return None, passed, f"followed by {type(module).__name__} clipping below at {module.min_val}, not 0"
        if isinstance(module, nn.Hardtanh):  # ReLU6 included: handled by limiting the scales (module docstring)
            passed.append(module)
            node = user
            continue
        if not isinstance(module, _HOMOGENEOUS):
            return None, passed, f"followed by {type(module).__name__}, which does not commute with scaling"
        passed.append(module)
        node = user


def _pairs(model: nn.Module, report: EqualizationReport) -> list[tuple[str, str, list[nn.Module]]]:
    from micronet.compression.fusion import _Tracer

    modules = dict(model.named_modules())
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - an untraceable model is reported, not equalized
        report.skipped.append(("(model)", f"torch.fx could not trace it: {type(exc).__name__}"))
        return []
    found = []
    for node in graph.nodes:
        first = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(first, _WEIGHTED):
            continue
        second_node, passed, why = _follow(node, modules)
        second = None if second_node is None else modules[second_node.target]
        if second is not None and isinstance(first, nn.Linear) != isinstance(second, nn.Linear):
            why = "a convolution feeding a linear layer (the channel layout changes)"
        elif second is not None and _in_channels(second) != _out_channels(first):
            why = "channel counts differ"
        if why:
            if second_node is not None or "model's" not in why:
                report.skipped.append((node.target, why))
            continue
        found.append((node.target, second_node.target, passed))
    return found


def _out_channels(layer: nn.Module) -> int:
    return layer.weight.shape[0]


def _in_channels(layer: nn.Module) -> int:
    return layer.weight.shape[1] * getattr(layer, "groups", 1)


def _output_ranges(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().double().abs().flatten(1).amax(1)


def _grouped(layer: nn.Module) -> torch.Tensor:
    """The weight as (groups, out per group, in per group, kernel elements)."""
    groups = getattr(layer, "groups", 1)
    w = layer.weight.detach().double()
    return w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)


def _input_ranges(layer: nn.Module) -> torch.Tensor:
    return _grouped(layer).abs().amax(dim=(1, 3)).reshape(-1)


@torch.no_grad()
def _scale_pair(first: nn.Module, second: nn.Module, s: torch.Tensor) -> None:
    """Divide ``first``'s output channels by ``s`` and multiply ``second``'s input channels by it."""
    shape = (-1,) + (1,) * (first.weight.dim() - 1)
    first.weight.copy_((first.weight.double() / s.reshape(shape)).to(first.weight.dtype))
    if first.bias is not None:
        first.bias.copy_((first.bias.double() / s).to(first.bias.dtype))
    groups = getattr(second, "groups", 1)
    scaled = _grouped(second) * s.reshape(groups, 1, -1, 1)
    second.weight.copy_(scaled.reshape(second.weight.shape).to(second.weight.dtype))


def _equalization_scale(first: nn.Module, second: nn.Module) -> torch.Tensor:
    r1, r2 = _output_ranges(first), _input_ranges(second)
    s = torch.sqrt(r1 * r2) / r2
    return torch.where((r1 > 0) & (r2 > 0) & torch.isfinite(s), s, torch.ones_like(s))


def _no_padding(layer: nn.Module) -> bool:
    padding = getattr(layer, "padding", 0)
    return padding == "valid" or all(p == 0 for p in (padding if isinstance(padding, tuple) else (padding,)))


@torch.no_grad()
def _absorb(first: nn.Module, second: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> bool:
    """Move c = max(0, β − 3γ) from ``first``'s bias into ``second``'s (see the module docstring)."""
    c = torch.clamp(mean - 3 * std, min=0)
    if first.bias is None or not bool((c > 0).any()):
        return False
    groups = getattr(second, "groups", 1)
    added = (_grouped(second).sum(dim=3) * c.reshape(groups, 1, -1)).sum(dim=2).reshape(-1)
    if second.bias is None:
        return False
    first.bias.copy_((first.bias.double() - c).to(first.bias.dtype))
    second.bias.copy_((second.bias.double() + added).to(second.bias.dtype))
    return True


def _clips(passed: list[nn.Module]) -> list[float]:
    return [float(m.max_val) for m in passed if isinstance(m, nn.Hardtanh)]


@torch.no_grad()
def _observe(model: nn.Module, outputs_of: list[str], inputs_of: list[str],
             data: Iterable[torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, InputStatistics]]:
    """Over ``data``: the largest output per channel of each layer in ``outputs_of`` and the per-channel
    statistics of the input of each layer in ``inputs_of`` (float64)."""
    layers = dict(model.named_modules())
    maxima: dict[str, torch.Tensor] = {}
    sums: dict[str, list[torch.Tensor]] = {}  # high, low, sum of squares, count

    def channels(t: torch.Tensor) -> torch.Tensor:
        return t.detach().transpose(0, 1).reshape(t.shape[1], -1).double()

    def record_output(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            peak = channels(output).amax(dim=1)
            maxima[name] = peak if name not in maxima else torch.maximum(maxima[name], peak)
        return hook

    def record_input(name: str):
        def hook(_module: nn.Module, inputs: Any) -> None:
            x = channels(inputs[0])
            seen = [x.amax(dim=1).clamp_min(0), x.amin(dim=1).clamp_max(0), x.pow(2).sum(dim=1),
                    torch.tensor(float(x.shape[1]), dtype=torch.float64)]
            if name in sums:
                old = sums[name]
                seen = [torch.maximum(old[0], seen[0]), torch.minimum(old[1], seen[1]), old[2] + seen[2], old[3] + seen[3]]
            sums[name] = seen
        return hook

    handles = [layers[name].register_forward_hook(record_output(name)) for name in outputs_of]
    handles += [layers[name].register_forward_pre_hook(record_input(name)) for name in inputs_of]
    training = model.training
    model.eval()
    try:
        for x in data:
            model(x)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    statistics = {name: InputStatistics(high, low, total / count) for name, (high, low, total, count) in sums.items()}
    return maxima, statistics


def _clip_limits(pairs, stats, report: EqualizationReport,
                 observed: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per first layer of a pair joined by a clip: (channels that reach the clip, lowest total scale of the
    others), from its folded BatchNorm's bound β + 3γ or the largest output ``observed`` on calibration data,
    whichever is higher (module docstring); pairs without a BatchNorm are reported."""
    limits = {}
    for first_name, _, passed in pairs:
        clips = _clips(passed)
        if not clips:
            continue
        if first_name not in stats:
            report.skipped.append((first_name, "ReLU6 clips at a fixed value and no folded BatchNorm bounds this "
                                               "layer's output, so rescaling could move the clip"))
            continue
        mean, std = stats[first_name]
        clip = min(clips)
        bound = mean + 3 * std
        if first_name in observed:
            bound = torch.maximum(bound, observed[first_name])
        reaches = bound >= clip
        limits[first_name] = (reaches, torch.clamp(bound / clip, min=0.0))
        if bool(reaches.any()):
            report.held_by_clip.append((first_name, int(reaches.sum())))
    return limits


def _within_clip(s: torch.Tensor, total: torch.Tensor, reaches: torch.Tensor, lowest: torch.Tensor) -> torch.Tensor:
    """``s`` changed so that the channel's total scale stays 1 where it reaches the clip and ≥ ``lowest`` elsewhere."""
    wanted = torch.where(reaches, torch.ones_like(total), torch.maximum(total * s, lowest))
    return wanted / total


def _equalize_ranges(pairs, layers, limits, scales, report: EqualizationReport, max_sweeps: int,
                     tolerance: float) -> None:
    """Classic equalization: sweep the pairs until the scales settle (module docstring)."""
    for sweep in range(1, max_sweeps + 1):
        report.iterations = sweep
        largest = 0.0
        for first_name, second_name, _ in pairs:
            s = _equalization_scale(layers[first_name], layers[second_name])
            if first_name in limits:
                s = _within_clip(s, scales[first_name], *limits[first_name])
            _scale_pair(layers[first_name], layers[second_name], s)
            scales[first_name] *= s
            largest = max(largest, float(s.log().abs().max()))
        if largest < tolerance:
            break


def _minimize_noise(pairs, layers, limits, scales, statistics: dict[str, InputStatistics], scheme: QuantScheme,
                    report: EqualizationReport) -> None:
    """Per-channel weights: each pair scaled once by :func:`.noise_scales.noise_minimizing_scale`."""
    report.iterations = 1
    report.objective = "noise"
    for first_name, second_name, _ in pairs:
        first, second = layers[first_name], layers[second_name]
        fixed, lowest = limits.get(first_name, (None, None))
        s = noise_minimizing_scale(_grouped(second), statistics[second_name], _equalization_scale(first, second),
                                   w_bits=scheme.weight.bits, a_bits=scheme.activation.bits,
                                   w_symmetric=scheme.weight.symmetric, fixed=fixed, lowest=lowest)
        _scale_pair(first, second, s)
        scales[first_name] *= s


@torch.no_grad()
def equalize(model: nn.Module, *, max_sweeps: int = 100, tolerance: float = 1e-6,
             absorb_high_bias: bool = True, calibration: Iterable[torch.Tensor] | None = None,
             scheme: QuantScheme | None = None) -> tuple[nn.Module, EqualizationReport]:
    """A float copy of ``model`` with BatchNorms folded, weights equalized across layer pairs and high
    biases absorbed; its function is unchanged (up to float rounding, and to the rare pre-activations that
    high-bias absorption assumes above β − 3γ or that exceed a ReLU6 channel's bound). ``calibration``
    (input batches) raises those ReLU6 bounds to what the data reaches. Given the ``scheme`` the model will be
    quantized with and per-channel weights, the scales minimise the pair's rounding noise on ``calibration``
    (:mod:`.noise_scales`) instead of evening out weight ranges. The copy carries ``fusion_record``
    (checkpoints rebuild the folded structure) and ``model`` is not modified."""
    from micronet.compression.fusion import fuse

    by_noise = scheme is not None and scheme.weight.per_channel
    if by_noise and calibration is None:
        raise QuantizationError("equalization for per-channel weights chooses its scales from the data: pass "
                                "calibration batches, or a scheme with per-tensor weights")
    report = EqualizationReport()
    stats = _bn_statistics(model)
    fused, fusion = fuse(model)
    report.folded_bn = len(fusion.fused)
    folded = {layer.conv for layer in fusion.fused}
    stats = {name: value for name, value in stats.items() if name in folded}
    pairs = _pairs(fused, report)
    clipped = [first for first, _, passed in pairs if _clips(passed) and first in stats]
    observed, inputs = {}, {}
    if calibration is not None and (clipped or by_noise):
        observed, inputs = _observe(fused, clipped, [second for _, second, _ in pairs] if by_noise else [], calibration)
    limits = _clip_limits(pairs, stats, report, observed)
    pairs = [pair for pair in pairs if pair[0] in limits or not _clips(pair[2])]
    layers = dict(fused.named_modules())
    scales = {name: torch.ones(_out_channels(layers[name]), dtype=torch.float64) for name, _, _ in pairs}
    if by_noise:
        _minimize_noise(pairs, layers, limits, scales, inputs, scheme, report)
    else:
        _equalize_ranges(pairs, layers, limits, scales, report, max_sweeps, tolerance)
    report.pairs = [(a, b) for a, b, _ in pairs]
    if absorb_high_bias:
        for first_name, second_name, passed in pairs:
            second = layers[second_name]
            relus = [m for m in passed if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
            if first_name not in stats or len(relus) != 1 or not isinstance(relus[0], nn.ReLU) or not _no_padding(second):
                continue
            mean, std = (t / scales[first_name] for t in stats[first_name])
            if _absorb(layers[first_name], second, mean, std):
                report.absorbed.append((first_name, second_name))
    fused.equalization_report = report
    return fused, report
