"""Rewrite functional tensor operations into module calls, so module-swapping passes can see them.

Quantizers and the channel-pruning dependency graph act on ``nn.Module`` objects. A model whose forward
says ``out + identity``, ``torch.cat([a, b], 1)`` or ``F.relu(x)`` hides those operations from them.
:func:`modularize` traces the model with torch.fx (:class:`~micronet.graph.tracer.MicronetTracer`) and
replaces each such call by a call to a new submodule registered on the resulting ``GraphModule``:

===========================================================  ==========================================
functional call                                              module
===========================================================  ==========================================
``a + b``, ``torch.add(a, b)``, ``a.add(b)`` (alpha 1),       :class:`micronet.base_module.op.Add`
``operator.iadd(a, b)`` — both operands tensors
``torch.cat`` / ``torch.concat`` / ``torch.concatenate``     :class:`micronet.base_module.op.Concat`
``F.relu``, ``torch.relu``, ``x.relu()``                     ``nn.ReLU``
``F.relu6``                                                  ``nn.ReLU6``
``F.hardtanh(x, lo, hi)``                                    ``nn.Hardtanh(lo, hi)``
``F.leaky_relu(x, slope)``                                   ``nn.LeakyReLU(slope)``
``torch.sigmoid``, ``F.sigmoid``, ``x.sigmoid()``            ``nn.Sigmoid``
``F.hardswish`` / ``F.hardsigmoid`` / ``F.silu``             ``nn.Hardswish`` / ``nn.Hardsigmoid`` /
                                                             ``nn.SiLU``
``torch.tanh``, ``F.tanh``, ``x.tanh()``; ``F.gelu``         ``nn.Tanh``; ``nn.GELU(approximate)``
``F.max_pool2d``, ``torch.max_pool2d``                       ``nn.MaxPool2d`` (every argument kept)
``F.avg_pool2d``                                             ``nn.AvgPool2d`` (every argument kept)
``F.adaptive_avg_pool2d`` / ``F.adaptive_max_pool2d``        ``nn.AdaptiveAvgPool2d`` / ``…MaxPool2d``
``torch.flatten(x, s, e)``, ``x.flatten(s, e)``              ``nn.Flatten(s, e)``
``x.view(x.size(0), -1)``, ``x.reshape(x.size(0), -1)``      ``nn.Flatten(1)`` (this exact pattern; also
(``x.shape[0]`` / ``x.size()[0]`` for the batch size)        ``torch.reshape`` and a tuple shape)
===========================================================  ==========================================

A call is converted only when every argument other than the tensor inputs is a constant of the trace;
otherwise it stays functional and is listed in :attr:`ModularizeReport.left_functional` with the reason.
New modules are never in-place. An in-place call (``F.relu(x, inplace=True)``, ``x.relu_()``,
``operator.iadd``) is converted only when no other reference to the overwritten tensor is read
afterwards and the tensor is not a model input, parameter or buffer — otherwise the out-of-place module
would change what those readers see, so it stays functional (listed).

Known limits (torch.fx's, not this pass's): ``a += b`` on a traced tensor is recorded by fx as the
out-of-place ``a + b`` (fx proxies have no ``__iadd__``), so code that relies on the mutation being seen
through another reference to ``a`` already behaves differently in any fx-traced model; forward hooks
registered on the root module are not carried over to the ``GraphModule``.
"""

from __future__ import annotations

import builtins
import copy
import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn

from micronet.base_module.op import Add, Concat
from micronet.graph.tracer import MicronetTracer, describe_trace_failure

__all__ = ["ModularizeReport", "modularize"]


# ----------------------------------------------------------------------------------------------- report


@dataclass
class ModularizeReport:
    """What :func:`modularize` did.

    ``converted``: ``(new module name, replaced call)`` per new submodule, e.g. ``("add_1", "operator.add")``.
    ``left_functional``: ``(node name, call)`` per tensor computation that stays functional (tuple
    unpacking ``out[0]`` of a module's tuple output and shape queries such as ``x.size(0)`` are not
    listed: they compute no tensor). ``reasons`` maps a listed node name to why it was not converted.
    ``traced``: False when torch.fx could not trace the model (or the trace would not be valid in both
    train and eval mode); then the model is returned unchanged and ``trace_error`` says why.
    """

    converted: list[tuple[str, str]] = field(default_factory=list)
    left_functional: list[tuple[str, str]] = field(default_factory=list)
    traced: bool = True
    trace_error: str | None = None
    reasons: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """Human-readable, multi-line account: what was converted, what stays functional and why."""
        if not self.traced:
            return ("modularize: the model was returned unchanged (module-swapping passes still see its "
                    f"module tree, but none of its functional calls)\n  reason: {self.trace_error}")
        lines = [f"modularize: {len(self.converted)} functional call(s) converted to modules, "
                 f"{len(self.left_functional)} left functional"]
        if self.converted:
            lines.append("converted:")
            width = max(len(name) for name, _ in self.converted)
            lines += [f"  {name:<{width}}  <- {what}" for name, what in self.converted]
        if self.left_functional:
            lines.append("left functional (invisible to module-swapping passes):")
            width = max(len(name) for name, _ in self.left_functional)
            for name, what in self.left_functional:
                why = self.reasons.get(name)
                lines.append(f"  {name:<{width}}  {what}" + (f"  ({why})" if why else ""))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------- names of targets


