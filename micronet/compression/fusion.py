"""BatchNorm folding after training: :func:`fuse`.

In eval mode a BatchNorm is a per-channel affine map, y = γ·(z − μ)/σ + β with σ = sqrt(var + eps), so
it can be folded into the convolution z = conv(x, W) + b that feeds it. Three folds, chosen per pair:

* **standard** (a float conv whose BN is its only consumer): W' = W·γ/σ, b' = β + (b − μ)·γ/σ; the BN
  becomes ``nn.Identity``. Conv1d/Conv2d with BatchNorm1d/2d, and ConvTranspose2d with groups = 1.
* **BN-folding QAT conv** (:class:`QuantBNFuseConv2d`): becomes a plain :class:`QuantConv2d` holding
  ``folded_weight_and_bias()`` — what its eval forward already computes — with its quantizers (and their
  statistics) kept, so eval outputs are unchanged bit for bit.
* **sign** (the BN feeds only sign activations; the original micronet's fold, re-derived): sign(γ·(z − μ)/σ + β) depends only
  on sign(γ) and the threshold μ − β·σ/γ, because the folded pre-activation z' is the BN output times the
  positive σ/|γ|. γ > 0: W' = W, b' = b − μ + β·σ/γ; γ < 0: W' = −W, b' = −(b − μ + β·σ/γ); γ = 0: the BN
  output is the constant β, so W' = 0 and b' = β (sign(0) = +1, as :class:`SignActivation`). Weights are
  never rescaled, so binary/ternary weights stay binary/ternary. For a quantized conv the flip must act
  on the quantized weight: when Q(s·W) equals s·Q(W) bit for bit on this layer (checked, never assumed;
  binary and ternary per-channel quantizers are odd functions except at exact zeros) the flipped float
  weight is kept with its quantizer, so the layer still packs to codes; otherwise the quantized weight
  is baked in (W ← s·Q(W)) and the weight quantizer switched off (``enabled`` = 0), which is exact
  too. Applied only when every consumer of the BN output
  applies an enabled sign (a :class:`SignActivation`, or a quantized layer whose input quantizer is one),
  possibly through Identity / Dropout / max-pool modules, which commute with a positive per-channel scale.

Everything else (a BN after a quantized conv that does not feed a sign — folding would move the weight off
its quantization grid —, a conv with other consumers, a BN without running statistics) is left as is and
listed in the :class:`FusionReport` with the reason.

The fused model records what changed in ``model.fusion_record``; checkpoints store it (``extra.fusion``)
and :func:`micronet.compression.restore.restore_model` replays the structural change before loading weights.

Dataflow comes from a torch.fx trace (quantized modules, quantizers and micronet leaf modules are not
traced into), so "the BN is the conv's only consumer" is checked on the real graph; an untraceable model
falls back to adjacent siblings in a parent's module order, as ``prepare`` does.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from micronet.errors import CheckpointError

__all__ = ["FusedLayer", "FusionReport", "apply_fusion_record", "fuse"]

RECORD_VERSION = 1
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d)  # commute with a positive per-channel scale


@dataclass
class FusedLayer:
    """What happened to one conv / BatchNorm pair (``kind``: fold, sign_fold, bn_fold_conv or kept)."""

    conv: str | None
    bn: str | None
    kind: str
    detail: str = ""
    bias_added: bool = False
    weight_baked: bool = False  # sign fold: the quantized weight replaced the float one, its quantizer is off
    flipped: int = 0  # sign fold: channels with γ < 0
    constant: int = 0  # sign fold: channels with γ = 0
    # kept because the conv is quantized; the BN is still a per-channel affine map of the conv's output, so
    # an exporter can fold it into per-channel weight scales without moving any weight code
    scale_foldable: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FusedLayer:
        try:
            return cls(**data)
        except TypeError as exc:
            raise CheckpointError(f"invalid fusion entry {data!r} ({exc}): the checkpoint is corrupted") from exc


@dataclass
class FusionReport:
    """Per-layer outcome of :func:`fuse`; ``stage`` is "quantized" when the model was prepared."""

    stage: str
    layers: list[FusedLayer] = field(default_factory=list)
    traced: bool = True

    @property
    def fused(self) -> list[FusedLayer]:
        return [layer for layer in self.layers if layer.kind != "kept"]

    @property
    def kept(self) -> list[FusedLayer]:
        return [layer for layer in self.layers if layer.kind == "kept"]

    def rows(self) -> list[dict[str, str]]:
        """One row per pair for :func:`micronet.analysis.format_table`."""
        return [{"conv": layer.conv or "-", "bn": layer.bn or ("inside the conv" if layer.kind == "bn_fold_conv" else "-"),
                 "fold": layer.kind, "detail": layer.detail}
                for layer in self.layers]

    def summary(self) -> str:
        line = f"{len(self.fused)} BatchNorms folded, {len(self.kept)} left as they are"
        return line + ("" if self.traced else " (torch.fx could not trace the model: pairs found by module order)")

    def record(self) -> dict[str, Any]:
        """The structural change, as checkpoints store it (``extra.fusion``)."""
        return {"version": RECORD_VERSION, "steps": [{"stage": self.stage,
                                                      "layers": [layer.to_json() for layer in self.fused]}]}


# ------------------------------------------------------------------------------------------ graph
class _Tracer(fx.Tracer):
    """Leaves: torch modules, quantized modules, quantizers and micronet modules without children."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        from micronet.compression.quantization.core.modules import QuantizedModule
        from micronet.compression.quantization.core.quantizers import Quantizer
        from micronet.graph import is_micronet_module

        if isinstance(m, (QuantizedModule, Quantizer)):
            return True
        if is_micronet_module(m) and next(m.children(), None) is None:
            return True
        return super().is_leaf_module(m, qualified_name)


