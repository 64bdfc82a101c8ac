"""The channel dependency graph: which channel dimensions of a model must shrink together.

:func:`build_channel_graph` traces the model with torch.fx (after :func:`micronet.graph.modularize` has
turned ``x + y``, ``torch.cat``, ``F.relu``, ``torch.flatten`` … into modules), runs the trace once on
``example_input`` to learn every tensor's shape, and follows the channel axis (dim 1) through the graph.

Every output channel of a conv or linear layer is one *element*. Each tensor in the graph is described by
the list of elements its channels (or, after ``flatten``, its features) carry. Operations act on those lists:

* channel-preserving ops (BatchNorm, activations, pooling, dropout) pass the list through;
* a depthwise conv (``groups == in == out``) passes its input's list through: its channels follow their
  producer;
* ``Add`` ties its operands channel by channel (union-find): a residual stage is one set of *units*, each
  unit one channel of every layer that writes into the sum;
* ``Concat`` along channels concatenates the lists (each producer is an offset slice of the consumer);
* ``flatten`` repeats each channel's element H·W times (a channel is a block of the linear's inputs);
* ``ChannelShuffle(g)`` permutes the list, and ties channel ``j`` of every one of its ``g`` blocks, so that
  the same shuffle module still applies to the pruned tensor;
* grouped convs record a *group constraint* (each channel's group on the input and output side): every
  group must keep the same number of channels.

What cannot be pruned is *blocked* with a reason, never skipped silently: model inputs, network outputs,
``ignored_layers``, tensors read by an op the graph does not understand, modules called more than once.
A blocked element blocks its whole *component* (the layers tied to it through ``Add``/shuffle).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from micronet.base_module.op import Add, Concat
from micronet.errors import PruningError
from micronet.graph import describe_trace_failure, is_micronet_module, modularize
from micronet.models.layers import ChannelShuffle

__all__ = ["ChannelGraph", "GroupConstraint", "LayerUse", "Space", "build_channel_graph", "check_not_quantized"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules that act on each channel separately and keep the channel count.
_PASS_THROUGH = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.GELU, nn.Hardswish,
    nn.Hardsigmoid, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
# Functional leftovers (modularize declined them, e.g. an in-place call) that are channel-wise.
_PASS_FUNCTIONS = {torch.relu, torch.sigmoid, torch.tanh, nn.functional.relu, nn.functional.relu6,
                   nn.functional.dropout, nn.functional.gelu, nn.functional.silu, nn.functional.hardswish,
                   nn.functional.leaky_relu, nn.functional.hardtanh, torch.relu_}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "to"}
_SHAPE_READS = {"size", "dim", "numel"}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}  # over spatial dims only (checked)


def check_not_quantized(model: nn.Module) -> None:
    """Raise :class:`PruningError` when quantizers are already attached: pruning comes before quantization."""
    for name, module in model.named_modules():
        cls_module = type(module).__module__ or ""
        if cls_module.startswith("micronet.compression.quantization") or hasattr(module, "weight_quantizer"):
            raise PruningError(
                f"module '{name or type(model).__name__}' ({type(module).__name__}) is quantized: prune first, "
                "then quantize (prune the float model and run quantization prepare on the pruned result)")


@dataclass
class Space:
    """The channels one node creates: a conv/linear output, a model input, a constant or an unknown op's output."""

    id: int
    name: str
    size: int
    kind: str  # "conv" | "linear" | "input" | "constant" | "unknown"
    first: int  # element id of channel 0

    def elements(self) -> range:
        return range(self.first, self.first + self.size)


@dataclass
class LayerUse:
    """One resizable module: its path, its kind and the elements its input positions carry."""

    path: str
    module: nn.Module
    kind: str  # "conv" | "depthwise" | "linear" | "bn"
    in_elems: list[int]
    out_space: Space | None = None  # conv / linear: the channels it writes

    def out_elems(self) -> list[int]:
        return list(self.out_space.elements()) if self.out_space is not None else list(self.in_elems)


@dataclass
class GroupConstraint:
    """A grouped conv side: channel ``elems[i]`` belongs to group ``labels[i]``; every group keeps the same count."""

    path: str
    side: str  # "input" | "output"
    groups: int
    elems: list[int]
    labels: list[int]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller (earlier) id stays root: deterministic


