"""The export form of a model: what the ONNX file will compute, as a torch module.

:func:`export_form` copies a float or micronet-quantized model, folds its BatchNorms and replaces every
quantizer by the QuantizeLinear/DequantizeLinear it stands for (:mod:`.qdq_ops`):

* activation quantizers (affine, learned-scale, DoReFa) → ``Clip`` (only for ranges narrower than the
  8-bit type) → ``QuantizeLinear`` → ``DequantizeLinear``. Signed symmetric int8 codes are written as
  uint8 with zero point 128 — the same values, and ONNX Runtime's fast u8s8 kernels — unless
  ``activation_dtype="int8"`` (TensorRT wants signed int8 with zero point 0);
* sign activations → ``Sign(Sign(x) + 0.5)`` (sign(0) = +1, as in training);
* weight quantizers → ``DequantizeLinear`` of a constant int8 tensor (per output channel, zero point 0)
  holding exactly the trained codes: binary ±1 and ternary {−1, 0, 1} with α as scale, DoReFa k ≤ 7 bits
  as odd integers with scale 1/(2^k − 1). Values that no int8 tensor holds exactly (DoReFa 8-bit weights:
  256 half-integer levels) stay float, with the reason in the report;
* biases of layers with a quantized input and int8 weights → ``DequantizeLinear`` of int32 codes at scale
  s_x·s_w (the integer kernels' accumulator scale), the codes the fake-quant layer adds in eval mode
  (:mod:`micronet.compression.quantization.core.integer_bias`) —
  except with int8 activations (the TensorRT form), whose parser dequantizes int8 only: float biases;
  a float bias that remains beside a quantized input and int8 weights (DoReFa's clipped inputs, int32
  overflow) is added after the layer, so that ONNX Runtime does not round it to int32 itself;
* a float BatchNorm after a quantized conv (QAT without BN folding) is folded into the per-channel weight
  scales: the codes do not move, so the layer stays int8.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from micronet.compression.quantization.core.integer_bias import (
    batchnorm_factor_and_bias,
    bias_codes,
    folded_channel_scale,
)
from micronet.compression.quantization.core.learned import LearnedScaleQuantizer
from micronet.compression.quantization.core.lowbit import DoReFaActivationQuantizer, FloatQuantizer, SignActivation
from micronet.compression.quantization.core.modules import QuantizedModule, WeightedQuantizedModule
from micronet.compression.quantization.core.quantizers import AffineQuantizer, Quantizer
from micronet.deploy.onnx import qdq_ops
from micronet.deploy.targets import DEFAULT_TARGET, get_target, weight_dtype_for
from micronet.errors import DeployError
from micronet.models.layers import ChannelShuffle

ACTIVATION_DTYPES = ("uint8", "int8")
WEIGHT_DTYPES = ("auto", "int8", "uint8")


def resolve_weight_dtype(weight_dtype: str, codes: torch.Tensor, target: str = DEFAULT_TARGET) -> str:
    """``auto``: what the deployment ``target`` sums exactly (:mod:`micronet.deploy.targets`) — int8 while
    the layer's codes fit the target's range (±63 for ``portable``), else uint8 with zero point 128. It
    never looks at the exporting CPU: the same model and target always give the same file."""
    if weight_dtype != "auto":
        return weight_dtype
    return weight_dtype_for(get_target(target), int(codes.abs().max()) if codes.numel() else 0)


@dataclass
class LayerExport:
    """How one weighted layer is written."""

    name: str
    op: str
    input: str  # "uint8" / "int8" / "sign" / "float"
    weight: str  # "int8 per-channel" / "int8 per-tensor" / "float"
    bias: str  # "int32" / "float" / "none"
    note: str = ""


@dataclass
class ExportFormReport:
    quantized: bool
    activation_dtype: str
    weight_dtype: str = "auto"
    target: str = DEFAULT_TARGET
    layers: list[LayerExport] = field(default_factory=list)
    activation_quantizers: int = 0  # quantizers written as Q/DQ or Sign (off/float ones write nothing)
    bn_folded: int = 0
    value_moving_ops_quantized: int = 0  # max pools and shuffles given their readers' quantizer (no value changes)

    def rows(self) -> list[dict[str, str]]:
        return [{"layer": row.name, "op": row.op, "input": row.input, "weight": row.weight, "bias": row.bias,
                 "note": row.note} for row in self.layers]


# ------------------------------------------------------------------------------------------ activations
class ActivationQDQ(nn.Module):
    """Optional pre-scale, then Clip → QuantizeLinear → DequantizeLinear with one scale and zero point."""

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype, quant_min: int, quant_max: int,
                 pre_scale: float | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=dtype))
        info = torch.iinfo(dtype)
        scale32 = self.scale.item()
        self.clip_min = float("-inf") if quant_min <= info.min else (quant_min - zero_point) * scale32
        self.clip_max = float("inf") if quant_max >= info.max else (quant_max - zero_point) * scale32
        self.pre_scale = pre_scale
        self.dtype_name = "uint8" if dtype == torch.uint8 else "int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_scale is not None:
            x = x * self.pre_scale
        return qdq_ops.quantize_dequantize(x, self.scale, self.zero_point, self.clip_min, self.clip_max)

    def forward_shared(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [self(t) for t in tensors]


class SignExport(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qdq_ops.binary_sign(x)

    def forward_shared(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [self(t) for t in tensors]


class Passthrough(nn.Module):
    """A quantizer that is off or float: nothing in the graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_shared(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return list(tensors)


def _affine_export(q: AffineQuantizer, name: str, activation_dtype: str) -> ActivationQDQ:
    if q.ch_axis is not None:
        raise DeployError(f"{name}: per-channel activation quantization has no QDQ mapping here: quantize "
                          "activations per tensor")
    if int(q.bits) > 8:
        raise DeployError(f"{name}: {int(q.bits)}-bit activations do not fit ONNX int8/uint8: export at most 8 bits")
    initialized = q.scale_initialized.item() if isinstance(q, LearnedScaleQuantizer) else q.observer.is_initialized
    if not initialized:
        raise DeployError(f"{name} was never calibrated (its observer saw no data): run "
                          "calibrate(model, data) or QAT before exporting")
    quant_min, quant_max = q.quant_min_max
    zero_point = 0 if q.symmetric else int(q.zero_point.item())
    scale = float(q.scale.detach().reshape(()).item())
    signed = quant_min < 0
    if signed and activation_dtype == "uint8":  # the same values, shifted codes: u8s8 is ORT's fast path
        return ActivationQDQ(scale, zero_point + 128, torch.uint8, quant_min + 128, quant_max + 128)
    if not signed and activation_dtype == "int8":
        raise DeployError(f"{name} holds unsigned codes (0..{quant_max}) that signed int8 cannot hold: prepare the "
                          "model with signed activations (QuantizerSpec(signed=True)) for an int8/TensorRT export")
    return ActivationQDQ(scale, zero_point, torch.int8 if signed else torch.uint8, quant_min, quant_max)


def activation_export(q: Quantizer, name: str, activation_dtype: str) -> nn.Module:
    """The export module for an activation quantizer (one handler per quantizer family)."""
    if not q.enabled.item() or isinstance(q, FloatQuantizer):
        return Passthrough()
    if isinstance(q, SignActivation):
        return SignExport()
    if isinstance(q, DoReFaActivationQuantizer):
        bits = int(q.bits)
        if bits > 8:
            raise DeployError(f"{name}: {bits}-bit DoReFa activations do not fit uint8: export at most 8 bits")
        levels = 2**bits - 1
        return ActivationQDQ(1.0 / levels, 0, torch.uint8, 0, levels, pre_scale=q.pre_scale)
    if isinstance(q, AffineQuantizer):
        return _affine_export(q, name, activation_dtype)
    raise DeployError(f"{name}: quantizer {type(q).__name__} has no ONNX mapping (supported: affine, lsq, "
                      "dorefa_activation, sign, float)")


def _input_kind(module: nn.Module) -> str:
    if isinstance(module, ActivationQDQ):
        return module.dtype_name
    return "sign" if isinstance(module, SignExport) else "float"


# ------------------------------------------------------------------------------------------ weights
def _per_axis(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


@torch.no_grad()
def int8_weight(module: WeightedQuantizedModule) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(int8 codes, per-channel float32 scale) with ``codes·scale`` = the weight the layer computes with,
    or the reason why no int8 tensor holds those values."""
    quantizer = module.weight_quantizer
    weight = module.weight.detach()
    target = quantizer.quantize(weight) if quantizer.enabled.item() else weight
    if isinstance(quantizer, AffineQuantizer) and not quantizer.observer.is_initialized:
        raise DeployError(f"{quantizer.qualified_name or 'a weight quantizer'} was never calibrated: run "
                          "calibrate(model, data) or QAT before exporting")
    try:
        codes = quantizer.weight_codes(weight)
    except Exception as error:  # a family without integer codes (e.g. float weights)
        return f"no integer codes ({error})"
    centred = codes.codes.double() - codes.zero_point.double()
    scale = codes.scale.double().expand_as(centred) if codes.scale.dim() else codes.scale.double()
    for factor in (1.0, 2.0):  # integers, or half-integers (binary: ±½ around zero point ½)
        doubled = centred * factor
        if torch.equal(doubled, doubled.round()) and doubled.abs().max() <= 127:
            int_codes = doubled.to(torch.int8)
            step = scale / factor
            break
    else:
        return f"{int(quantizer.bits)}-bit codes need more than int8 (values kept float, exact)"
    axis = module.weight_axis
    if axis is None or step.dim() == 0:
        channel_scale = step.reshape(-1)[:1].reshape(())
    else:
        dims = [d for d in range(step.dim()) if d != axis]
        channel_scale = step.amax(dim=dims) if dims else step
        if not torch.equal(_per_axis(channel_scale, axis, step.dim()).expand_as(step), step):
            return "scales vary inside a channel"
    channel_scale = channel_scale.float()
    rebuilt = int_codes.float() * (channel_scale if channel_scale.dim() == 0 else _per_axis(channel_scale, axis, weight.dim()))
    tolerance = 4 * torch.finfo(torch.float32).eps * float(target.abs().max().clamp(min=1e-30))
    if (rebuilt - target).abs().max() > tolerance:
        return "integer codes do not reproduce the layer's weights"
    return int_codes, channel_scale


class WeightedExport(nn.Module):
    """A conv / transposed conv / linear layer with its export-form input, weight and bias."""

    def __init__(self, module: WeightedQuantizedModule, name: str, activation_dtype: str,
                 bn: nn.BatchNorm1d | nn.BatchNorm2d | None = None, weight_dtype: str = "int8",
                 target: str = DEFAULT_TARGET) -> None:
        super().__init__()
        self.kind = next(c.__name__ for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
        self.input_quantizer = activation_export(module.input_quantizer, f"{name}.input_quantizer", activation_dtype)
        self.attributes = {k: getattr(module, k) for k in ("stride", "padding", "dilation", "groups", "output_padding",
                                                          "padding_mode", "_reversed_padding_repeated_twice")
                           if hasattr(module, k)}
        self.conv_forward = getattr(type(module), "_conv_forward", None)
        self.axis = module.weight_axis if module.weight_axis is not None else 0
        ndim = module.weight.dim()
        bias = module.bias.detach().double() if module.bias is not None else None
        packed = int8_weight(module)
        note = ""
        if isinstance(packed, str):
            weight_float = (module.weight_quantizer.quantize(module.weight) if module.weight_quantizer.enabled.item()
                            else module.weight).detach().double()
            note = packed
        if bn is not None:  # y = γ/σ·(conv + b − μ) + β: per-channel factor on the scales, shift on the bias
            factor, bias = batchnorm_factor_and_bias(bn, module.bias)
            if isinstance(packed, str):
                weight_float = weight_float * _per_axis(factor, self.axis, ndim)
            else:
                codes, scale = packed
                if bool((codes == -128).any()) and bool((factor < 0).any()):
                    raise DeployError(f"{name}: a negative BatchNorm γ would flip code −128; fold BN while quantizing (--bn_fuse)")
                sign = torch.where(factor < 0, -1, 1).to(torch.int8)
                codes = torch.where(_per_axis(factor == 0, self.axis, ndim), torch.zeros_like(codes),
                                    codes * _per_axis(sign, self.axis, ndim))
                scale = folded_channel_scale(scale, factor)  # what IntegerBiasBatchNorm2d rounds on in eval
                packed = codes, scale
            note = (note + "; " if note else "") + "BatchNorm folded into the weight scales"
        if isinstance(packed, str):
            self.register_buffer("weight_codes", None)
            self.register_buffer("weight", weight_float.float())
            self.weight_text = "float"
        else:
            codes, scale = packed
            zero_point = torch.zeros(scale.shape, dtype=torch.int8)
            weight_dtype = "int8" if activation_dtype == "int8" else resolve_weight_dtype(weight_dtype, codes, target)
            if weight_dtype == "uint8":  # the same values: codes and zero point shifted by 128
                codes, zero_point = (codes.to(torch.int16) + 128).to(torch.uint8), (zero_point + 128).to(torch.uint8)
            self.register_buffer("weight_codes", codes)
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_zero_point", zero_point)
            self.weight_text = f"{weight_dtype} per-channel" if scale.dim() else f"{weight_dtype} per-tensor"
        self.bias_text = "none" if bias is None else "float"
        self.register_buffer("bias_codes", None)
        self.register_buffer("bias", None if bias is None else bias.float())
        int32_bias = activation_dtype == "uint8"  # TensorRT's parser dequantizes int8 only: float biases there
        if int32_bias and bias is not None and isinstance(self.input_quantizer, ActivationQDQ) \
                and self.weight_codes is not None and self.input_quantizer.pre_scale is None:
            bias_scale = (self.input_quantizer.scale * self.weight_scale).float()  # as ORT's quantizer computes it
            bias_scale = bias_scale.expand(bias.shape) if bias_scale.dim() == 0 else bias_scale
            q = bias_codes(bias, bias_scale)  # the codes the fake-quant layer adds in eval (see integer_bias)
            if q is not None:
                self.bias_codes = q.to(torch.int32)
                self.register_buffer("bias_scale", bias_scale.contiguous())
                self.register_buffer("bias_zero_point", torch.zeros(bias.shape, dtype=torch.int32))
                self.bias = None
                self.bias_text = "int32"
        # A float bias next to a DequantizeLinear input and weight is what ONNX Runtime's WeightBiasQuantization
        # rounds to int32 at s_x·s_w: harmless at 8 bits, but with 4-bit DoReFa inputs (which keep a float bias:
        # their Clip precedes the quantizer) that rounding flips activation codes. Added after the layer, the bias
        # stays float and ONNX Runtime computes what the fake-quant model computes.
        self.bias_after = (self.bias_text == "float" and int32_bias and isinstance(self.input_quantizer, ActivationQDQ)
                           and self.weight_codes is not None)
        if self.bias_after:
            self.bias_text = "float, added after the layer"
        self.record = LayerExport(name, self.kind, _input_kind(self.input_quantizer), self.weight_text, self.bias_text, note)

    def _weight(self) -> torch.Tensor:
        if self.weight_codes is None:
            return self.weight
        return qdq_ops.dequantize(self.weight_codes, self.weight_scale, self.weight_zero_point, self.axis)

    def _bias(self) -> torch.Tensor | None:
        if self.bias_codes is None:
            return self.bias
        return qdq_ops.dequantize(self.bias_codes, self.bias_scale, self.bias_zero_point, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight, bias = self.input_quantizer(x), self._weight(), self._bias()
        if self.bias_after:
            y = self._layer_op(x, weight, None)
            return y + (bias if self.kind == "Linear" else bias.reshape(-1, *[1] * (y.dim() - 2)))
        return self._layer_op(x, weight, bias)

    def _layer_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        a = self.attributes
        if self.kind == "Linear":
            return F.linear(x, weight, bias)
        if self.kind == "ConvTranspose2d":
            return F.conv_transpose2d(x, weight, bias, a["stride"], a["padding"], a["output_padding"], a["groups"], a["dilation"])
        return self.conv_forward(_ConvAttributes(a), x, weight, bias)


class _ConvAttributes:
    """What ``nn.Conv{1,2}d._conv_forward`` reads from ``self`` (so padding modes behave as in torch)."""

    def __init__(self, attributes: dict[str, Any]) -> None:
        self.__dict__.update(attributes)


# ------------------------------------------------------------------------------------------ max pools
_VALUE_PRESERVING = (nn.ReLU, nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, ChannelShuffle)
# ops that only select or move values: a quantizer commutes with them, so their input can take their readers'
_QUANTIZE_BEFORE = (nn.MaxPool1d, nn.MaxPool2d, ChannelShuffle)
_VALUE_PRESERVING_CALLS = {torch.relu, torch.flatten, F.relu, F.max_pool2d, F.dropout}


class _FormTracer(torch.fx.Tracer):
    """Leaves: torch modules, export-form modules, quantized modules and micronet modules without children."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        from micronet.graph import is_micronet_module

        if isinstance(m, (ActivationQDQ, SignExport, Passthrough, WeightedExport, QuantizedModule)):
            return True
        if is_micronet_module(m) and next(m.children(), None) is None:
            return True
        return super().is_leaf_module(m, qualified_name)


def _consumer_quantizers(node: torch.fx.Node, modules: dict[str, nn.Module]) -> list[ActivationQDQ] | None:
    """The activation quantizers that read ``node``'s value, looking through value-preserving ops (ReLU,
    flatten, further max pools: each commutes with a monotone quantizer); None if any reader is another op."""
    found: list[ActivationQDQ] = []
    for user in node.users:
        module = modules.get(user.target) if user.op == "call_module" else None
        readers = _quantizers_reading(module, user, node) if module is not None else []
        if readers and all(isinstance(q, ActivationQDQ) and q.pre_scale is None for q in readers):
            found.extend(readers)
            continue
        passes = (isinstance(module, _VALUE_PRESERVING) or (user.op == "call_function" and user.target in _VALUE_PRESERVING_CALLS)
                  or (user.op == "call_method" and user.target in ("flatten", "view", "reshape", "relu")))
        if not passes or user.args[0] is not node:
            return None
        further = _consumer_quantizers(user, modules)
        if further is None:
            return None
        found.extend(further)
    return found or None


def _quantizers_reading(module: nn.Module, user: torch.fx.Node, node: torch.fx.Node) -> list[nn.Module]:
    """The input quantizers of ``module`` (called at ``user``) that quantize ``node``: an Add with one
    quantizer per input applies only those of the arguments that are ``node``."""
    second = getattr(module, "second_input_quantizer", None)
    if second is not None:
        return [q for q, arg in zip((module.input_quantizer, second), user.args) if arg is node]
    quantizer = getattr(module, "input_quantizer", None)
    return [quantizer] if quantizer is not None else []


def _same(a: ActivationQDQ, b: ActivationQDQ) -> bool:
    return (torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
            and (a.clip_min, a.clip_max) == (b.clip_min, b.clip_max))


def quantize_before_value_moving_ops(form: nn.Module) -> int:
    """Give every float max pool and channel shuffle the quantizer its readers apply (when they all apply
    the same one).

    Q(maxpool(x)) = maxpool(Q(x)) for any monotone Q, and a shuffle only moves values, so this changes no
    value; it turns ``Conv → ReLU → MaxPool → Q`` into ``Conv → ReLU → Q → DQ → MaxPool → Q``, which ONNX
    Runtime runs as QLinearConv (ReLU absorbed) and a uint8 max pool instead of a float conv and a float
    pool (likewise QLinearConv and uint8 Reshape/Transpose for NIN-GC's shuffles)."""
    try:
        graph = _FormTracer().trace(form)
    except Exception:  # noqa: BLE001 - an untraceable model is exported without this rewrite
        return 0
    modules = dict(form.named_modules())
    done = 0
    for node in graph.nodes:
        pool = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(pool, _QUANTIZE_BEFORE) or isinstance(pool, QuantizedModule):
            continue  # a quantized max pool (schemes written before quantize_max_pools) has its own Q/DQ
        source = node.args[0] if node.args else None
        if isinstance(source, torch.fx.Node) and source.op == "call_module" \
                and isinstance(modules.get(source.target), nn.Sequential) and isinstance(modules[source.target][0], ActivationQDQ):
            continue
        readers = _consumer_quantizers(node, modules)
        if readers and all(_same(readers[0], q) for q in readers[1:]):
            form.set_submodule(node.target, nn.Sequential(copy.deepcopy(readers[0]), modules[node.target]))
            done += 1
    return done


# ------------------------------------------------------------------------------------------ the model
@torch.no_grad()
def export_form(model: nn.Module, activation_dtype: str = "uint8", weight_dtype: str = "auto",
                target: str = DEFAULT_TARGET) -> tuple[nn.Module, ExportFormReport]:
    """A copy of ``model`` in eval mode that computes what its ONNX export computes (see module docstring)."""
    from micronet.compression.fusion import fuse
    from micronet.compression.quantization.core.workflow import is_prepared

    if activation_dtype not in ACTIVATION_DTYPES:
        raise DeployError(f"activation_dtype must be one of {', '.join(ACTIVATION_DTYPES)} (got {activation_dtype!r})")
    if weight_dtype not in WEIGHT_DTYPES:
        raise DeployError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)} (got {weight_dtype!r})")
    quantized = is_prepared(model)
    get_target(target)
    report = ExportFormReport(quantized=quantized, activation_dtype=activation_dtype, weight_dtype=weight_dtype,
                              target=target)
    form, fusion = fuse(copy.deepcopy(model).cpu().float())
    form.eval()
    if not quantized:
        report.bn_folded = len(fusion.fused)
        return form, report
    bn_into_scales = {layer.conv: layer.bn for layer in fusion.kept if layer.scale_foldable}
    for name, module in list(form.named_modules()):
        if isinstance(module, WeightedQuantizedModule):
            bn_name = bn_into_scales.get(name)
            bn = form.get_submodule(bn_name) if bn_name else None
            exported = WeightedExport(module, name, activation_dtype, bn, weight_dtype, target)
            form.set_submodule(name, exported)
            if bn_name:
                form.set_submodule(bn_name, nn.Identity())
            report.layers.append(exported.record)
            report.activation_quantizers += isinstance(exported.input_quantizer, (ActivationQDQ, SignExport))
    report.bn_folded = len(fusion.fused) + len(bn_into_scales)
    owned: set[str] = set()
    for name, module in list(form.named_modules()):
        if isinstance(module, QuantizedModule):
            module.input_quantizer = activation_export(module.input_quantizer, f"{name}.input_quantizer", activation_dtype)
            owned.add(f"{name}.input_quantizer" if name else "input_quantizer")
            report.activation_quantizers += isinstance(module.input_quantizer, (ActivationQDQ, SignExport))
        elif isinstance(module, Quantizer) and name not in owned:
            exported = activation_export(module, name, activation_dtype)
            form.set_submodule(name, exported)
            report.activation_quantizers += isinstance(exported, (ActivationQDQ, SignExport))
    report.value_moving_ops_quantized = quantize_before_value_moving_ops(form)
    return form, report