@functools.cache
def _known_names() -> dict[int, tuple[Any, str]]:
    """id(callable) -> (callable, dotted public name) for operator.*, torch.nn.functional.* and torch.*."""
    table: dict[int, tuple[Any, str]] = {}
    for prefix, namespace in (("operator", operator), ("torch.nn.functional", F), ("torch", torch)):
        for name in dir(namespace):
            if name.startswith("_"):
                continue
            obj = getattr(namespace, name, None)
            if callable(obj) and not isinstance(obj, type):
                table[id(obj)] = (obj, f"{prefix}.{name}")  # torch.* wins for objects F re-exports
    table[id(builtins.getattr)] = (builtins.getattr, "getattr")
    return table


def _target_name(node: fx.Node) -> str:
    """The call as a user would write it: ``operator.add``, ``torch.cat``, ``Tensor.view``, …"""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return str(node.target)
    target = node.target
    if target is builtins.getattr and len(node.args) > 1 and isinstance(node.args[1], str):
        return f"Tensor.{node.args[1]}"
    known = _known_names().get(id(target))
    if known is not None and known[0] is target:
        return known[1]
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    return f"{module}.{name}" if module else str(name)


def _is_torch_callable(target: Any) -> bool:
    known = _known_names().get(id(target))
    if known is not None and known[0] is target:
        return known[1].startswith("torch.")
    return (getattr(target, "__module__", None) or "").startswith("torch")


# ------------------------------------------------------------------------------------ conversion rules

_REQUIRED = object()
_X = (("input", _REQUIRED),)
_XI = _X + (("inplace", False),)


@dataclass(frozen=True)
class _Rule:
    base: str  # the new module's name stem
    params: tuple[tuple[str, Any], ...]  # (name, default) in positional order; _REQUIRED = no default
    build: Callable[[dict[str, Any]], nn.Module]
    kind: str = "unary"  # "unary" (one tensor input), "add", "cat"
    inplace: bool = False  # always writes into its input (relu_, iadd)
    fresh: bool = True  # the functional call returns a new tensor (not a view) when not in-place


def _norm_stride(stride: Any) -> Any:
    # F.max_pool2d(stride=None) and torch.max_pool2d(stride=()) both mean "stride = kernel_size", which is
    # what nn.MaxPool2d(stride=None) does too.
    return None if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else stride


def _max_pool(force_indices: bool | None = None) -> Callable[[dict[str, Any]], nn.Module]:
    def build(a: dict[str, Any]) -> nn.Module:
        indices = a.get("return_indices", False) if force_indices is None else force_indices
        return nn.MaxPool2d(a["kernel_size"], _norm_stride(a["stride"]), a["padding"], a["dilation"],
                            return_indices=indices, ceil_mode=a["ceil_mode"])
    return build


def _adaptive_max_pool(force_indices: bool | None = None) -> Callable[[dict[str, Any]], nn.Module]:
    def build(a: dict[str, Any]) -> nn.Module:
        indices = a.get("return_indices", False) if force_indices is None else force_indices
        return nn.AdaptiveMaxPool2d(a["output_size"], return_indices=indices)
    return build