@dataclass
class ChannelGraph:
    """The analysis result used by selection and surgery (see the module docstring)."""

    spaces: list[Space] = field(default_factory=list)
    uses: dict[str, LayerUse] = field(default_factory=dict)
    constraints: list[GroupConstraint] = field(default_factory=list)
    bn_terms: list[tuple[int, float]] = field(default_factory=list)  # (element, |γ|)
    l1_terms: dict[int, float] = field(default_factory=dict)  # element → mean |w| of its filter / layer mean
    elem_space: list[int] = field(default_factory=list)
    blocks: dict[int, list[str]] = field(default_factory=dict)  # space id → reasons
    units: _UnionFind = field(default_factory=_UnionFind)
    comps: _UnionFind = field(default_factory=_UnionFind)  # over spaces

    # -- building helpers
    def new_space(self, name: str, size: int, kind: str) -> Space:
        first = self.units.add(size)
        space = Space(len(self.spaces), name, size, kind, first)
        self.spaces.append(space)
        self.elem_space.extend([space.id] * size)
        self.comps.add(1)
        return space

    def tie(self, a: int, b: int) -> None:
        self.units.union(a, b)
        self.comps.union(self.elem_space[a], self.elem_space[b])

    def block(self, elems: Iterable[int], reason: str) -> None:
        for sid in sorted({self.elem_space[e] for e in elems}):
            reasons = self.blocks.setdefault(sid, [])
            if reason not in reasons:
                reasons.append(reason)

    # -- queries
    def component(self, space_id: int) -> int:
        return self.comps.find(space_id)

    def component_reasons(self) -> dict[int, list[str]]:
        """Component id → reasons it cannot be pruned (components absent here are prunable)."""
        out: dict[int, list[str]] = {}
        for sid, reasons in self.blocks.items():
            bucket = out.setdefault(self.component(sid), [])
            bucket.extend(r for r in reasons if r not in bucket)
        return out

    def component_layers(self, comp: int) -> list[str]:
        return [s.name for s in self.spaces if self.component(s.id) == comp]


def _relative(per_filter: torch.Tensor) -> torch.Tensor:
    """Filter magnitudes divided by their layer's mean, so one global threshold compares layers of any scale."""
    mean = per_filter.mean()
    return per_filter / mean if float(mean) > 0 else per_filter


def _tensor_meta(node: fx.Node) -> TensorMetadata | None:
    meta = node.meta.get("tensor_meta")
    return meta if isinstance(meta, TensorMetadata) else None