def _applies_sign(module: nn.Module | None) -> bool:
    from micronet.compression.quantization.core.lowbit import SignActivation
    from micronet.compression.quantization.core.modules import QuantizedModule

    def enabled_sign(m: Any) -> bool:
        flag = getattr(m, "enabled", None)
        return isinstance(m, SignActivation) and (flag is None or bool(flag.item()))

    if enabled_sign(module):
        return True
    return isinstance(module, QuantizedModule) and enabled_sign(getattr(module, "input_quantizer", None))


def _feeds_only_sign(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    users = list(node.users)
    if not users:
        return False
    for user in users:
        module = modules.get(user.target) if user.op == "call_module" else None
        if _applies_sign(module):
            continue
        if isinstance(module, _PASS_THROUGH) and user.args and user.args[0] is node and _feeds_only_sign(user, modules):
            continue
        return False
    return True


def _candidates(model: nn.Module) -> tuple[list[tuple[str | None, str, bool, str]], bool]:
    """(conv name or None, bn name, feeds only sign, why not foldable) for every BatchNorm; traced?"""
    modules = dict(model.named_modules())
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable models use the structural fallback
        graph = None
    found: list[tuple[str | None, str, bool, str]] = []
    if graph is not None:
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
                continue
            sign = _feeds_only_sign(node, modules)
            source = node.args[0] if node.args else None
            if not (isinstance(source, fx.Node) and source.op == "call_module"
                    and isinstance(modules.get(source.target), _CONVS)):
                found.append((None, node.target, sign, "not fed by a convolution"))
            elif len(source.users) != 1:
                found.append((source.target, node.target, sign, "the conv output has other consumers"))
            else:
                found.append((source.target, node.target, sign, ""))
        return found, True
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        prefix = f"{parent_name}." if parent_name else ""
        for i, (b_name, b) in enumerate(children):
            if not isinstance(b, _BN):
                continue
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            sign = _applies_sign(nxt)
            a_name, a = children[i - 1] if i else (None, None)
            if isinstance(a, _CONVS):
                found.append((prefix + a_name, prefix + b_name, sign, ""))
            else:
                found.append((None, prefix + b_name, sign, "not fed by a convolution"))
    return found, False


# ------------------------------------------------------------------------------------------ structure
def _out_axis(conv: nn.Module) -> int:
    return 1 if isinstance(conv, nn.ConvTranspose2d) else 0


def _out_channels(conv: nn.Module) -> int:
    return conv.weight.shape[_out_axis(conv)]


def _add_bias(conv: nn.Module) -> bool:
    """Give ``conv`` a zero bias when it has none; True when one was added."""
    if conv.bias is not None:
        return False
    conv.bias = nn.Parameter(torch.zeros(_out_channels(conv), device=conv.weight.device, dtype=conv.weight.dtype),
                             requires_grad=conv.weight.requires_grad)
    return True


def _plain_quant_conv(module: nn.Module) -> nn.Module:
    """A :class:`QuantConv2d` with a bias and ``module``'s geometry and quantizers (weights uninitialised)."""
    from micronet.compression.quantization.core.modules import QuantConv2d

    conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                     padding=module.padding, dilation=module.dilation, groups=module.groups, bias=True,
                     padding_mode=module.padding_mode, device=module.weight.device, dtype=module.weight.dtype)
    # The mode is set while it is still a float conv: a QuantConv2d leaving training re-observes its weight,
    # which here is still the uninitialised one and would overwrite the quantizer's range.
    conv.train(module.training)
    conv.__class__ = QuantConv2d  # what QuantizedModule.from_float does, without new quantizers
    conv.input_quantizer = module.input_quantizer
    conv.weight_quantizer = module.weight_quantizer
    return conv