@functools.cache
def _rules() -> dict[tuple[str, Any], _Rule]:
    rules: dict[tuple[str, Any], _Rule] = {}

    def put(targets: list[Any], rule: _Rule) -> None:
        for target in targets:
            if target is None:
                continue
            rules[("call_method" if isinstance(target, str) else "call_function", target)] = rule

    def fn(namespace: Any, name: str) -> Any:
        return getattr(namespace, name, None)

    # activations
    put([F.relu], _Rule("relu", _XI, lambda a: nn.ReLU()))
    put([torch.relu, "relu"], _Rule("relu", _X, lambda a: nn.ReLU()))
    put([torch.relu_, fn(F, "relu_"), "relu_"], _Rule("relu", _X, lambda a: nn.ReLU(), inplace=True))
    put([F.relu6], _Rule("relu6", _XI, lambda a: nn.ReLU6()))
    hardtanh = _X + (("min_val", -1.0), ("max_val", 1.0))
    put([F.hardtanh], _Rule("hardtanh", hardtanh + (("inplace", False),),
                            lambda a: nn.Hardtanh(a["min_val"], a["max_val"])))
    put([fn(F, "hardtanh_")], _Rule("hardtanh", hardtanh, lambda a: nn.Hardtanh(a["min_val"], a["max_val"]),
                                    inplace=True))
    leaky = _X + (("negative_slope", 0.01),)
    put([F.leaky_relu], _Rule("leaky_relu", leaky + (("inplace", False),),
                              lambda a: nn.LeakyReLU(a["negative_slope"])))
    put([fn(F, "leaky_relu_")], _Rule("leaky_relu", leaky, lambda a: nn.LeakyReLU(a["negative_slope"]),
                                      inplace=True))
    put([torch.sigmoid, F.sigmoid, "sigmoid"], _Rule("sigmoid", _X, lambda a: nn.Sigmoid()))
    put([fn(torch, "sigmoid_"), "sigmoid_"], _Rule("sigmoid", _X, lambda a: nn.Sigmoid(), inplace=True))
    put([torch.tanh, F.tanh, "tanh"], _Rule("tanh", _X, lambda a: nn.Tanh()))
    put([fn(torch, "tanh_"), "tanh_"], _Rule("tanh", _X, lambda a: nn.Tanh(), inplace=True))
    put([F.hardswish], _Rule("hardswish", _XI, lambda a: nn.Hardswish()))
    put([F.hardsigmoid], _Rule("hardsigmoid", _XI, lambda a: nn.Hardsigmoid()))
    put([F.silu], _Rule("silu", _XI, lambda a: nn.SiLU()))
    put([F.gelu], _Rule("gelu", _X + (("approximate", "none"),), lambda a: nn.GELU(approximate=a["approximate"])))

    # pooling: every argument carried over
    max_pool = _X + (("kernel_size", _REQUIRED), ("stride", None), ("padding", 0), ("dilation", 1),
                     ("ceil_mode", False), ("return_indices", False))
    put([F.max_pool2d], _Rule("max_pool2d", max_pool, _max_pool()))
    put([fn(F, "max_pool2d_with_indices")], _Rule("max_pool2d", max_pool, _max_pool(True)))
    put([fn(torch, "max_pool2d")],
        _Rule("max_pool2d", _X + (("kernel_size", _REQUIRED), ("stride", ()), ("padding", 0), ("dilation", 1),
                                  ("ceil_mode", False)), _max_pool(False)))
    avg_pool = _X + (("kernel_size", _REQUIRED), ("stride", None), ("padding", 0), ("ceil_mode", False),
                     ("count_include_pad", True), ("divisor_override", None))
    put([F.avg_pool2d], _Rule("avg_pool2d", avg_pool, lambda a: nn.AvgPool2d(
        a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"], a["divisor_override"])))
    put([F.adaptive_avg_pool2d], _Rule("adaptive_avg_pool2d", _X + (("output_size", _REQUIRED),),
                                       lambda a: nn.AdaptiveAvgPool2d(a["output_size"])))
    adaptive_max = _X + (("output_size", _REQUIRED), ("return_indices", False))
    put([F.adaptive_max_pool2d], _Rule("adaptive_max_pool2d", adaptive_max, _adaptive_max_pool()))
    put([fn(F, "adaptive_max_pool2d_with_indices")],
        _Rule("adaptive_max_pool2d", adaptive_max, _adaptive_max_pool(True)))

    # flatten (may return a view of its input: not "fresh")
    put([torch.flatten, "flatten"], _Rule("flatten", _X + (("start_dim", 0), ("end_dim", -1)),
                                          lambda a: nn.Flatten(a["start_dim"], a["end_dim"]), fresh=False))

    # joins
    put([operator.add], _Rule("add", (("input", _REQUIRED), ("other", _REQUIRED)), lambda a: Add(), kind="add"))
    put([torch.add, "add"], _Rule("add", (("input", _REQUIRED), ("other", _REQUIRED), ("alpha", 1)),
                                  lambda a: Add(), kind="add"))
    put([operator.iadd], _Rule("add", (("input", _REQUIRED), ("other", _REQUIRED)), lambda a: Add(),
                               kind="add", inplace=True))
    put([torch.cat, fn(torch, "concat")], _Rule("cat", (("tensors", _REQUIRED), ("dim", 0)),
                                                lambda a: Concat(a["dim"]), kind="cat"))
    put([fn(torch, "concatenate")], _Rule("cat", (("tensors", _REQUIRED), ("axis", 0)),
                                          lambda a: Concat(a["axis"]), kind="cat"))
    return rules


def _rule_for(node: fx.Node) -> _Rule | None:
    if node.op not in ("call_function", "call_method"):
        return None
    try:
        return _rules().get((node.op, node.target))
    except TypeError:  # unhashable target
        return None


def _bind(node: fx.Node, params: tuple[tuple[str, Any], ...]) -> dict[str, Any] | str:
    """Map the node's args/kwargs onto ``params``; a string says why that is impossible."""
    names = [name for name, _ in params]
    if len(node.args) > len(params):
        return f"{len(node.args)} positional arguments, expected at most {len(params)}"
    bound = dict(zip(names, node.args, strict=False))
    for key, value in node.kwargs.items():
        if key not in names:
            return f"argument '{key}' has no module equivalent"
        if key in bound:
            return f"argument '{key}' given twice"
        bound[key] = value
    for name, default in params:
        if name not in bound:
            if default is _REQUIRED:
                return f"argument '{name}' is missing"
            bound[name] = default
    return bound


def _has_node(value: Any) -> bool:
    found = False

    def visit(v: Any) -> Any:
        nonlocal found
        if isinstance(v, fx.Node):
            found = True
        return v

    fx.node.map_aggregate(value, visit)
    return found


# -------------------------------------------------------------------------------------- value analysis

_SCALAR_METHODS = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "item", "tolist", "element_size", "stride",
    "storage_offset", "is_contiguous", "data_ptr", "get_device", "is_floating_point", "is_complex", "__len__",
})
_SEQ_NAMES = frozenset({
    "split", "split_with_sizes", "chunk", "unbind", "tensor_split", "hsplit", "vsplit", "dsplit", "meshgrid",
    "broadcast_tensors", "unsafe_split", "unsafe_chunk",
})
_MAYBE_SEQ_NAMES = frozenset({
    "max", "min", "median", "nanmedian", "mode", "kthvalue", "cummax", "cummin", "sort", "topk", "aminmax",
    "unique", "unique_consecutive", "var_mean", "std_mean", "frexp", "histogram", "lu", "qr", "svd",
    "slogdet", "lstsq", "eig", "max_pool2d_with_indices", "adaptive_max_pool2d_with_indices",
})
_SCALAR_ATTRS = frozenset({
    "shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "names", "is_sparse",
    "is_quantized", "is_leaf", "is_meta",
})
_TENSOR_ATTRS = frozenset({"T", "mT", "H", "mH", "data", "real", "imag", "grad"})
_OPERATORS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.pow, operator.matmul, operator.neg, operator.pos, operator.abs, operator.invert, operator.and_,
    operator.or_, operator.xor, operator.lshift, operator.rshift, operator.lt, operator.le, operator.gt,
    operator.ge, operator.eq, operator.ne, operator.iadd, operator.isub, operator.imul, operator.itruediv,
})
_SCALAR_FUNCTIONS = frozenset({builtins.len, builtins.int, builtins.float, builtins.bool, builtins.min,
                               builtins.max, builtins.abs, builtins.round})