class _ChannelTracer(fx.Tracer):
    """Traces into micronet's blocks (ConvBNReLU …) but keeps Add, Concat and ChannelShuffle as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (Add, Concat, ChannelShuffle)):
            return True
        if is_micronet_module(m):
            return False
        return super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module, example_input: Sequence[torch.Tensor]) -> tuple[fx.GraphModule, nn.Module]:
    """modularize → trace → shape propagation (eval mode, no grad, modes restored)."""
    modular, report = modularize(model, inplace=True)
    if not report.traced:
        raise PruningError(f"cannot build the channel graph: {report.trace_error}")
    tracer = _ChannelTracer()
    try:
        graph = tracer.trace(modular)
    except Exception as exc:  # noqa: BLE001 - any trace failure is reported with its op
        raise PruningError("cannot build the channel graph: torch.fx could not trace the model: "
                           + describe_trace_failure(exc, tracer, modular)) from exc
    gm = fx.GraphModule(modular, graph)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_input)
    except Exception as exc:  # noqa: BLE001
        raise PruningError(f"the model failed on example_input ({type(exc).__name__}: {exc}): pass an input the "
                           "model accepts, e.g. torch.randn(1, 3, 32, 32)") from exc
    finally:
        for m, training in modes:
            m.training = training
    return gm, modular


def _flat_tensors(value: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: out.append(n) or n)
    return out


class _Builder:
    def __init__(self, gm: fx.GraphModule, ignored: set[str]) -> None:
        self.gm = gm
        self.g = ChannelGraph()
        self.chans: dict[fx.Node, list[int]] = {}
        self.ignored = ignored
        self.calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    # -- generic cases
    def _fresh(self, node: fx.Node, kind: str, reason: str) -> None:
        """An op whose output channels we cannot relate to its inputs: a new, blocked set of channels."""
        meta = _tensor_meta(node)
        if meta is None or len(meta.shape) < 2:
            return
        space = self.g.new_space(node.name, int(meta.shape[1]), kind)
        self.g.block(space.elements(), reason)
        self.chans[node] = list(space.elements())

    def _unknown(self, node: fx.Node, what: str) -> None:
        inputs = [n for n in _flat_tensors((node.args, node.kwargs)) if n in self.chans]
        for n in inputs:
            self.g.block(self.chans[n], f"read by {what} ('{node.name}'), which channel pruning does not understand")
        self._fresh(node, "unknown", f"written by {what} ('{node.name}'), which channel pruning does not understand")

    def _input(self, node: fx.Node) -> list[int] | None:
        arg = node.args[0] if node.args else None
        return self.chans.get(arg) if isinstance(arg, fx.Node) else None

    # -- joins
    def _add(self, node: fx.Node, a: Any, b: Any, what: str) -> None:
        la = self.chans.get(a) if isinstance(a, fx.Node) else None
        lb = self.chans.get(b) if isinstance(b, fx.Node) else None
        out = _tensor_meta(node)
        if la is not None and lb is None and not isinstance(b, fx.Node):
            self.chans[node] = la  # tensor + python scalar
            return
        if la is None or lb is None or len(la) != len(lb) or out is None or len(out.shape) < 2 or \
                int(out.shape[1]) != len(la):
            self._unknown(node, f"{what} with broadcasting or a non-channel operand")
            return
        for x, y in zip(la, lb):
            self.g.tie(x, y)
        self.chans[node] = la

    def _cat(self, node: fx.Node, tensors: Sequence[Any], dim: int) -> None:
        lists = [self.chans.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        meta = _tensor_meta(node)
        if meta is None or any(x is None for x in lists):
            self._unknown(node, "a concatenation of non-channel tensors")
            return
        ndim = len(meta.shape)
        dim = dim + ndim if dim < 0 else dim
        if dim == 1:
            self.chans[node] = [e for lst in lists for e in lst]
        elif dim >= 2 and all(len(x) == len(lists[0]) for x in lists):
            for lst in lists[1:]:
                for x, y in zip(lists[0], lst):
                    self.g.tie(x, y)
            self.chans[node] = lists[0]
        else:
            self._unknown(node, f"a concatenation along dim {dim}")

    # -- modules
    def _module(self, node: fx.Node) -> None:
        path = node.target
        m = self.gm.get_submodule(path)
        has_params = any(True for _ in m.parameters(recurse=False))
        if has_params and self.calls.get(path, 0) > 1:
            self._unknown(node, f"module '{path}' called {self.calls[path]} times (shared weights)")
            return
        if isinstance(m, Add):
            self._add(node, node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("b"), "Add")
        elif isinstance(m, Concat):
            tensors = node.args[0] if len(node.args) == 1 and isinstance(node.args[0], (list, tuple)) else node.args
            self._cat(node, tensors, m.dim)
        elif isinstance(m, ChannelShuffle):
            self._shuffle(node, m)
        elif isinstance(m, _CONVS):
            self._conv(node, path, m)
        elif isinstance(m, nn.Linear):
            self._linear(node, path, m)
        elif isinstance(m, _BATCH_NORMS):
            self._bn(node, path, m)
        elif isinstance(m, nn.Flatten):
            self._flatten(node, m.start_dim, m.end_dim)
        elif isinstance(m, _PASS_THROUGH) and not has_params and self._input(node) is not None:
            self.chans[node] = self._input(node)
        else:
            self._unknown(node, f"module '{path}' ({type(m).__name__})")

    def _shuffle(self, node: fx.Node, m: ChannelShuffle) -> None:
        lst = self._input(node)
        g = int(m.groups)
        if lst is None or g < 1 or len(lst) % g:
            self._unknown(node, f"ChannelShuffle '{node.target}'")
            return
        n = len(lst) // g
        for j in range(n):  # the same position j of every block is kept or removed together
            for i in range(1, g):
                self.g.tie(lst[j], lst[i * n + j])
        out = [0] * len(lst)
        for i in range(g):
            for j in range(n):
                out[j * g + i] = lst[i * n + j]
        self.chans[node] = out

    def _conv(self, node: fx.Node, path: str, m: nn.Module) -> None:
        lst = self._input(node)
        if lst is None or len(lst) != m.in_channels:
            self._unknown(node, f"conv '{path}' on a tensor whose channels are not traced")
            return
        g = int(m.groups)
        if g > 1 and g == m.in_channels == m.out_channels:
            self.chans[node] = lst
            self.g.uses[path] = LayerUse(path, m, "depthwise", list(lst))
            self._ignored(path, lst)
            return
        space = self.g.new_space(path, m.out_channels, "conv")
        self.g.uses[path] = LayerUse(path, m, "conv", list(lst), space)
        w = _relative(m.weight.detach().abs().flatten(1).mean(1))
        for c, e in enumerate(space.elements()):
            self.g.l1_terms[e] = float(w[c])
        if g > 1:
            ipg, opg = m.in_channels // g, m.out_channels // g
            self.g.constraints.append(GroupConstraint(path, "input", g, list(lst), [p // ipg for p in range(len(lst))]))
            self.g.constraints.append(GroupConstraint(path, "output", g, list(space.elements()),
                                                      [o // opg for o in range(m.out_channels)]))
        self.chans[node] = list(space.elements())
        self._ignored(path, space.elements())

    def _linear(self, node: fx.Node, path: str, m: nn.Linear) -> None:
        lst = self._input(node)
        meta = _tensor_meta(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if lst is None or meta is None or len(meta.shape) != 2 or len(lst) != m.in_features:
            self._unknown(node, f"linear '{path}' on a tensor that is not (batch, features)")
            return
        space = self.g.new_space(path, m.out_features, "linear")
        self.g.uses[path] = LayerUse(path, m, "linear", list(lst), space)
        w = _relative(m.weight.detach().abs().mean(1))
        for c, e in enumerate(space.elements()):
            self.g.l1_terms[e] = float(w[c])
        self.chans[node] = list(space.elements())
        self._ignored(path, space.elements())

    def _bn(self, node: fx.Node, path: str, m: nn.Module) -> None:
        lst = self._input(node)
        if lst is None or len(lst) != m.num_features:
            self._unknown(node, f"BatchNorm '{path}' on a tensor whose channels are not traced")
            return
        self.g.uses[path] = LayerUse(path, m, "bn", list(lst))
        if m.affine:
            gamma = m.weight.detach().abs()
            self.g.bn_terms.extend((e, float(gamma[p])) for p, e in enumerate(lst))
        self.chans[node] = lst
        self._ignored(path, lst)

    def _flatten(self, node: fx.Node, start: int, end: int) -> None:
        lst = self._input(node)
        meta = _tensor_meta(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if lst is None or meta is None:
            self._unknown(node, "flatten of an untraced tensor")
            return
        ndim = len(meta.shape)
        start = start + ndim if start < 0 else start
        end = end + ndim if end < 0 else end
        if start >= 2:
            self.chans[node] = lst
        elif start == 1 and end == ndim - 1:
            block = 1
            for s in meta.shape[2:]:
                block *= int(s)
            self.chans[node] = [e for e in lst for _ in range(block)]
        else:
            self._unknown(node, f"flatten({start}, {end})")

    def _ignored(self, path: str, elems: Iterable[int]) -> None:
        if path in self.ignored:
            self.g.block(list(elems), f"'{path}' is in ignored_layers")

    # -- functions
    def _function(self, node: fx.Node) -> None:
        t = node.target
        if node.op == "call_method" and t in _SHAPE_READS:
            return
        if node.op == "call_function" and t is getattr and len(node.args) > 1 and node.args[1] in ("shape", "dtype",
                                                                                                    "device"):
            return
        if node.op == "call_function" and t is operator.getitem and not (
                isinstance(node.args[0], fx.Node) and node.args[0] in self.chans):
            self._fresh(node, "unknown", f"an item of '{node.args[0]}' whose channels are not traced")
            return
        if (node.op == "call_function" and t in (operator.add, torch.add)) or (node.op == "call_method" and t == "add"):
            if len(node.args) >= 2 and node.kwargs.get("alpha", 1) == 1:
                self._add(node, node.args[0], node.args[1], "an addition")
                return
        if node.op == "call_function" and t in (operator.mul, operator.truediv, torch.mul) and len(node.args) == 2 \
                and isinstance(node.args[0], fx.Node) and not isinstance(node.args[1], fx.Node):
            if node.args[0] in self.chans:
                self.chans[node] = self.chans[node.args[0]]
                return
        if node.op == "call_function" and t in (torch.cat, torch.concat):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            self._cat(node, node.args[0], dim)
            return
        if node.op == "call_function" and t is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self._flatten(node, start, end)
            return
        if t in _REDUCTIONS or (node.op == "call_function" and getattr(t, "__name__", "") in _REDUCTIONS):
            if self._reduction(node):
                return
        passes = (node.op == "call_function" and t in _PASS_FUNCTIONS) or (node.op == "call_method" and t in _PASS_METHODS)
        if passes and self._input(node) is not None:
            meta_in = _tensor_meta(node.args[0])
            meta = _tensor_meta(node)
            if meta is not None and meta_in is not None and tuple(meta.shape) == tuple(meta_in.shape):
                self.chans[node] = self._input(node)
                return
        name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        self._unknown(node, f"the operation {name}")

    def _reduction(self, node: fx.Node) -> bool:
        """``x.mean((2, 3))`` and friends: a reduction over spatial dims keeps the channels."""
        lst = self._input(node)
        meta_in, meta = _tensor_meta(node.args[0]) if lst is not None else None, _tensor_meta(node)
        if lst is None or meta_in is None or meta is None or len(meta.shape) < 2:
            return False
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
            return False
        ndim = len(meta_in.shape)
        if any((d + ndim if d < 0 else d) < 2 for d in dims) or int(meta.shape[1]) != len(lst):
            return False
        self.chans[node] = lst
        return True

    def run(self) -> ChannelGraph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self._fresh(node, "input", f"model input '{node.name}'")
            elif node.op == "get_attr":
                self._fresh(node, "constant", f"constant tensor '{node.target}'")
            elif node.op == "call_module":
                self._module(node)
            elif node.op in ("call_function", "call_method"):
                self._function(node)
            elif node.op == "output":
                for n in _flat_tensors(node.args):
                    if n in self.chans:
                        self.g.block(self.chans[n], "network output (its channel count is the model's output shape)")
        return self.g


def build_channel_graph(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor],
                        ignored_layers: Iterable[str | nn.Module] | None = None) -> ChannelGraph:
    """Analyse ``model`` (used in place: the graph's modules are ``model``'s own, under their own paths).

    ``ignored_layers`` are module paths or module objects whose output channels must not be pruned.
    Raises :class:`PruningError` for a quantized model, an untraceable model, an unknown ignored layer, or a
    model that fails on ``example_input``.
    """
    check_not_quantized(model)
    inputs = tuple(example_input) if isinstance(example_input, (list, tuple)) else (example_input,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise PruningError("example_input must be a tensor (or a tuple of tensors) the model accepts, "
                           "e.g. torch.randn(1, 3, 32, 32)")
    names = {id(m): n for n, m in model.named_modules()}
    ignored: set[str] = set()
    for item in ignored_layers or ():
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise PruningError(f"ignored_layers holds a {type(item).__name__} that is not part of the model: "
                                   "pass the model's own modules or their names")
            ignored.add(names[id(item)])
        elif isinstance(item, str):
            try:
                model.get_submodule(item)
            except AttributeError:
                raise PruningError(f"ignored_layers names '{item}', which the model does not have: use names from "
                                   "model.named_modules()") from None
            ignored.add(item)
        else:
            raise PruningError(f"ignored_layers must hold module names or modules, not {type(item).__name__}")
    # A whole block named in ignored_layers ignores the layers inside it.
    expanded = {n for n, _ in model.named_modules() if any(n == i or n.startswith(i + ".") for i in ignored if i)}
    if "" in ignored:
        expanded = {n for n, _ in model.named_modules()}
    gm, _ = _trace(model, inputs)
    return _Builder(gm, expanded).run()