def apply_fusion_record(model: nn.Module, record: dict[str, Any], stage: str) -> nn.Module:
    """Replay the structural part of a recorded fusion (``stage`` "float" or "quantized") on a freshly built
    model, in place: BatchNorms become Identity, convs gain their bias, QAT BN-folding convs become
    QuantConv2d. The values come from the checkpoint loaded afterwards."""
    from micronet.compression.quantization.core.bn_fold import QuantBNFuseConv2d

    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION or not isinstance(record.get("steps"), list):
        raise CheckpointError(f"unreadable fusion record {str(record)[:80]!r}: the checkpoint is corrupted or from "
                              "another micronet version")
    for step in record["steps"]:
        if step.get("stage") != stage:
            continue
        for entry in step.get("layers", []):
            layer = FusedLayer.from_json(entry)
            try:
                if layer.kind == "bn_fold_conv":
                    module = model.get_submodule(layer.conv)
                    if not isinstance(module, QuantBNFuseConv2d):
                        raise CheckpointError(f"the fusion record folds {layer.conv}, but the rebuilt model has a "
                                              f"{type(module).__name__} there: the checkpoint does not fit this micronet")
                    model.set_submodule(layer.conv, _plain_quant_conv(module))
                else:
                    if layer.bias_added:
                        _add_bias(model.get_submodule(layer.conv))
                    if layer.bn:
                        model.get_submodule(layer.bn)
                        model.set_submodule(layer.bn, nn.Identity())
            except AttributeError as exc:
                raise CheckpointError(f"the fusion record names a layer the rebuilt model lacks ({exc}): "
                                      "the checkpoint does not fit this architecture") from exc
    return model


# ------------------------------------------------------------------------------------------ folds
def _bn_params(bn: nn.Module) -> tuple[torch.Tensor, ...]:
    """γ, β, μ, σ in float64 (γ = 1, β = 0 without affine parameters)."""
    mean = bn.running_mean.detach().double()
    std = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    return gamma, beta, mean, std


def _per_out(conv: nn.Module, t: torch.Tensor) -> torch.Tensor:
    shape = [1] * conv.weight.dim()
    shape[_out_axis(conv)] = -1
    return t.reshape(shape)


def _why_not(conv: nn.Module, bn: nn.Module) -> str:
    if isinstance(conv, nn.ConvTranspose2d) and conv.groups != 1:
        return "grouped transposed conv"
    if isinstance(conv, nn.Conv1d) != isinstance(bn, nn.BatchNorm1d):
        return f"{type(bn).__name__} does not match {type(conv).__name__}"
    if bn.running_mean is None or bn.running_var is None:
        return "BatchNorm without running statistics normalises with batch statistics even in eval mode"
    if bn.num_features != _out_channels(conv):
        return f"BatchNorm has {bn.num_features} channels, the conv {_out_channels(conv)}"
    return ""


@torch.no_grad()
def _standard_fold(conv: nn.Module, bn: nn.Module) -> FusedLayer:
    gamma, beta, mean, std = _bn_params(bn)
    scale = gamma / std
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    added = _add_bias(conv)
    conv.weight.copy_((conv.weight.double() * _per_out(conv, scale)).to(conv.weight.dtype))
    conv.bias.copy_((beta + (bias - mean) * scale).to(conv.bias.dtype))
    return FusedLayer(None, None, "fold", "W·γ/σ, b = β + (b − μ)·γ/σ", bias_added=added)