# Ops that always allocate their result (never a view or their input itself): used by the alias analysis.
_FRESH_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.matmul, operator.neg, torch.add, torch.sub, torch.mul, torch.div, torch.matmul, torch.mm, torch.bmm,
    torch.stack, torch.clone, torch.softmax, torch.log_softmax, torch.exp, torch.log, torch.sqrt, torch.mean,
    torch.sum, F.softmax, F.log_softmax, F.linear, F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.layer_norm,
    F.group_norm,
})
_FRESH_METHODS = frozenset({
    "add", "sub", "mul", "div", "matmul", "softmax", "log_softmax", "clone", "sum", "mean", "exp", "log",
    "sqrt", "pow", "neg", "abs",
})
_FRESH_MODULES: tuple[type, ...] = (
    nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
    nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.ReLU, nn.Hardtanh, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU,
    nn.ELU, nn.Softmax, nn.LogSoftmax, nn.PReLU, nn.Embedding, Add, Concat,
)


def _member(target: Any, group: frozenset[Any]) -> bool:
    try:
        return target in group
    except TypeError:  # an unhashable callable
        return False


class _Analysis:
    """Per-graph facts: what kind of value each node holds, and which nodes may share memory."""

    def __init__(self, graph: fx.Graph, root: nn.Module) -> None:
        self.root = root
        self.nodes = list(graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self._kind: dict[fx.Node, str | None] = {}
        self._aliases: dict[fx.Node, set[fx.Node]] | None = None

    # "tensor", "seq" (tuple/list of tensors), "scalar" (shapes, sizes, Python numbers) or None (unknown)
    def kind(self, node: fx.Node) -> str | None:
        if node not in self._kind:
            self._kind[node] = self._compute_kind(node)
        return self._kind[node]

    def _compute_kind(self, node: fx.Node) -> str | None:
        if node.op == "placeholder":
            if node.type in (int, float, bool, str, torch.Size):
                return "scalar"
            if node.args and node.args[0] is not None and isinstance(node.args[0], (int, float, bool, str)):
                return "scalar"
            return "tensor"
        if node.op == "get_attr":
            try:
                value = operator.attrgetter(str(node.target))(self.root)
            except AttributeError:
                return None
            return "tensor" if isinstance(value, torch.Tensor) else None
        if node.op == "call_module":
            module = self._module(node)
            if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)) or getattr(module, "return_indices", False):
                return "seq"
            return "tensor"
        if node.op == "call_method":
            receiver = self.kind(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            if receiver == "scalar":
                return "scalar"
            if receiver != "tensor":
                return None
            name = str(node.target)
            if name in _SCALAR_METHODS:
                return "scalar"
            if name in _SEQ_NAMES:
                return "seq"
            if name in _MAYBE_SEQ_NAMES:
                return None
            return "tensor"
        if node.op != "call_function":
            return None
        target = node.target
        if target is operator.getitem:
            container = self.kind(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            return {"scalar": "scalar", "seq": "tensor", "tensor": "tensor"}.get(container or "")
        if target is builtins.getattr:
            attr = node.args[1] if len(node.args) > 1 else None
            if attr in _SCALAR_ATTRS:
                return "scalar"
            return "tensor" if attr in _TENSOR_ATTRS else None
        if _member(target, _OPERATORS):
            kinds = [self._value_kind(a) for a in node.args]
            if "tensor" in kinds:
                return "tensor"
            if all(k == "scalar" for k in kinds):
                return "scalar"
            if target in (operator.add, operator.mul) and "seq" in kinds:
                return "seq"
            return None
        if _member(target, _SCALAR_FUNCTIONS) or getattr(target, "__module__", None) == "math":
            return "scalar"
        if _is_torch_callable(target):
            name = getattr(target, "__name__", "")
            if name in _SEQ_NAMES:
                return "seq"
            if name in _MAYBE_SEQ_NAMES:
                return None
            return "tensor"
        return None

    def _value_kind(self, value: Any) -> str | None:
        if isinstance(value, fx.Node):
            return self.kind(value)
        if isinstance(value, (list, tuple)):
            return "seq"
        if isinstance(value, (int, float, bool, complex)):
            return "scalar"
        return None

    def _module(self, node: fx.Node) -> nn.Module | None:
        try:
            return self.root.get_submodule(str(node.target))
        except AttributeError:
            return None

    # ------------------------------------------------------------------------------- alias analysis

    def _alias_inputs(self, node: fx.Node) -> list[fx.Node]:
        """Input nodes whose memory ``node``'s result may share (view, same tensor, unknown op)."""
        if node.op in ("placeholder", "get_attr", "output") or self.kind(node) == "scalar":
            return []
        inputs = [n for n in node.all_input_nodes if self.kind(n) != "scalar"]
        if node.op == "call_module":
            module = self._module(node)
            fresh = isinstance(module, _FRESH_MODULES) and not getattr(module, "inplace", False)
            return [] if fresh else inputs
        rule = _rule_for(node)
        if rule is not None:
            mutated = self._inplace_input(node, rule)
            if mutated is not None:
                return [mutated]
        if self.kind(node) != "tensor":  # e.g. a tuple concatenation: its items are the inputs' items
            return inputs
        if rule is not None:
            return [] if rule.fresh else inputs
        if node.op == "call_method" and node.target in _FRESH_METHODS:
            return []
        if node.op == "call_function" and _member(node.target, _FRESH_FUNCTIONS):
            return []
        return inputs

    @staticmethod
    def _inplace_input(node: fx.Node, rule: _Rule) -> fx.Node | None:
        """The node an in-place call overwrites (its first argument), or None for an out-of-place call."""
        first = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(first, fx.Node):
            return None
        if rule.inplace:
            return first
        flag = node.kwargs.get("inplace")
        if flag is None:
            names = [name for name, _ in rule.params]
            if "inplace" in names and len(node.args) > names.index("inplace"):
                flag = node.args[names.index("inplace")]
        return first if flag is True else None

    def _alias_graph(self) -> dict[fx.Node, set[fx.Node]]:
        if self._aliases is None:
            edges: dict[fx.Node, set[fx.Node]] = {n: set() for n in self.nodes}
            for node in self.nodes:
                for other in self._alias_inputs(node):
                    edges[node].add(other)
                    edges.setdefault(other, set()).add(node)
            self._aliases = edges
        return self._aliases

    def inplace_conflict(self, node: fx.Node, mutated: fx.Node, other: Any = None) -> str | None:
        """Why replacing the in-place ``node`` (overwriting ``mutated``) by an out-of-place module is unsafe.

        Safe when every tensor that may share memory with ``mutated`` (its alias class) is neither a model
        input, parameter or buffer nor read after ``node`` — except through ``node``'s own result and the
        views derived from it, which see the new values in both versions.
        """
        edges = self._alias_graph()
        members = {mutated}
        todo = [mutated]
        while todo:
            for neighbour in edges.get(todo.pop(), ()):
                if neighbour not in members:
                    members.add(neighbour)
                    todo.append(neighbour)
        external = [m for m in members if m.op in ("placeholder", "get_attr")]
        if external:
            what = "model input" if external[0].op == "placeholder" else "parameter or buffer"
            return f"in-place on a {what} ({external[0].name}); an out-of-place module would not update it"
        if isinstance(other, fx.Node) and other is not mutated and other in members:
            return "in-place with an operand that shares memory with the overwritten tensor"
        here = self.pos[node]
        derived = {node}
        for later in self.nodes[here + 1:]:
            if any(src in derived for src in self._alias_inputs(later)):
                derived.add(later)
        for member in members - derived:
            for user in member.users:
                if user is not node and self.pos.get(user, -1) > here:
                    reader = "the model output" if user.op == "output" else _target_name(user)
                    return (f"in-place on a tensor that is read again afterwards (by {reader}); "
                            "an out-of-place module would change what that reader sees")
        return None


# ----------------------------------------------------------------------------------------------- plans


@dataclass
class _Plan:
    node: fx.Node
    base: str
    module: nn.Module
    args: tuple[Any, ...]
    replaced: str
    dead: list[fx.Node] = field(default_factory=list)  # nodes only the replaced node used (size queries)


def _batch_size_of(value: Any, source: fx.Node) -> list[fx.Node] | None:
    """If ``value`` is ``source.size(0)`` / ``source.size()[0]`` / ``source.shape[0]``: the nodes computing it."""
    if not isinstance(value, fx.Node):
        return None
    if value.op == "call_method" and value.target == "size" and value.args and value.args[0] is source:
        dim = value.args[1] if len(value.args) > 1 else value.kwargs.get("dim")
        if len(value.args) <= 2 and set(value.kwargs) <= {"dim"} and dim == 0 and type(dim) is int:
            return [value]
        return None
    if value.op == "call_function" and value.target is operator.getitem and len(value.args) == 2:
        container, index = value.args
        if type(index) is not int or index != 0 or not isinstance(container, fx.Node):
            return None
        if (container.op == "call_method" and container.target == "size" and container.args == (source,)
                and not container.kwargs):
            return [value, container]
        if (container.op == "call_function" and container.target is builtins.getattr
                and container.args == (source, "shape")):
            return [value, container]
    return None


def _plan_flatten_view(node: fx.Node) -> _Plan | None:
    """``x.view(x.size(0), -1)`` / ``x.reshape(...)`` / ``torch.reshape(x, (...))`` -> ``nn.Flatten(1)``."""
    if node.op == "call_method" and node.target in ("view", "reshape"):
        replaced = f"Tensor.{node.target}"
    elif node.op == "call_function" and node.target is torch.reshape:
        replaced = "torch.reshape"
    else:
        return None
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    shape: Any = node.args[1:]
    if node.kwargs:
        if set(node.kwargs) != {"shape"} or shape:
            return None
        shape = node.kwargs["shape"]
    if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
        shape = shape[0]
    if len(shape) != 2 or type(shape[1]) is not int or shape[1] != -1:
        return None
    size_nodes = _batch_size_of(shape[0], source)
    if size_nodes is None:
        return None
    return _Plan(node, "flatten", nn.Flatten(1), (source,), replaced, dead=size_nodes)


def _plan_node(node: fx.Node, rule: _Rule, analysis: _Analysis) -> _Plan | str:
    """A conversion plan for a node that matches ``rule``, or the reason it must stay functional."""
    bound = _bind(node, rule.params)
    if isinstance(bound, str):
        return bound
    replaced = _target_name(node)
    mutated: fx.Node | None = None
    other: Any = None
    if rule.kind == "add":
        a, b = bound["input"], bound["other"]
        for operand in (a, b):
            if not isinstance(operand, fx.Node):
                return f"adds the constant {operand!r}, not two tensors"
            kind = analysis.kind(operand)
            if kind != "tensor":
                what = {"scalar": "a Python number or shape", "seq": "a tuple/list"}.get(
                    kind or "", "not known to be a tensor")
                return f"operand {operand.name} is {what}"
        alpha = bound.get("alpha", 1)
        if _has_node(alpha) or isinstance(alpha, bool) or alpha != 1:
            return f"alpha={alpha!r} has no Add module equivalent"
        args: tuple[Any, ...] = (a, b)
        if rule.inplace:
            mutated, other = a, b
    elif rule.kind == "cat":
        tensors = bound["tensors"]
        dim = bound["dim" if "dim" in bound else "axis"]
        if type(dim) is not int:
            return f"dim={dim!r} is not a constant integer"
        if isinstance(tensors, fx.Node):
            if analysis.kind(tensors) != "seq":
                return f"concatenates {tensors.name}, not known to be a tuple/list of tensors"
            args = (tensors,)
        elif isinstance(tensors, (list, tuple)) and tensors and all(isinstance(t, fx.Node) for t in tensors):
            args = tuple(tensors)
        else:
            return "the tensors to concatenate are not a list of graph values"
    else:
        source = bound["input"]
        if not isinstance(source, fx.Node):
            return "its input is not a graph value"
        for name, value in bound.items():
            if name != "input" and _has_node(value):
                return f"argument '{name}' is computed in the graph, not a constant"
        if "inplace" in bound and not isinstance(bound["inplace"], bool):
            return f"inplace={bound['inplace']!r} is not a constant bool"
        if rule.base == "flatten" and not all(type(bound[k]) is int for k in ("start_dim", "end_dim")):
            return "start_dim/end_dim are not integers"
        args = (source,)
        if rule.inplace or bound.get("inplace") is True:
            mutated = source
    if mutated is not None:
        conflict = analysis.inplace_conflict(node, mutated, other)
        if conflict is not None:
            return conflict
    try:
        module = rule.build(bound)
    except Exception as exc:  # an argument the module's constructor refuses: keep the call as it is
        return f"cannot build the module: {type(exc).__name__}: {exc}"
    return _Plan(node, rule.base, module, args, replaced)


def _plan_all(graph: fx.Graph, analysis: _Analysis) -> tuple[list[_Plan], dict[str, str]]:
    plans: list[_Plan] = []
    reasons: dict[str, str] = {}
    for node in graph.nodes:
        plan: _Plan | str | None = _plan_flatten_view(node)
        if plan is None:
            rule = _rule_for(node)
            if rule is None:
                continue
            plan = _plan_node(node, rule, analysis)
        if isinstance(plan, str):
            reasons[node.name] = plan
        else:
            plans.append(plan)
    return plans, reasons


# ------------------------------------------------------------------------------------ module plumbing


def _attr_keys(module: nn.Module) -> dict[str, set[str]]:
    return {"__dict__": set(module.__dict__), "_parameters": set(module._parameters),
            "_buffers": set(module._buffers), "_modules": set(module._modules)}


def _take_new_attrs(module: nn.Module, before: dict[str, set[str]]) -> dict[str, dict[str, Any]]:
    """Remove (and return) what tracing attached to ``module`` (fx stores tensor constants on the root)."""
    taken: dict[str, dict[str, Any]] = {}
    for where, keys in before.items():
        store = module.__dict__ if where == "__dict__" else getattr(module, where)
        new = [k for k in store if k not in keys]
        taken[where] = {k: store.pop(k) for k in new}
    module._non_persistent_buffers_set -= set(taken["_buffers"])
    return taken


def _put_back(module: nn.Module, taken: dict[str, dict[str, Any]]) -> None:
    for where, items in taken.items():
        store = module.__dict__ if where == "__dict__" else getattr(module, where)
        store.update(items)


def _mode_dependence(root: nn.Module, graph: fx.Graph, leaf_modules: tuple[type, ...],
                     trace_start: dict[str, set[str]]) -> str | None:
    """Trace again with every module's training flag flipped; a different graph means fx baked the mode in.

    The first trace's tensor constants are set aside meanwhile, so both traces name them alike.
    """
    flags = [(m, m.training) for m in root.modules()]
    stash = _take_new_attrs(root, trace_start)
    before = _attr_keys(root)
    tracer = MicronetTracer(leaf_modules)
    mode = "eval" if root.training else "train"
    try:
        for m, flag in flags:
            m.training = not flag  # not .train(): a user override of train() may have side effects
        other = tracer.trace(root)
    except Exception as exc:
        return (f"torch.fx traced the model in its current mode but not in {mode} mode: "
                + describe_trace_failure(exc, tracer, root))
    finally:
        for m, flag in flags:
            m.training = flag
        _take_new_attrs(root, before)
        _put_back(root, stash)
    ours = graph.python_code("self").src.splitlines()
    theirs = other.python_code("self").src.splitlines()
    if ours == theirs:
        return None
    diff = next((f"`{a.strip()}` vs `{b.strip()}`" for a, b in zip(ours, theirs, strict=False) if a != b),
                "the graphs have different lengths")
    return ("forward depends on the training mode outside any leaf module (e.g. F.dropout(..., "
            f"training=self.training) or `if self.training:`): torch.fx bakes the mode in, so the traced "
            f"graph would be wrong after .train()/.eval(); first difference ({mode} mode): {diff}. Use a "
            "module (nn.Dropout) or make the submodule a leaf with leaf_modules=(...)")


def _unique_name(gm: nn.Module, base: str, taken: set[str]) -> str:
    candidate, i = base, 0
    while candidate in taken or hasattr(gm, candidate):
        i += 1
        candidate = f"{base}_{i}"
    taken.add(candidate)
    return candidate


def _restore_structure(gm: fx.GraphModule, root: nn.Module, constants: set[str]) -> None:
    """Give ``gm`` every submodule, parameter and buffer of ``root`` (so state_dict keys are unchanged).

    GraphModule copies only what the graph references, and builds plain ``nn.Module`` containers for the
    paths in between; modules the forward never calls and attributes on those containers would be lost.
    ``constants`` are the tensors fx lifted out of the forward (``_tensor_constant0`` …): GraphModule stores
    them as buffers, made non-persistent here so they do not appear in the state_dict.
    """
    for path, original in root.named_modules(remove_duplicate=False):
        if path:
            parent_path, _, leaf = path.rpartition(".")
            parent = gm.get_submodule(parent_path) if parent_path else gm
            if leaf not in parent._modules:
                parent._modules[leaf] = original  # includes None placeholders
                continue
        target = gm.get_submodule(path) if path else gm
        if target is original:
            continue
        target.training = original.training
        for name, param in original._parameters.items():
            if name not in target._parameters and name not in target.__dict__:
                target._parameters[name] = param
        for name, buf in original._buffers.items():
            if name not in target._buffers and name not in target.__dict__:
                target._buffers[name] = buf
            if name in target._buffers:  # GraphModule registers the buffers it copies as persistent
                if name in original._non_persistent_buffers_set:
                    target._non_persistent_buffers_set.add(name)
                else:
                    target._non_persistent_buffers_set.discard(name)
        for name, child in original._modules.items():
            if name not in target._modules:
                target._modules[name] = child
        for store in ("_parameters", "_buffers", "_modules"):  # the original's order: same state_dict order
            ours, theirs = getattr(target, store), getattr(original, store)
            order = [k for k in theirs if k in ours] + [k for k in ours if k not in theirs]
            for key in order:
                ours[key] = ours.pop(key)
    non_persistent = frozenset((root._non_persistent_buffers_set | constants) & set(gm._buffers))
    if non_persistent:
        gm._non_persistent_buffers_set |= non_persistent
        if hasattr(gm, "_deepcopy_hooks"):
            gm._deepcopy_hooks.append(_KeepNonPersistent(non_persistent))


class _KeepNonPersistent:
    """GraphModule's deepcopy re-registers root buffers as persistent; this hook undoes that."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def __call__(self, gm: fx.GraphModule) -> None:
        gm._non_persistent_buffers_set |= {n for n in self.names if n in gm._buffers}

    def __deepcopy__(self, memo: dict[int, Any]) -> _KeepNonPersistent:
        return self


def _preserve_attributes(gm: fx.GraphModule, root: nn.Module) -> None:
    """Carry public plain attributes of the root (e.g. a registry model's ``arch``), also through deepcopy."""
    kept: dict[str, Any] = {}
    for name, value in root.__dict__.items():
        if name.startswith("_") or name == "training" or hasattr(gm, name):
            continue
        setattr(gm, name, value)
        kept[name] = value
    if kept:
        key = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")
        gm.meta.setdefault(key, {}).update(kept)


def _left_functional(graph: fx.Graph, analysis: _Analysis, reasons: dict[str, str]) -> tuple[
        list[tuple[str, str]], dict[str, str]]:
    left: list[tuple[str, str]] = []
    why: dict[str, str] = {}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        if analysis.kind(node) == "scalar":
            continue  # shape arithmetic, not a tensor computation
        if (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
                and analysis.kind(node.args[0]) == "seq"):
            continue  # unpacking a tuple output
        left.append((node.name, _target_name(node)))
        why[node.name] = reasons.get(node.name, "no module equivalent")
    return left, why


# --------------------------------------------------------------------------------------------- the pass


def _working_copy(model: nn.Module, inplace: bool, leaf_modules: tuple[type, ...]) -> nn.Module:
    """``model`` itself (``inplace``) or its deep copy, after checking the arguments."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"modularize needs an nn.Module, got {type(model).__name__}")
    bad = [t for t in leaf_modules if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad:
        raise TypeError(f"leaf_modules must be nn.Module subclasses, got {bad!r}")
    if inplace:
        return model
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise TypeError(f"modularize could not deep-copy the model ({type(exc).__name__}: {exc}); make it "
                        "deep-copyable or pass inplace=True") from exc


def _apply_plans(gm: fx.GraphModule, plans: list[_Plan]) -> list[tuple[str, str]]:
    """Replace each planned functional call by a call of its new submodule; returns (name, replaced op)."""
    taken: set[str] = set()
    converted: list[tuple[str, str]] = []
    g = gm.graph
    replacement: dict[fx.Node, fx.Node] = {}  # planned args may name nodes replaced by an earlier plan
    for plan in plans:
        name = _unique_name(gm, plan.base, taken)
        plan.module.train(gm.training)
        gm.add_submodule(name, plan.module)
        args = fx.node.map_arg(plan.args, lambda n: replacement.get(n, n))
        with g.inserting_before(plan.node):
            new = g.call_module(name, args)
        replacement[plan.node] = new
        new.meta.update({k: v for k, v in plan.node.meta.items() if k in ("stack_trace", "nn_module_stack")})
        plan.node.replace_all_uses_with(new)
        g.erase_node(plan.node)
        for dead in plan.dead:  # the x.size(0) that only the replaced view used
            if not dead.users:
                g.erase_node(dead)
        converted.append((name, plan.replaced))
    g.lint()
    gm.recompile()
    return converted


def modularize(model: nn.Module, *, inplace: bool = False,
               leaf_modules: tuple[type, ...] = ()) -> tuple[nn.Module, ModularizeReport]:
    """Trace ``model`` with torch.fx and turn functional tensor ops into submodule calls.

    Returns ``(module, report)``. ``module`` is a ``torch.fx.GraphModule`` (class name = the model's)
    holding the original submodules under their original paths (``state_dict`` keys unchanged) plus one
    new submodule per converted call, named after the op (``add``, ``add_1``, ``relu_2``, ``cat`` …). Its
    output equals the model's bit for bit, in train and eval mode. When there is nothing to convert the
    model itself is returned (a deep copy unless ``inplace``), class and attributes intact.

    ``inplace=False`` (default) deep-copies the model first. With ``inplace=True`` nothing is copied:
    the returned module shares its submodules and parameters with ``model`` (``model`` itself keeps
    working). Submodules of the types in ``leaf_modules`` are not traced into (nor are torch's or
    micronet's own modules). A model torch.fx cannot trace (data-dependent control flow, …) is returned
    unchanged with ``report.traced = False`` and the reason in ``report.trace_error``; nothing is raised.
    """
    leaf_modules = tuple(leaf_modules)
    root = _working_copy(model, inplace, leaf_modules)
    before = _attr_keys(root)
    tracer = MicronetTracer(leaf_modules)
    try:
        graph = tracer.trace(root)
    except Exception as exc:
        _take_new_attrs(root, before)
        error = "torch.fx could not trace the model: " + describe_trace_failure(exc, tracer, root)
        return root, ModularizeReport(traced=False, trace_error=error)

    analysis = _Analysis(graph, root)
    plans, reasons = _plan_all(graph, analysis)
    if not plans:
        left, why = _left_functional(graph, analysis, reasons)
        _take_new_attrs(root, before)
        return root, ModularizeReport(left_functional=left, reasons=why)

    problem = _mode_dependence(root, graph, leaf_modules, before)
    if problem is not None:
        _take_new_attrs(root, before)
        return root, ModularizeReport(traced=False, trace_error=problem)

    gm = fx.GraphModule(root, graph, class_name=type(root).__name__)
    constants = _take_new_attrs(root, before)  # gm holds its own references to fx's tensor constants
    _restore_structure(gm, root, set(constants["__dict__"]))

    analysis.root = gm  # resolves the new submodules too
    converted = _apply_plans(gm, plans)
    _preserve_attributes(gm, root)

    left, why = _left_functional(gm.graph, analysis, reasons)
    return gm, ModularizeReport(converted=converted, left_functional=left, reasons=why)
