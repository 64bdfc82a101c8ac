"""prepare / calibrate / freeze: turn a float model into a fake-quantized one and move it between modes.

``prepare`` (1) rewrites functional calls (``x + y``, ``torch.cat``, ``F.relu`` ...) into modules with a
torch.fx pass when the model is traceable, (2) folds Conv2d→BatchNorm2d pairs into a BN-folding QAT conv
when the scheme asks for it, and (3) swaps modules through explicit mapping tables. Everything it could
not quantize is listed in ``model.quantization_report`` — nothing is skipped silently.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from micronet.compression.quantization.core.integer_bias import IntegerBiasBatchNorm2d
from micronet.compression.quantization.core.modules import (
    ACTIVATION_MAPPING,
    JOIN_MAPPING,
    POOL_MAPPING,
    WEIGHTED_MAPPING,
    QuantizedModule,
    WeightedQuantizedModule,
)
from micronet.compression.quantization.core.quantizers import CALIBRATE, FROZEN, QAT, Quantizer, is_prepared, quantizers
from micronet.compression.quantization.core.scheme import QuantScheme
from micronet.errors import ConfigError, QuantizationError
from micronet.models.layers import ChannelBias
from micronet.models.registry import attach_arch, find_arch

_NORMALIZATION = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


@dataclass
class QuantizationReport:
    """What ``prepare`` did: quantized modules, float modules and why, functional ops left in float."""

    scheme: str
    quantized: list[tuple[str, str]] = field(default_factory=list)  # (module name, quantized type)
    folded_bn: list[tuple[str, str]] = field(default_factory=list)  # (conv name, bn name)
    kept_float: list[tuple[str, str]] = field(default_factory=list)  # (module name, reason)
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (module name, type) with weights we cannot quantize
    functional: list[tuple[str, str]] = field(default_factory=list)  # (graph node, op) left as float functional calls
    traced: bool = False
    trace_error: str | None = None
    # (module name, why) for binarized layers whose input is not a ±1 sign activation
    real_valued_inputs: list[tuple[str, str]] = field(default_factory=list)

    def count(self, type_name: str) -> int:
        return sum(1 for _, t in self.quantized if t == type_name)

    def summary(self) -> str:
        lines = [f"scheme {self.scheme}: {len(self.quantized)} modules quantized, {len(self.folded_bn)} BatchNorms folded"]
        by_type: dict[str, int] = {}
        for _, t in self.quantized:
            by_type[t] = by_type.get(t, 0) + 1
        lines += [f"  {t}: {n}" for t, n in sorted(by_type.items())]
        lines += [f"  float: {name} ({reason})" for name, reason in self.kept_float]
        lines += [f"  unsupported layer left in float: {name} ({t})" for name, t in self.unsupported]
        lines += [f"  functional op left in float: {node} ({op})" for node, op in self.functional]
        lines += [f"  binarized layer with real-valued inputs: {name} ({why})" for name, why in self.real_valued_inputs]
        if not self.traced:
            lines.append(f"  torch.fx could not trace the model, functional ops were not converted: {self.trace_error}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {k: (list(map(list, v)) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


def _mapping(scheme: QuantScheme) -> dict[type[nn.Module], type[QuantizedModule]]:
    mapping: dict[type[nn.Module], type[QuantizedModule]] = dict(WEIGHTED_MAPPING)
    if scheme.quantize_joins:
        mapping.update(JOIN_MAPPING)
    if scheme.quantize_pools:
        mapping.update({k: v for k, v in POOL_MAPPING.items() if not issubclass(k, nn.MaxPool2d)})
    if scheme.quantize_max_pools:
        mapping.update({k: v for k, v in POOL_MAPPING.items() if issubclass(k, nn.MaxPool2d)})
    mapping.update({k: v for k, v in ACTIVATION_MAPPING.items() if k.__name__ in scheme.quantize_activations})
    return mapping


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def _check_skip(skip: Iterable[str], known: set[str], model: nn.Module) -> None:
    """Refuse skip entries that name no module: a typo would otherwise quantize the layer silently."""
    unknown = [name for name in skip if name not in known or not name]
    if unknown:
        import difflib

        weighted = [n for n, m in model.named_modules() if type(m) in WEIGHTED_MAPPING]
        hints = [f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, known, 1)) else name
                 for name in unknown]
        raise ConfigError(f"skip names no module of the model: {', '.join(hints)}; its conv/linear layers are "
                          f"{', '.join(weighted[:8])}" + (f" and {len(weighted) - 8} more" if len(weighted) > 8 else ""))


def _modularize(model: nn.Module, report: QuantizationReport) -> nn.Module:
    from micronet.graph import modularize

    rewritten, graph_report = modularize(model, inplace=True)
    report.traced = graph_report.traced
    report.trace_error = graph_report.trace_error
    report.functional = [tuple(x) for x in graph_report.left_functional]
    if graph_report.converted:
        arch = find_arch(model)
        if arch is not None:
            attach_arch(rewritten, arch)
        return rewritten
    return model


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Conv2d→BatchNorm2d pairs where the BN is the conv's only consumer.

    Uses the torch.fx graph when the model traces (true dataflow); otherwise falls back to adjacent
    siblings in a parent's module order, which holds for Sequential-style blocks.
    """
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - untraceable models use the structural fallback
        graph = None
    pairs: list[tuple[str, str]] = []
    if graph is not None:
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
                continue
            source = node.args[0] if node.args else None
            if (
                isinstance(source, torch.fx.Node)
                and source.op == "call_module"
                and type(modules.get(source.target)) is nn.Conv2d
                and len(source.users) == 1
            ):
                pairs.append((source.target, node.target))
        return pairs
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if type(a) is nn.Conv2d and isinstance(b, nn.BatchNorm2d):
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs


def _call_order(model: nn.Module) -> list[str]:
    """Names of the modules in the order ``forward`` calls them (a module called twice appears twice).

    Taken from a torch.fx trace, which follows the dataflow; an untraceable model falls back to the
    registration order (the order ``named_modules`` lists).
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - untraceable models use the registration order
        return [name for name, _ in model.named_modules() if name]
    return [str(node.target) for node in graph.nodes if node.op == "call_module"]


def _first_last_weighted(model: nn.Module, order: list[str]) -> tuple[str | None, str | None]:
    modules = dict(model.named_modules())
    names = [n for n in order if type(modules.get(n)) in WEIGHTED_MAPPING]
    return (names[0], names[-1]) if names else (None, None)


def _replace_activations(model: nn.Module, scheme: QuantScheme, order: list[str], first: str | None,
                         last: str | None, skip_names: Iterable[str], report: QuantizationReport) -> None:
    """Put a quantizer built from ``scheme.activation_replacement`` in place of every activation of a
    type in ``scheme.replaced_activations`` whose every call lies between the first call of the first
    weighted layer and the last call of the last one (a shared module used outside stays float)."""
    spec = scheme.activation_replacement
    if spec is None or first is None:
        return
    start, end = order.index(first), len(order) - 1 - order[::-1].index(last)
    modules = dict(model.named_modules())
    for name in dict.fromkeys(order):
        module = modules.get(name)
        if type(module).__name__ not in scheme.replaced_activations or _skipped(name, skip_names):
            continue
        calls = [i for i, called in enumerate(order) if called == name]
        if not all(start < i < end for i in calls):
            if any(start < i < end for i in calls):
                report.kept_float.append((name, "activation also used outside the quantized region"))
            continue
        replacement = spec.build()
        model.set_submodule(name, replacement)
        report.quantized.append((name, type(replacement).__name__))


class _QuantizedLeafTracer(torch.fx.Tracer):
    """Traces through containers and blocks, but keeps quantized modules and quantizers whole."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (QuantizedModule, Quantizer)):
            return True
        torch_base = next((c for c in type(m).__mro__[1:] if c.__module__.startswith("torch.nn.modules")), nn.Module)
        if torch_base not in (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict):  # e.g. a BatchNorm subclass
            return True
        return super().is_leaf_module(m, module_qualified_name)


# Ops that pass ±1 values on as ±1 values (they pick, reshape or reorder, and compute nothing new).
_SIGN_PRESERVING_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout2d)
_SIGN_PRESERVING_CALLS = {"flatten", "unflatten", "view", "reshape", "contiguous", "permute", "transpose", torch.flatten}


def _real_valued_inputs(model: nn.Module, sign_type: type) -> list[tuple[str, str]]:
    """Layers with low-bit (binary or ternary) weights whose input does not come from a sign activation
    (through pooling or reshapes at most): they multiply ±α weights with real-valued activations, so a
    binary (XNOR-popcount) kernel cannot run them. Empty when the model does not trace."""
    from micronet.compression.quantization.core.lowbit import BinaryWeightQuantizer, TernaryWeightQuantizer

    try:
        graph = _QuantizedLeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model is reported by its trace error already
        return []
    modules = dict(model.named_modules())
    found: list[tuple[str, str]] = []
    for node in graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(getattr(module, "weight_quantizer", None), (BinaryWeightQuantizer, TernaryWeightQuantizer)):
            continue
        source = node.args[0] if node.args else None
        while isinstance(source, torch.fx.Node) and (
                (source.op == "call_module" and isinstance(modules.get(source.target), _SIGN_PRESERVING_MODULES))
                or (source.op in ("call_method", "call_function") and source.target in _SIGN_PRESERVING_CALLS)):
            source = source.args[0]
        if isinstance(source, torch.fx.Node) and source.op == "call_module" and \
                isinstance(modules.get(source.target), sign_type):
            continue
        if isinstance(source, torch.fx.Node) and source.op == "call_module":
            producer = f"{source.target} ({type(modules[source.target]).__name__})"
        elif isinstance(source, torch.fx.Node) and source.op == "placeholder":
            producer = "the model input"
        else:
            target = getattr(source, "target", "")
            producer = f"{getattr(source, 'name', source)} ({getattr(target, '__name__', target)})"
        found.append((str(node.target), f"its input is {producer}, not a ReLU turned into a sign: "
                                        "real-valued activations times binary weights"))
    return found