@torch.no_grad()
def _sign_fold(conv: nn.Module, bn: nn.Module) -> FusedLayer:
    gamma, beta, mean, std = _bn_params(bn)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    added = _add_bias(conv)
    zero = gamma == 0
    sign = torch.where(gamma < 0, -1.0, 1.0).double()
    safe_gamma = torch.where(zero, torch.ones_like(gamma), gamma)
    threshold_bias = torch.where(zero, beta, sign * (bias - mean + beta * std / safe_gamma))
    weight_sign = _per_out(conv, torch.where(zero, torch.zeros_like(sign), sign)).to(conv.weight.dtype)
    flipped_weight = conv.weight * weight_sign
    quantizer = getattr(conv, "weight_quantizer", None)
    baked = False
    if quantizer is not None and bool(quantizer.enabled.item()):
        wanted = quantizer.quantize(conv.weight) * weight_sign  # what the fused layer must compute with
        if torch.equal(quantizer.quantize(flipped_weight), wanted):
            conv.weight.copy_(flipped_weight)  # Q(s·W) = s·Q(W) checked on this very weight: keep the quantizer
        else:
            conv.weight.copy_(wanted)
            quantizer.enabled.fill_(0)
            baked = True
    else:
        conv.weight.copy_(flipped_weight)
    conv.bias.copy_(threshold_bias.to(conv.bias.dtype))
    flipped, constant = int((gamma < 0).sum()), int(zero.sum())
    detail = f"sign: {flipped} channels flipped (γ < 0), {constant} constant (γ = 0)"
    if baked:
        detail += "; quantized weight baked in, weight quantizer off"
    elif quantizer is not None and bool(quantizer.enabled.item()):
        detail += "; Q(s·W) = s·Q(W) verified, weight quantizer kept"
    return FusedLayer(None, None, "sign_fold", detail, bias_added=added, weight_baked=baked,
                      flipped=flipped, constant=constant)


@torch.no_grad()
def _fold_qat_conv(model: nn.Module, name: str, module: nn.Module) -> FusedLayer:
    weight, bias = module.folded_weight_and_bias()
    conv = _plain_quant_conv(module)
    conv.weight.copy_(weight)
    conv.bias.copy_(bias)
    model.set_submodule(name, conv)
    return FusedLayer(name, None, "bn_fold_conv", "QuantBNFuseConv2d → QuantConv2d (running-statistics fold, "
                      "quantizers kept)", bias_added=module.bias is None)


def fold_for_inference(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with its BatchNorms folded into the convolutions that feed them, for a model that
    only runs inference beside training (a distillation teacher): a copy (``model`` is untouched) that computes
    the same outputs up to float rounding and skips one pass over each BatchNorm's activation. Folded only
    where torch.fx traces the model (for an untraceable one the pairs would be guessed from module order) and
    never for a quantized model (folding would change its grids): those come back as they are, in eval mode."""
    from micronet.compression.quantization.core.quantizers import is_prepared

    if is_prepared(model):
        return model.eval()
    folded, report = fuse(model)
    return folded if report.traced else model.eval()


def fuse(model: nn.Module) -> tuple[nn.Module, FusionReport]:
    """Fold every foldable BatchNorm of ``model`` into its convolution (see the module docstring).

    Returns ``(fused copy in eval mode, report)``; ``model`` itself is not modified. The copy carries
    ``fusion_record`` so that checkpoints rebuild it, and keeps ``arch`` / ``quant_scheme``.
    """
    from micronet.compression.quantization.core.bn_fold import QuantBNFuseConv2d
    from micronet.compression.quantization.core.modules import WeightedQuantizedModule
    from micronet.compression.quantization.core.quantizers import is_prepared

    fused = copy.deepcopy(model).eval()
    report = FusionReport(stage="quantized" if is_prepared(fused) else "float")
    for name, module in list(fused.named_modules()):
        if isinstance(module, QuantBNFuseConv2d):
            report.layers.append(_fold_qat_conv(fused, name, module))

    candidates, report.traced = _candidates(fused)
    for conv_name, bn_name, sign, problem in candidates:
        layer = FusedLayer(conv_name, bn_name, "kept", problem)
        if not problem:
            conv, bn = fused.get_submodule(conv_name), fused.get_submodule(bn_name)
            layer.detail = _why_not(conv, bn)
            if not layer.detail and isinstance(conv, WeightedQuantizedModule) and not sign:
                layer.detail = "quantized conv: folding would move its weight off the quantization grid " \
                               "(quantize with BatchNorm folding, --bn_fuse, instead)"
                layer.scale_foldable = True
            if not layer.detail:
                done = _sign_fold(conv, bn) if sign else _standard_fold(conv, bn)
                done.conv, done.bn = conv_name, bn_name
                fused.set_submodule(bn_name, nn.Identity())
                layer = done
        report.layers.append(layer)

    if report.fused:
        previous = getattr(model, "fusion_record", None)
        record = report.record()
        if previous:
            record["steps"] = list(previous.get("steps", [])) + record["steps"]
        fused.fusion_record = record
    return fused, report
