"""``compile_packed``: rewrite a binary network so its binary layers run on packed bits.

The model's dataflow comes from a torch.fx trace (the tracer BatchNorm fusion uses). Every value of the
rewritten graph is either a float tensor or :class:`PackedBits`:

* a sign activation turns a float tensor into bits (:class:`PackSign`);
* a binary conv (per-output-channel ±α weights, the standard wbwtab W=2 layer, fused or not) whose input
  is binary becomes a :class:`PackedConv2d`; when its output reaches a sign through per-channel modules
  only (BatchNorm, Identity, Dropout), those modules and the sign are absorbed into an integer threshold
  epilogue and the conv writes bits, so consecutive binary layers pass bits, never floats;
* max pooling and channel shuffles of a binary value run on the bits; Identity / Dropout pass them on;
* everything else (the float first and last layers, additions, average pooling, the head) runs in torch
  on floats, and :class:`Unpack` turns bits back into ±1 floats where such a layer reads them.

A layer the kernels do not cover is not an error: it stays in torch, which computes it correctly, and is
listed in :attr:`PackedModel.report` with the reason. A model without a single binary conv is refused:
running it "packed" would only relabel the float model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from micronet.compression.quantization.core.integer_bias import IntegerBiasBatchNorm2d, batchnorm_factor_and_bias
from micronet.deploy.packed.kernels import kernels_for, resolve_isa
from micronet.deploy.packed.layers import (
    PackedChannelShuffle,
    PackedConv2d,
    PackedMaxPool2d,
    PackSign,
    Unpack,
    _PackedModule,
)
from micronet.errors import DeployError

__all__ = ["PackedModel", "PackedReport", "compile_packed", "set_isa"]

_PER_CHANNEL = (nn.BatchNorm2d, nn.Identity, nn.Dropout)  # may lie between a conv and its sign
_BIT_PASS_THROUGH = (nn.Identity, nn.Dropout)
FLOAT, BITS = "float", "bits"


@dataclass
class PackedReport:
    """What runs where: ``packed`` (layer, what it became) and ``torch`` (layer, why it stayed in torch)."""

    isa: str
    packed: list[tuple[str, str]] = field(default_factory=list)
    torch: list[tuple[str, str]] = field(default_factory=list)

    def rows(self) -> list[dict[str, str]]:
        return ([{"layer": n, "runs on": f"packed ({self.isa})", "detail": d} for n, d in self.packed]
                + [{"layer": n, "runs on": "torch", "detail": d} for n, d in self.torch])

    def summary(self) -> str:
        convs = sum(1 for _, d in self.packed if d.startswith("binary conv"))
        line = f"{convs} binary convolutions on packed bits ({self.isa} kernels)"
        if self.torch:
            line += "; in torch: " + "; ".join(f"{n} ({d})" for n, d in self.torch)
        return line


class PackedModel(nn.Module):
    """The compiled model: ``forward(x)`` takes and returns what the original model does."""

    def __init__(self, graph_module: fx.GraphModule, report: PackedReport) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.report = report

    @property
    def isa(self) -> str:
        return self.report.isa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.graph_module(x)

    def resident_binary_weight_bytes(self) -> tuple[int, int]:
        """(bytes of the packed convs' weight bits, bytes their FP32 weights would take)."""
        layers = [m for m in self.modules() if isinstance(m, PackedConv2d)]
        fp32 = sum(4 * m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                   for m in layers)
        return sum(m.weight_words.numel() * 8 for m in layers), fp32

    def resident_binary_bytes(self) -> int:
        """Every byte the packed convs keep: weight bits, group offsets and masks, epilogue parameters."""
        return sum(m.resident_bytes() for m in self.modules() if isinstance(m, PackedConv2d))


def set_isa(model: PackedModel, isa: str | None) -> PackedModel:
    """Switch every packed layer of ``model`` to the kernels ``isa`` names (see :func:`resolve_isa`)."""
    name = resolve_isa(isa)
    kernels = kernels_for(name)
    for module in model.modules():
        if isinstance(module, _PackedModule):
            module.kernels = kernels
    model.report.isa = kernels.name
    return model


# ------------------------------------------------------------------------------------------ layer analysis
def _grid_kind(module: nn.Module | None) -> str | None:
    """The activation grid kind a quantizer describes ("float", "sign", "codes"), None for other modules."""
    from micronet.compression.quantization.core.quantizers import Quantizer
    from micronet.errors import QuantizationError

    if not isinstance(module, Quantizer):
        return None
    try:
        return module.activation_grid().kind
    except QuantizationError:
        return None


def _is_sign(module: nn.Module | None) -> bool:
    return _grid_kind(module) == "sign" and bool(module.enabled.item())


def _is_identity_quantizer(module: nn.Module) -> bool:
    return _grid_kind(module) == "float" or not bool(getattr(module, "enabled", torch.ones(())).item())


@torch.no_grad()
def _binary_weight(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(signs, α) of a conv whose effective weight is ±α per output channel, or why it is not one."""
    from micronet.compression.quantization.core.modules import QuantConv2d

    if not isinstance(conv, QuantConv2d):
        return "float weights"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (the kernels pad with zeros)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    weight = conv.quantized_weight().detach().float()
    alpha = weight.abs().amax(dim=(1, 2, 3))
    if not torch.equal(weight.abs(), alpha.view(-1, 1, 1, 1).expand_as(weight)):
        return "weights are not ±α per output channel (ternary or multi-bit): not a binary layer"
    return weight >= 0, alpha


def _sign_chain(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[fx.Node], fx.Node] | None:
    """The per-channel modules from ``node`` to the sign that consumes it, each the only user of the last."""
    chain: list[fx.Node] = []
    current = node
    while True:
        users = list(current.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op != "call_module" or len(user.args) != 1 or user.kwargs or user.args[0] is not current:
            return None
        module = modules[user.target]
        if _is_sign(module):
            return chain, user
        if not isinstance(module, _PER_CHANNEL):
            return None
        if isinstance(module, nn.BatchNorm2d) and module.running_mean is None:
            return None  # batch statistics: not a per-channel map of one sample
        chain.append(user)
        current = user


def _batchnorm_after(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The eval-mode BatchNorm that alone reads ``node`` (its only user), if any."""
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    if user.op != "call_module" or user.args != (node,) or user.kwargs:
        return None
    module = modules[user.target]
    if not isinstance(module, nn.BatchNorm2d) or module.running_mean is None:
        return None
    return user


@torch.no_grad()
def _fold_affine(module: nn.Module, alpha: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α', b') with module(D·α + b) = D·α' + b' per channel, for a per-channel affine ``module`` in eval
    (a BatchNorm, the int32-bias one included), read off the module itself at 0 and 1."""
    channels = alpha.numel()
    offset = module(torch.zeros(1, channels, 1, 1)).flatten()
    factor = module(torch.ones(1, channels, 1, 1)).flatten() - offset
    return alpha * factor, bias * factor + offset


@torch.no_grad()
def _threshold(chain: list[nn.Module], alpha: torch.Tensor, bias: torch.Tensor,
               reach: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per channel (T, flip) with sign(chain(D·α + b)) = +1 ⟺ (D ≥ T) XOR flip for every integer
    |D| ≤ ``reach``, found by evaluating the chain on all of them; None where a channel is not monotone."""
    dots = torch.arange(-reach, reach + 1, dtype=torch.float32)
    z = dots.view(1, 1, 1, -1) * alpha.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    for module in chain:
        z = module(z)
    bits = (z >= 0).reshape(alpha.numel(), -1)
    steps = bits[:, 1:].to(torch.int8) - bits[:, :-1].to(torch.int8)
    rising, falling = (steps >= 0).all(dim=1), (steps <= 0).all(dim=1)
    if not bool((rising | falling).all()):
        return None
    count = bits.shape[1]
    first_one = torch.where(bits.any(dim=1), bits.to(torch.int8).argmax(dim=1), torch.full_like(alpha, count, dtype=torch.int64))
    zeros = ~bits
    first_zero = torch.where(zeros.any(dim=1), zeros.to(torch.int8).argmax(dim=1), torch.full_like(alpha, count, dtype=torch.int64))
    flip = ~rising
    index = torch.where(flip, first_zero, first_one)
    return (index - reach).to(torch.int32), flip


def _native_batchnorm(bn: IntegerBiasBatchNorm2d) -> nn.BatchNorm2d:
    """A plain BatchNorm2d computing what ``bn`` computes in eval, ``x·(γ/σ) + shift`` (its int32-grid shift
    where it has one), in torch's one-pass kernel: the same affine map up to float rounding."""
    folded = bn.integer_shift()
    if folded is None:
        factor, shift = batchnorm_factor_and_bias(bn, None)
    else:
        factor, _, shift = folded
        added = bn._conv.integer_bias(bn._conv.bias)
        shift = shift - (added.detach().double() * factor if added is not None else 0.0)
    native = nn.BatchNorm2d(bn.num_features, eps=0.0).eval()
    with torch.no_grad():
        native.weight.copy_(factor.float())
        native.bias.copy_(shift.float())
        native.running_mean.zero_()
        native.running_var.fill_(1.0)
    return native


# ------------------------------------------------------------------------------------------ rewrite
class _Rewriter:
    def __init__(self, root: nn.Module, graph: fx.Graph, report: PackedReport, channels_last: bool) -> None:
        self.root, self.old, self.report, self.channels_last = root, graph, report, channels_last
        self.modules = dict(root.named_modules())
        self.calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
        self.new = fx.Graph()
        self.env: dict[fx.Node, tuple[fx.Node, str]] = {}
        self.unpacked: dict[fx.Node, fx.Node] = {}
        self.absorbed: set[fx.Node] = set()
        self.helpers = 0

    def helper(self, module: nn.Module, stem: str) -> str:
        self.helpers += 1
        name = f"packed_{stem}_{self.helpers}"
        self.root.add_module(name, module)
        return name

    def as_float(self, node: fx.Node) -> fx.Node:
        new, kind = self.env[node]
        if kind == FLOAT:
            return new
        if node not in self.unpacked:
            self.unpacked[node] = self.new.call_module(self.helper(Unpack(self.channels_last), "unpack"), (new,))
        return self.unpacked[node]

    def floats(self, args: Any) -> Any:
        return fx.map_arg(args, self.as_float)

    def keep(self, node: fx.Node, reason: str | None = None) -> None:
        """Copy ``node`` as it is, on float inputs (a float or quantized conv in channels-last memory when
        asked, and a BatchNorm that adds an int32 bias as one native BatchNorm pass)."""
        args = self.floats(node.args)
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if self.channels_last and isinstance(module, nn.Conv2d) and args:
            module.to(memory_format=torch.channels_last)
            args = (self.new.call_method("contiguous", (args[0],), {"memory_format": torch.channels_last}), *args[1:])
        if self.channels_last and isinstance(module, IntegerBiasBatchNorm2d):
            self.root.set_submodule(node.target, _native_batchnorm(module))
        new = self.new.create_node(node.op, node.target, args, self.floats(node.kwargs), node.name)
        self.env[node] = (new, FLOAT)
        if reason:
            self.report.torch.append((str(node.target), reason))

    def bits_input(self, node: fx.Node) -> fx.Node | None:
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        new, kind = self.env[node.args[0]]
        return new if kind == BITS else None

    def replace(self, node: fx.Node, module: nn.Module) -> str:
        """Put ``module`` in place of the one ``node`` calls (its own name when called once)."""
        if self.calls[node.target] == 1:
            self.root.set_submodule(node.target, module)
            return node.target
        return self.helper(module, node.target.replace(".", "_"))

    def run(self) -> fx.Graph:
        for node in self.old.nodes:
            if node in self.absorbed:
                continue
            if node.op == "placeholder":
                self.env[node] = (self.new.placeholder(node.target), FLOAT)
            elif node.op == "output":
                self.new.output(self.floats(node.args[0]))
            elif node.op == "call_module":
                self.module_node(node)
            else:
                self.keep(node)
        return self.new

    def module_node(self, node: fx.Node) -> None:
        module = self.modules[node.target]
        bits = self.bits_input(node)
        if _is_sign(module):
            if bits is not None:  # sign of ±1 is itself
                self.env[node] = self.env[node.args[0]]
            else:
                new = self.new.call_module(self.replace(node, PackSign()), (self.as_float(node.args[0]),))
                self.env[node] = (new, BITS)
            return
        from micronet.compression.quantization.core.modules import QuantConv2d
        from micronet.models.layers import ChannelShuffle

        if isinstance(module, QuantConv2d) or (isinstance(module, nn.Conv2d) and bits is not None):
            self.conv_node(node, module, bits)
        elif bits is not None and isinstance(module, _BIT_PASS_THROUGH):
            self.env[node] = self.env[node.args[0]]
        elif bits is not None and isinstance(module, nn.MaxPool2d):
            if module.dilation not in (1, (1, 1)) or module.ceil_mode or module.return_indices:
                self.keep(node, "max pool with dilation, ceil_mode or indices: runs on unpacked ±1 floats")
                return
            name = self.replace(node, PackedMaxPool2d(module))
            self.env[node] = (self.new.call_module(name, (bits,)), BITS)
            self.report.packed.append((str(node.target), "max pool on bits (OR)"))
        elif bits is not None and isinstance(module, ChannelShuffle):
            name = self.replace(node, PackedChannelShuffle(module.groups))
            self.env[node] = (self.new.call_module(name, (bits,)), BITS)
            self.report.packed.append((str(node.target), "channel shuffle on bits"))
        else:
            self.keep(node)

    def conv_node(self, node: fx.Node, conv: nn.Module, bits: fx.Node | None) -> None:
        weight = _binary_weight(conv)
        if isinstance(weight, str):
            self.keep(node, weight if bits is not None else None)
            return
        quantizer = conv.input_quantizer
        if bits is None:
            if len(node.args) != 1 or node.kwargs or not _is_sign(quantizer):
                self.keep(node, "binary weights but a float input (no sign activation before it)")
                return
            source = self.as_float(node.args[0])  # the conv packs the sign its input quantizer takes
        elif _is_sign(quantizer) or _is_identity_quantizer(quantizer):
            source = bits
        else:
            self.keep(node, f"input quantizer {type(quantizer).__name__} on a binary input")
            return
        if self.calls[node.target] != 1:
            self.keep(node, "the same conv module is called more than once")
            return
        signs, alpha = weight
        bias = conv.integer_bias(conv.bias)
        bias = bias.detach().float() if bias is not None else torch.zeros_like(alpha)
        reach = (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
        found = _sign_chain(node, self.modules)
        epilogue = None
        if found is not None:
            chain, sign = found
            epilogue = _threshold([self.modules[n.target] for n in chain], alpha, bias, reach)
        geometry = f"{conv.in_channels}→{conv.out_channels}, {conv.kernel_size[0]}×{conv.kernel_size[1]}" \
                   + (f", groups={conv.groups}" if conv.groups > 1 else "")
        if epilogue is not None:
            packed = PackedConv2d(conv, signs, alpha, bias, *epilogue)
            new = self.new.call_module(self.replace(node, packed), (source,))
            self.absorbed.update(chain + [sign])
            self.env[sign] = (new, BITS)
            for absorbed in chain:
                self.report.packed.append((str(absorbed.target), f"folded into {node.target}'s threshold"))
            self.report.packed.append((str(node.target), f"binary conv {geometry}, bits out (threshold epilogue)"))
        else:  # float out (into an addition, say): a BatchNorm right after it joins the epilogue
            batchnorm = _batchnorm_after(node, self.modules)
            if batchnorm is not None:
                alpha, bias = _fold_affine(self.modules[batchnorm.target], alpha, bias)
            packed = PackedConv2d(conv, signs, alpha, bias, None, None, channels_last=self.channels_last)
            new = self.new.call_module(self.replace(node, packed), (source,))
            self.env[node] = (new, FLOAT)
            if batchnorm is not None:
                self.absorbed.add(batchnorm)
                self.env[batchnorm] = (new, FLOAT)
                self.report.packed.append((str(batchnorm.target), f"folded into {node.target}'s epilogue"))
            self.report.packed.append((str(node.target), f"binary conv {geometry}, float out (α·D + b)"))


def _load(model_or_path: nn.Module | str | Path) -> nn.Module:
    if isinstance(model_or_path, nn.Module):
        return model_or_path
    from micronet.compression.packing import load_packed

    return load_packed(model_or_path)


FLOAT_LAYOUTS = ("channels_last", "model")


def compile_packed(model: nn.Module | str | Path, *, isa: str | None = None,
                   float_layout: str = "model") -> PackedModel:
    """A copy of ``model`` (a wbwtab W=2 A=2 model, BatchNorm fused or not, or the path of a packed
    artifact) whose binary layers run on packed bits. ``isa``: see :func:`resolve_isa`.

    ``float_layout``: how the convolutions that stay in torch (the first and last layers, float or with
    8-bit edges) run. "model" (default) runs them exactly as the model does, so the packed logits equal the
    model's; "channels_last" is up to 8× faster for a first conv on a one-channel image (and runs a
    BatchNorm that adds an int32 bias as one native pass), but oneDNN then sums in another order, so an
    output within a float rounding of its sign threshold can flip (on a trained binary NIN: same top-1 on
    all 10,000 test images, logits up to 7% of their scale apart; with 8-bit edges, whose integer
    pre-activations hit the threshold exactly more often, 99.81% top-1 agreement).
    """
    if float_layout not in FLOAT_LAYOUTS:
        raise DeployError(f"float_layout must be one of {', '.join(FLOAT_LAYOUTS)} (got {float_layout!r})")
    from micronet.compression.fusion import _Tracer

    source = copy.deepcopy(_load(model)).eval()
    try:
        graph = _Tracer().trace(source)
    except Exception as exc:  # noqa: BLE001 - any trace failure
        raise DeployError(f"the packed runtime needs a torch.fx-traceable model ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:120]})") from exc
    name = resolve_isa(isa)
    report = PackedReport(isa=name)
    rewriter = _Rewriter(source, graph, report, float_layout == "channels_last")
    new_graph = rewriter.run()
    if not any(isinstance(m, PackedConv2d) for m in source.modules()):
        raise DeployError("the model has no binary convolution with binary inputs to run on packed bits: quantize "
                          "it with `micronet quantize wbwtab --W 2 --A 2` (binary weights and activations) first")
    graph_module = fx.GraphModule(source, new_graph)
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return set_isa(PackedModel(graph_module, report), name)