def prepare(
    model: nn.Module,
    scheme: QuantScheme,
    *,
    inplace: bool = False,
    skip: Iterable[str] = (),
    mapping: dict[type[nn.Module], type[QuantizedModule]] | None = None,
) -> nn.Module:
    """Return a fake-quantized copy of ``model`` (or ``model`` itself with ``inplace=True``) in QAT mode.

    ``skip`` lists module names (prefixes match their children) to keep in float; a name that is no module
    of the model raises :class:`~micronet.errors.ConfigError`. ``mapping`` overrides
    the float → quantized class table. The result carries ``quant_scheme`` and ``quantization_report``.
    """
    if is_prepared(model):
        raise QuantizationError("the model is already prepared for quantization: prepare the float model once")
    scheme = scheme.with_skip(list(skip))
    model = model if inplace else copy.deepcopy(model)
    report = QuantizationReport(scheme.name)
    known = {name for name, _ in model.named_modules()}
    model = _modularize(model, report)
    _check_skip(scheme.skip, known | {name for name, _ in model.named_modules()}, model)
    order = _call_order(model)
    first, last = _first_last_weighted(model, order)
    kept = ((first, scheme.keep_first_float), (last, scheme.keep_last_float)) if scheme.edge_weight is None else ()
    policy_skips = [n for n, keep in kept if keep and n]
    skip_names = (*scheme.skip, *policy_skips)
    _replace_activations(model, scheme, order, first, last, scheme.skip, report)

    unfolded_pairs = [] if scheme.fold_bn else _conv_bn_pairs(model)  # BNs the export will fold
    if scheme.fold_bn:
        from micronet.compression.quantization.core.bn_fold import QuantBNFuseConv2d

        for conv_name, bn_name in _conv_bn_pairs(model):
            if _skipped(conv_name, skip_names):
                continue
            fused = QuantBNFuseConv2d.from_conv_bn(model.get_submodule(conv_name), model.get_submodule(bn_name), scheme)
            model.set_submodule(conv_name, fused)
            model.set_submodule(bn_name, nn.Identity())
            report.folded_bn.append((conv_name, bn_name))
            report.quantized.append((conv_name, type(fused).__name__))

    table = mapping or _mapping(scheme)
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantizedModule, Quantizer)) or name == "":
            continue
        target = table.get(type(module))
        if target is None:
            if isinstance(module, _NORMALIZATION):
                report.kept_float.append((name, f"{type(module).__name__} not folded"))
            elif isinstance(module, ChannelBias):
                report.kept_float.append((name, "per-channel bias before an activation, float"))
            elif any(True for _ in module.parameters(recurse=False)):
                report.unsupported.append((name, type(module).__name__))
            continue
        if _skipped(name, skip_names):
            reason = "first layer" if name == first and name in policy_skips else "last layer" if name in policy_skips else "skipped"
            report.kept_float.append((name, reason))
            continue
        target.from_float(module, _module_scheme(scheme, name, module, first, last))
        report.quantized.append((name, target.__name__))

    for conv_name, bn_name in unfolded_pairs:  # in eval, add the int32 bias the folded export will add
        conv = model.get_submodule(conv_name)
        if isinstance(conv, WeightedQuantizedModule):
            IntegerBiasBatchNorm2d.attach(model.get_submodule(bn_name), conv)

    for name, quantizer in quantizers(model):
        quantizer.qualified_name = name
    if scheme.activation_replacement is not None:
        report.real_valued_inputs = _real_valued_inputs(model, type(scheme.activation_replacement.build()))
    if report.unsupported:
        warnings.warn(
            "layers left in float because micronet has no quantized version of them: "
            + ", ".join(f"{n} ({t})" for n, t in report.unsupported),
            stacklevel=2,
        )
    model.quant_scheme = scheme
    model.quantization_report = report
    return model


