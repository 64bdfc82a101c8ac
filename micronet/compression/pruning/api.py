"""``prune()``: structured channel pruning of any torch.fx-traceable model, with a report and a channel record.

Semantics: the pruned model computes exactly what the original computes when every removed channel is
replaced by zeros where a conv or linear layer reads it (output shape unchanged; the network's output
channels are never removed). Nothing is folded into the next layer: with network slimming a removed channel
whose |γ| is small still outputs about act(β), and that constant is dropped, as in the original — fine-tune
after pruning. Folding it into the next layer's bias would be exact only for constant channels read by convs
without zero padding, so it is not done; the zero-mask contract above holds for every model instead.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from micronet.analysis import count_flops, count_parameters, format_table
from micronet.compression.pruning.graph import ChannelGraph, build_channel_graph, check_not_quantized
from micronet.compression.pruning.record import channel_record
from micronet.compression.pruning.selection import Selection, check_options, select_channels
from micronet.compression.pruning.surgery import shrink_module
from micronet.errors import PruningError
from micronet.models.registry import attach_arch, find_arch

__all__ = ["LayerRow", "PruneReport", "UnprunableGroup", "plan_pruning", "prune"]

_EXPECTED = ("network output", "model input")


def _expected(reason: str) -> bool:
    """Reasons the caller asked for or cannot avoid: no warning for those."""
    return reason.startswith(_EXPECTED) or reason.endswith("is in ignored_layers")


@dataclass
class LayerRow:
    """One analysed module: channels (or features) in and out, before and after."""

    name: str
    type: str
    in_before: int
    in_after: int
    out_before: int
    out_after: int


@dataclass
class UnprunableGroup:
    """Layers whose output channels were left whole, and why."""

    layers: list[str]
    channels: int
    reasons: list[str]


@dataclass
class PruneReport:
    """What :func:`prune` did: per-layer sizes, unprunable groups with reasons, params and FLOPs totals."""

    percent: float
    normal_regular: int | None
    importance: str
    min_channels: int
    layers: list[LayerRow] = field(default_factory=list)
    unprunable: list[UnprunableGroup] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None
    flops_after: int | None = None

    def table(self) -> str:
        """A printable text table: one row per module, then totals and the unprunable groups."""
        rows = [{"layer": r.name, "type": r.type, "in": f"{r.in_before}->{r.in_after}",
                 "out": f"{r.out_before}->{r.out_after}",
                 "kept": f"{r.out_after / r.out_before:.0%}" if r.out_before else ""} for r in self.layers]
        lines = [format_table(rows, ["layer", "type", "in", "out", "kept"]), ""]
        lines.append(f"params: {self.params_before:,} -> {self.params_after:,} "
                     f"({_ratio(self.params_after, self.params_before)})")
        if self.flops_before is not None and self.flops_after is not None:
            lines.append(f"FLOPs:  {self.flops_before:,} -> {self.flops_after:,} "
                         f"({_ratio(self.flops_after, self.flops_before)})")
        for group in self.unprunable:
            lines.append(f"not pruned ({group.channels} channels): {', '.join(group.layers)}: "
                         f"{'; '.join(group.reasons)}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        json.dumps(out)
        return out


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.1%} kept" if before else "n/a"


def _inputs(example_input: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    inputs = tuple(example_input) if isinstance(example_input, (list, tuple)) else (example_input,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise PruningError("example_input must be a tensor (or a tuple of tensors) the model accepts, "
                           "e.g. torch.randn(1, 3, 32, 32)")
    return inputs


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return model(*inputs)
    finally:
        for m, training in modes:
            m.training = training


def _flops(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int | None:
    if len(inputs) != 1 or inputs[0].dim() not in (3, 4):
        return None
    try:
        return count_flops(model, tuple(inputs[0].shape)).flops
    except Exception:  # noqa: BLE001 - FLOPs are informative only
        return None


def _ignored_names(model: nn.Module, ignored_layers: Iterable[str | nn.Module] | None) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for item in ignored_layers or ():
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise PruningError(f"ignored_layers holds a {type(item).__name__} that is not part of the model: "
                                   "pass the model's own modules or their names")
            out.append(names[id(item)])
        else:
            out.append(item)
    return out


def plan_pruning(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor], percent: float = 0.5,
                 normal_regular: int | None = None, ignored_layers: Iterable[str | nn.Module] | None = None,
                 importance: str = "bn_gamma", min_channels: int = 1) -> tuple[ChannelGraph, Selection]:
    """Analysis and selection only (``model`` is not modified): what :func:`prune` would remove.

    ``selection.plan()`` maps each analysed module path to (kept input positions, kept output positions).
    """
    check_options(percent, normal_regular, importance, min_channels)
    check_not_quantized(model)
    ignored = _ignored_names(model, ignored_layers)
    graph = build_channel_graph(copy.deepcopy(model), _inputs(example_input), ignored)
    return graph, select_channels(graph, percent, normal_regular, importance, min_channels)


def prunable_batchnorms(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> list[str]:
    """Names of the BatchNorms over channels that :func:`prune` can remove (some of them, at least).

    A BatchNorm over channels that can never be pruned (the network's output, a model input, a grouped
    layout that cannot shrink) gains nothing from the sparsity penalty: shrinking its scales only costs
    accuracy. Raises :class:`PruningError` when the model cannot be analysed (see :func:`prune`).
    """
    graph, selection = plan_pruning(model, example_input, percent=0.0)
    return [path for path, use in graph.uses.items() if use.kind == "bn" and any(
        graph.component(graph.elem_space[e]) not in selection.unprunable for e in use.in_elems)]


def _unprunable(graph: ChannelGraph, selection: Selection) -> list[UnprunableGroup]:
    out = []
    for comp, reasons in sorted(selection.unprunable.items()):
        spaces = [s for s in graph.spaces if graph.component(s.id) == comp and s.kind in ("conv", "linear")]
        if spaces:
            out.append(UnprunableGroup([s.name for s in spaces], sum(s.size for s in spaces), list(reasons)))
    return out


def prune(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor], percent: float = 0.5,
          normal_regular: int | None = None, ignored_layers: Iterable[str | nn.Module] | None = None,
          importance: str = "bn_gamma", min_channels: int = 1) -> nn.Module:
    """Return a new, physically smaller copy of ``model`` (``model`` is untouched).

    ``percent``: fraction in [0, 1) of the prunable channel units removed by the global threshold (a residual
    channel shared by several layers counts once), before per-layer rounding. ``normal_regular=N``: every
    pruned layer keeps a multiple of N channels (or its full width). ``importance``: ``"bn_gamma"`` (|γ| of
    the following BatchNorm, network slimming) or ``"l1"`` (mean |w| of the filter). ``min_channels``: the
    fewest channels a pruned layer keeps. ``ignored_layers``: module names or modules whose output channels
    stay whole. See :mod:`micronet.compression.pruning.selection` for the rules and the module docstring for
    the exact semantics of the result.

    The result carries ``pruning_report`` (:class:`PruneReport`) and ``channel_record`` (see
    :func:`~micronet.compression.pruning.record.channel_record`); a registry model keeps ``arch`` with the
    cfg that rebuilds it, when the registry can express it. Raises :class:`PruningError` for bad options, a
    quantized model ("prune first, then quantize") or a model torch.fx cannot trace.
    """
    check_options(percent, normal_regular, importance, min_channels)
    check_not_quantized(model)
    inputs = _inputs(example_input)
    ignored = _ignored_names(model, ignored_layers)
    work = copy.deepcopy(model)
    graph = build_channel_graph(work, inputs, ignored)
    selection = select_channels(graph, percent, normal_regular, importance, min_channels)

    report = PruneReport(float(percent), normal_regular, importance, int(min_channels))
    for path, (keep_in, keep_out) in selection.plan().items():
        use = graph.uses[path]
        m = work.get_submodule(path)
        if m is not use.module:
            raise PruningError(f"module '{path}' is reached under two names; channel pruning needs each layer once")
        n_in, n_out = len(use.in_elems), len(use.out_elems())
        if len(keep_in) != n_in or len(keep_out) != n_out:
            work.set_submodule(path, shrink_module(m, keep_in, keep_out, use.kind))
        report.layers.append(LayerRow(path, type(m).__name__, n_in, len(keep_in), n_out, len(keep_out)))
    report.unprunable = _unprunable(graph, selection)

    before, after = _run(model, inputs), _run(work, inputs)
    if isinstance(before, torch.Tensor) and (not isinstance(after, torch.Tensor) or after.shape != before.shape):
        got = tuple(after.shape) if isinstance(after, torch.Tensor) else type(after).__name__
        raise PruningError(f"the pruned model's output shape {got} differs from the original's "
                           f"{tuple(before.shape)}: a layer hard-codes a channel count; add it to ignored_layers")
    report.params_before, report.params_after = count_parameters(model), count_parameters(work)
    report.flops_before, report.flops_after = _flops(model, inputs), _flops(work, inputs)

    record = channel_record(work)
    arch = find_arch(work)
    if record["cfg"] is not None and arch is not None:
        attach_arch(work, dataclasses.replace(arch, cfg=tuple(record["cfg"])))
    work.pruning_report = report
    work.channel_record = record
    odd = [g for g in report.unprunable if not all(_expected(r) for r in g.reasons)]
    if odd:
        warnings.warn("channel pruning left these layers whole: " + "; ".join(
            f"{', '.join(g.layers)} ({'; '.join(g.reasons)})" for g in odd), stacklevel=2)
    return work