def _module_scheme(scheme: QuantScheme, name: str, module: nn.Module, first: str | None,
                   last: str | None) -> QuantScheme:
    """The scheme one module is quantized with: the scheme's own, except on quantized edges (see
    ``QuantScheme.edge_weight``): the first layer (weights and input), the last (weights, and its input where the
    scheme leaves inputs in float: a sign or a pool feeds it, whose values an 8-bit grid holds) and average pools."""
    if scheme.edge_weight is None:
        return scheme
    if name == first and scheme.keep_first_float:
        return replace(scheme, weight=scheme.edge_weight, activation=scheme.edge_activation)
    if name == last and scheme.keep_last_float:
        float_inputs = scheme.activation.family == "float"
        return replace(scheme, weight=scheme.edge_weight,
                       activation=scheme.edge_activation if float_inputs else scheme.activation)
    if type(module) in POOL_MAPPING:
        return replace(scheme, activation=scheme.edge_activation)
    return scheme


def _require_quantizers(model: nn.Module, action: str) -> list[tuple[str, Quantizer]]:
    found = quantizers(model)
    if not found:
        raise QuantizationError(f"cannot {action}: the model has no quantizers, prepare() it first")
    return found


def set_mode(model: nn.Module, mode: int) -> nn.Module:
    for _, quantizer in _require_quantizers(model, "change the quantization mode"):
        quantizer.set_mode(mode)
    return model


def enable_qat(model: nn.Module) -> nn.Module:
    """Observers update while the model trains (and never in eval mode)."""
    return set_mode(model, QAT)


def refresh_weight_ranges(model: nn.Module) -> int:
    """Re-observe every weight whose quantizer follows the current weights (QAT mode, min/max of the latest
    tensor), so that the scales fit the weights after the last optimizer step; returns how many changed hands.
    ``model.eval()`` does this by itself; :func:`freeze` (and so :func:`convert`) call it first."""
    return sum(m.refresh_weight_range() for m in model.modules() if isinstance(m, WeightedQuantizedModule))


def freeze(model: nn.Module) -> nn.Module:
    """Fix every scale and zero point (QAFT, deployment); the weights may still train. Weight ranges are
    re-observed first (:func:`refresh_weight_ranges`), so the frozen scales fit the current weights."""
    _require_quantizers(model, "change the quantization mode")
    refresh_weight_ranges(model)
    return set_mode(model, FROZEN)


def set_fake_quant(model: nn.Module, enabled: bool, names: Iterable[str] | None = None) -> nn.Module:
    """Switch fake-quantization on or off (all quantizers, or those under the given module names)."""
    wanted = list(names) if names is not None else None
    for name, quantizer in _require_quantizers(model, "switch fake-quantization"):
        if wanted is None or _skipped(name, wanted):
            quantizer.enabled.fill_(int(enabled))
    return model


def _batches(data: Iterable[Any]) -> Iterable[torch.Tensor]:
    for item in data:
        yield item[0] if isinstance(item, (tuple, list)) else item


@torch.no_grad()
def calibrate(model: nn.Module, data: Iterable[Any], num_batches: int | None = None) -> nn.Module:
    """Post-training calibration: observe ``num_batches`` batches (all when None) in eval mode under
    no_grad — BatchNorm statistics and dropout are untouched — then freeze the quantization parameters.

    ``data`` yields input tensors or (input, target) pairs.
    """
    if num_batches is not None and num_batches < 1:
        raise QuantizationError(f"num_batches must be at least 1 (got {num_batches})")
    _require_quantizers(model, "calibrate")
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    set_mode(model, CALIBRATE)
    model.eval()
    seen = 0
    try:
        for inputs in _batches(data):
            if num_batches is not None and seen >= num_batches:
                break
            model(inputs.to(device))
            seen += 1
    except BaseException:
        set_mode(model, QAT)
        raise
    finally:
        model.train(was_training)
    if seen == 0:
        set_mode(model, QAT)
        raise QuantizationError("calibration data is empty: pass a loader that yields at least one batch")
    if num_batches is not None and seen < num_batches:
        warnings.warn(f"calibration asked for {num_batches} batches but the data had only {seen}", stacklevel=2)
    freeze(model)
    model.calibrated_batches = seen
    return model


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """The inference form of a prepared model, with less work per forward: a copy in eval mode with
    BatchNorm folded (:func:`micronet.compression.fusion.fuse`; QAT BN-folding convs become plain quantized
    convs), every quantizer frozen, and each weight stored already quantized (``weight ←
    weight_quantizer(weight)``, weight quantizer switched off). It saves and reloads like any quantized
    model; the original ``model`` is not modified.

    Eval outputs are bit-identical to ``model``'s, except where a float conv→BN pair (e.g. a first layer
    kept float) is folded: that changes float rounding, which can move a value across a rounding boundary
    of the next quantizer.
    """
    from micronet.compression.fusion import fuse

    _require_quantizers(model, "convert")
    converted, _ = fuse(model)
    freeze(converted)
    for module in converted.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        weight = getattr(module, "weight", None)
        if isinstance(quantizer, Quantizer) and isinstance(weight, torch.Tensor) and quantizer.enabled.item():
            weight.copy_(quantizer(weight))
            quantizer.enabled.fill_(0)
    return converted
