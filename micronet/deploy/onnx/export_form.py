"""The export form of a model: what the ONNX file will compute, as a torch module.

:func:`export_form` copies a float or micronet-quantized model, folds its BatchNorms and replaces every
quantizer by the QuantizeLinear/DequantizeLinear it stands for (:mod:`.qdq_ops`):

* activation quantizers (affine, learned-scale, DoReFa) → ``Clip`` (only for ranges narrower than the
  8-bit type) → ``QuantizeLinear`` → ``DequantizeLinear``. Signed symmetric int8 codes are written as
  uint8 with zero point 128 — the same values, and ONNX Runtime's fast u8s8 kernels — unless
  ``activation_dtype="int8"`` (TensorRT wants signed int8 with zero point 0);
* sign activations → ``QuantizeLinear`` → ``Clip`` on the codes → ``DequantizeLinear`` giving ±1
  (:class:`RequantizeCodes`), so that the layers before and after a sign run on integer kernels; with int8
  activations (the TensorRT form) ``Sign(Sign(x) + 0.5)`` (sign(0) = +1, as in training);
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
    input_step,
    int8_weight_codes,
)
from micronet.compression.quantization.core.modules import QuantizedModule, WeightedQuantizedModule
from micronet.compression.quantization.core.quantizers import Quantizer
from micronet.deploy.onnx import qdq_ops
from micronet.deploy.targets import DEFAULT_TARGET, get_target, weight_dtype_for
from micronet.errors import DeployError, QuantizationError
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
    bias: str  # "int32" / "int32 sign threshold" / "float" / "none"
    note: str = ""
    kernel: str = ""  # "integer" or "float: <why>" (what ONNX Runtime can fuse: quantized input, int8 weights, quantized output)


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
                 "kernel": row.kernel, "note": row.note} for row in self.layers]

    @property
    def integer_layers(self) -> int:
        """Weighted layers written so that ONNX Runtime runs them on integer kernels (QLinearConv, QGemm)."""
        return sum(layer.kernel == "integer" for layer in self.layers)


# ------------------------------------------------------------------------------------------ activations
class ActivationQDQ(nn.Module):
    """Clip → QuantizeLinear → DequantizeLinear with one scale and zero point."""

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype, quant_min: int, quant_max: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=dtype))
        info = torch.iinfo(dtype)
        scale32 = self.scale.item()
        self.clip_min = float("-inf") if quant_min <= info.min else (quant_min - zero_point) * scale32
        self.clip_max = float("inf") if quant_max >= info.max else (quant_max - zero_point) * scale32
        self.dtype_name = "uint8" if dtype == torch.uint8 else "int8"

    @property
    def input_step(self) -> torch.Tensor:
        """The step of the codes a layer reading this quantizer multiplies."""
        return self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qdq_ops.quantize_dequantize(x, self.scale, self.zero_point, self.clip_min, self.clip_max)

    def forward_shared(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [self(t) for t in tensors]

    def value_copy(self) -> ActivationQDQ:
        """The quantizer to put before a max pool or shuffle that this one reads (see
        :func:`quantize_before_value_moving_ops`)."""
        return copy.deepcopy(self)


SIGN_SCALE = 2.0**-100  # the QuantizeLinear step of a sign (see RequantizeCodes.sign)
SIGN_ZERO_POINT = 129  # its zero point: every v ≥ 0 (0 included) gets a code ≥ 129
SIGN_CODES = (127, 129)  # uint8 codes of −1 and +1 around zero point 128, scale 1


class RequantizeCodes(nn.Module):
    """QuantizeLinear(scale, zero point, uint8) → Clip on the codes → DequantizeLinear(out_scale, out_zero_point).

    The form of activations whose grid is narrower than uint8, written so that the producing layer's
    integer kernel does the quantization: ONNX Runtime fuses ``DQ → Conv [→ Relu] → Q`` into QLinearConv
    (a Relu is absorbed by zero point 0), and the Clip runs on uint8 codes.

    * affine (and other) grids narrower than uint8, e.g. 4-bit activations: codes clipped to their range,
      read at the same scale and zero point;
    * DoReFa k-bit activations, clamp(x·p, 0, 1) on {0, 1/n, …, 1} (n = 2^k − 1): codes
      clamp(round(x / (1/(p·n))), 0, n), read at step 1/n. The same values, except where x·p·n lies within
      float32 rounding of a half-integer (the two roundings may then differ by one code).
    * sign activations (±1, sign(0) = +1): quantized at a step of 2^-100 with zero point 129, clipped to
      127..129 and read with zero point 128, scale 1. Every v ≥ 0 (0 included, whatever order a kernel sums
      in) gets a code ≥ 129 → +1, every v ≤ −1.5·2^-100 a code ≤ 127 → −1: the sign of any float32 value
      of a sum of ordinary magnitudes (only |v| < 1.5·2^-100 ≈ 1e-30 lies between). An integer layer before
      the sign gets a threshold bias that makes its accumulator ≥ 0 or ≤ −1 exactly
      (:meth:`WeightedExport.write_sign_threshold`).
    """

    def __init__(self, scale: float, zero_point: int, code_min: int, code_max: int, out_scale: float,
                 out_zero_point: int, kind: str) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.uint8))
        self.register_buffer("out_scale", torch.tensor(out_scale, dtype=torch.float32))
        self.register_buffer("out_zero_point", torch.tensor(out_zero_point, dtype=torch.uint8))
        self.code_min, self.code_max = code_min, code_max
        self.dtype_name = kind  # "uint8" (DoReFa) or "sign"

    @classmethod
    def sign(cls) -> RequantizeCodes:
        return cls(SIGN_SCALE, SIGN_ZERO_POINT, *SIGN_CODES, 1.0, 128, "sign")

    @property
    def input_step(self) -> torch.Tensor:
        return self.out_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qdq_ops.requantize_codes(x, self.scale, self.zero_point, self.code_min, self.code_max,
                                        self.out_scale, self.out_zero_point)

    def forward_shared(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [self(t) for t in tensors]

    def value_copy(self) -> ActivationQDQ:
        """The QuantizeLinear/DequantizeLinear at this quantizer's input scale, without the clip: before a max
        pool it keeps the pool on uint8 codes, and this quantizer, after the pool, requantizes them exactly."""
        return ActivationQDQ(float(self.scale), int(self.zero_point), torch.uint8, 0, 255)


class SignExport(nn.Module):
    """A sign whose producer the export cannot make integer (see :func:`integer_signs`): float ±1."""

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


def activation_export(q: Quantizer, name: str, activation_dtype: str) -> nn.Module:
    """The export module for an activation quantizer, from the grid it describes
    (:meth:`~micronet.compression.quantization.core.quantizers.Quantizer.activation_grid`)."""
    if not q.enabled.item():
        return Passthrough()
    try:
        grid = q.activation_grid()
    except QuantizationError:
        raise DeployError(f"{name}: quantizer {type(q).__name__} has no ONNX mapping: give it an activation_grid() "
                          "(float, sign or integer codes)") from None
    if grid.kind == "float":
        return Passthrough()
    if grid.kind == "sign":
        return SignExport()
    if grid.per_channel:
        raise DeployError(f"{name}: per-channel activation quantization has no QDQ mapping here: quantize "
                          "activations per tensor")
    if grid.bits > 8:
        raise DeployError(f"{name}: {grid.bits}-bit activations do not fit ONNX int8/uint8: export at most 8 bits")
    if not grid.calibrated:
        raise DeployError(f"{name} was never calibrated (its observer saw no data): run "
                          "calibrate(model, data) or QAT before exporting")
    signed = grid.code_min < 0
    if not signed and activation_dtype == "int8" and grid.read_scale is None:
        raise DeployError(f"{name} holds unsigned codes (0..{grid.code_max}) that signed int8 cannot hold: prepare "
                          "the model with signed activations (QuantizerSpec(signed=True)) for an int8/TensorRT export")
    shift = 128 if signed and activation_dtype == "uint8" else 0  # the same values: u8s8 is ORT's fast path
    zero_point, code_min, code_max = grid.zero_point + shift, grid.code_min + shift, grid.code_max + shift
    if grid.read_scale is not None or (activation_dtype == "uint8" and (code_min > 0 or code_max < 255)):
        # a grid narrower than uint8, or read on another grid: the clip acts on codes, between integer kernels
        return RequantizeCodes(grid.scale, zero_point, code_min, code_max,
                               grid.scale if grid.read_scale is None else grid.read_scale, zero_point, "uint8")
    return ActivationQDQ(grid.scale, zero_point, torch.int8 if signed and not shift else torch.uint8, code_min, code_max)


def _input_kind(module: nn.Module) -> str:
    if isinstance(module, (ActivationQDQ, RequantizeCodes)):
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
    or the reason why no int8 tensor holds those values (:func:`int8_weight_codes`)."""
    quantizer = module.weight_quantizer
    if not getattr(quantizer, "calibrated", True):
        raise DeployError(f"{quantizer.qualified_name or 'a weight quantizer'} was never calibrated: run "
                          "calibrate(model, data) or QAT before exporting")
    return int8_weight_codes(quantizer, module.weight.detach(), module.weight_axis)


def _positive_channel_scales(codes: torch.Tensor, scale: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels whose weights are all 0 (binary/ternary α = 0, a BatchNorm γ = 0) get codes 0 at scale 1: the
    same values, and a valid requantization multiplier for an integer kernel."""
    zero = scale == 0
    if not bool(zero.any()):
        return codes, scale
    if scale.dim() == 0:
        return torch.zeros_like(codes), torch.ones_like(scale)
    return (torch.where(_per_axis(zero, axis, codes.dim()), torch.zeros_like(codes), codes),
            torch.where(zero, torch.ones_like(scale), scale))


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
            codes, scale = _positive_channel_scales(*packed, self.axis)
            zero_point = torch.zeros(scale.shape, dtype=torch.int8)
            weight_dtype = "int8" if activation_dtype == "int8" else resolve_weight_dtype(weight_dtype, codes, target)
            if weight_dtype == "uint8":  # the same values: codes and zero point shifted by 128
                codes, zero_point = (codes.to(torch.int16) + 128).to(torch.uint8), (zero_point + 128).to(torch.uint8)
            self.register_buffer("weight_codes", codes)
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_zero_point", zero_point)
            self.weight_text = f"{weight_dtype} per-channel" if scale.dim() else f"{weight_dtype} per-tensor"
        self.bias_text = "none" if bias is None else "float"
        self.float_bias = bias  # float64, for the int32 codes below and sign thresholds
        self.register_buffer("bias_codes", None)
        self.register_buffer("bias", None if bias is None else bias.float())
        self.int32_bias = activation_dtype == "uint8"  # TensorRT's parser dequantizes int8 only: float biases there
        self.bias_after = False
        self.input_step = self.input_quantizer.input_step if isinstance(self.input_quantizer, (ActivationQDQ, RequantizeCodes)) else None
        self.record = LayerExport(name, self.kind, _input_kind(self.input_quantizer), self.weight_text, self.bias_text, note)
        self._place_bias(rounded_in_model=input_step(module.input_quantizer) is not None)

    @property
    def integer_operands(self) -> bool:
        """Integer codes on both sides of the product: ONNX Runtime can run the layer on an integer kernel."""
        return self.input_step is not None and self.weight_codes is not None

    def accumulator_step(self) -> torch.Tensor:
        """float32 ``s_x·s_w`` per output channel: the scale of the int32 accumulator (as ORT's quantizer
        computes it)."""
        step = (self.input_step * self.weight_scale).float()
        channels = self.weight_codes.shape[self.axis]
        return step.expand(channels).contiguous() if step.dim() == 0 else step.contiguous()

    def _set_bias_codes(self, codes: torch.Tensor, text: str) -> None:
        step = self.accumulator_step()
        self.bias_codes = codes.to(torch.int32).expand(step.shape).contiguous()
        self.register_buffer("bias_scale", step)
        self.register_buffer("bias_zero_point", torch.zeros(step.shape, dtype=torch.int32))
        self.bias, self.bias_after, self.bias_text = None, False, text
        self.record.bias = text

    def _place_bias(self, rounded_in_model: bool) -> None:
        """An int32 bias where the model adds its bias on the accumulator grid (``rounded_in_model``, see
        :mod:`~micronet.compression.quantization.core.integer_bias`), else a float bias added after the layer.

        A float bias next to a DequantizeLinear input and weight is what ONNX Runtime's WeightBiasQuantization
        rounds to int32 at s_x·s_w itself, moving outputs by up to half an accumulator step; added after the
        layer, it stays float and ONNX Runtime computes what the model computes (in float: that layer then
        has no integer kernel)."""
        if not (self.int32_bias and self.integer_operands and self.float_bias is not None):
            return
        if rounded_in_model:
            codes = bias_codes(self.float_bias, self.accumulator_step())
            if codes is not None:
                self._set_bias_codes(codes, "int32")
                return
        self.bias_after = True
        self.bias_text = self.record.bias = "float, added after the layer"

    def read_sign_codes(self) -> None:
        """The input comes from a sign activation written as codes ±1 (zero point 128, scale 1)."""
        self.input_step = torch.tensor(1.0)
        self.record.input = "sign"
        self._place_bias(rounded_in_model=False)  # the model adds its float bias to the ±1 products

    @torch.no_grad()
    def write_sign_threshold(self) -> None:
        """Make the requantization of this layer's output (:meth:`RequantizeCodes.sign`) the sign of the
        model's pre-sign value v = a·s + b (a the integer accumulator, s = s_x·s_w > 0, b the bias).

        v ≥ 0 ⟺ a ≥ −b/s ⟺ a ≥ T = ⌈−b/s⌉, because a is an integer (v = 0 gives +1, as sign(0) = +1); where
        the model adds its bias as int32 codes B on the accumulator grid (an integer-input layer), T = −B. With
        the int32 bias −T the kernel's sum is a' = a − T, an integer: a ≥ T ⟺ a' ≥ 0, whose code is
        ≥ 129; a < T ⟺ a' ≤ −1, and then fl32(a')·M ≤ −M ≤ −2 for the requantization multiplier
        M = s / SIGN_SCALE (≥ 2 for any s ≥ 2^-99), so the code is ≤ 127. T is clamped to the reachable range
        of a, so the bias fits int32."""
        step = self.accumulator_step().double()
        if bool((step * (1.0 / SIGN_SCALE) < 2).any()):
            raise DeployError(f"{self.record.name}: weight scales below 2^-99 cannot be written as a sign threshold: "
                              "retrain or rescale the layer")
        if self.bias_text == "int32":  # the model itself adds the bias as int32 codes B: v ≥ 0 ⟺ a ≥ −B
            threshold = -self.bias_codes.double()
        else:
            bias = self.float_bias if self.float_bias is not None else torch.zeros_like(step)
            threshold = torch.ceil(-bias / step)
        centred = self.weight_codes.to(torch.int64) - _per_axis(self.weight_zero_point.to(torch.int64), self.axis,
                                                                self.weight_codes.dim())
        reach = centred.abs().sum(dim=[d for d in range(centred.dim()) if d != self.axis]).double() * 255
        reach = reach.clamp(max=2.0**30)
        self._set_bias_codes(-torch.maximum(torch.minimum(threshold, reach + 1), -reach), "int32 sign threshold")

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

        if isinstance(m, (ActivationQDQ, RequantizeCodes, SignExport, Passthrough, WeightedExport, QuantizedModule)):
            return True
        if is_micronet_module(m) and next(m.children(), None) is None:
            return True
        return super().is_leaf_module(m, qualified_name)


_READERS = (ActivationQDQ, RequantizeCodes)


def _consumer_quantizers(node: torch.fx.Node, modules: dict[str, nn.Module]) -> list[nn.Module] | None:
    """The activation quantizers (:class:`ActivationQDQ`, :class:`RequantizeCodes`) that read ``node``'s value,
    looking through value-preserving ops (ReLU, flatten, further max pools: each commutes with a monotone
    quantizer); None if any reader is another op."""
    found: list[nn.Module] = []
    for user in node.users:
        module = modules.get(user.target) if user.op == "call_module" else None
        readers = _quantizers_reading(module, user, node) if module is not None else []
        if readers and all(isinstance(q, _READERS) for q in readers):
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
    quantizer per input applies only those of the arguments that are ``node``; a quantizer on its own
    is its own reader."""
    if isinstance(module, _READERS):
        return [module]
    second = getattr(module, "second_input_quantizer", None)
    if second is not None:
        return [q for q, arg in zip((module.input_quantizer, second), user.args) if arg is node]
    quantizer = getattr(module, "input_quantizer", None)
    return [quantizer] if quantizer is not None else []


def _same(a: ActivationQDQ, b: ActivationQDQ) -> bool:
    return (torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
            and (a.clip_min, a.clip_max) == (b.clip_min, b.clip_max))


def _trace(form: nn.Module) -> torch.fx.Graph | None:
    try:
        return _FormTracer().trace(form)
    except Exception:  # noqa: BLE001 - an untraceable model is exported without the graph rewrites
        return None


def quantize_before_value_moving_ops(form: nn.Module) -> int:
    """Give every float max pool and channel shuffle the quantizer its readers apply (when they all apply
    the same one).

    Q(maxpool(x)) = maxpool(Q(x)) for any monotone Q, and a shuffle only moves values, so this changes no
    value; it turns ``Conv → ReLU → MaxPool → Q`` into ``Conv → ReLU → Q → DQ → MaxPool → Q``, which ONNX
    Runtime runs as QLinearConv (ReLU absorbed) and a uint8 max pool instead of a float conv and a float
    pool (likewise QLinearConv and uint8 Reshape/Transpose for NIN-GC's shuffles). A reader that clips
    codes (:class:`RequantizeCodes`) puts its QuantizeLinear alone before the pool and clips after it."""
    graph = _trace(form)
    if graph is None:
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
        copies = [q.value_copy() for q in readers or []]
        if copies and all(_same(copies[0], q) for q in copies[1:]):
            form.set_submodule(node.target, nn.Sequential(copies[0], modules[node.target]))
            done += 1
    return done


# ------------------------------------------------------------------------------------------ signs
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_MONOTONE_MOVES = (nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, ChannelShuffle)  # sign(op(v)) = op(sign(v))


def _module(node: object, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(node.target) if isinstance(node, torch.fx.Node) and node.op == "call_module" else None


def _sole_producer(node: torch.fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The layer whose output alone ``node`` reads, through Identity / Dropout / max pools that nothing else
    reads (BatchNorms folded into a sign threshold are Identities by now)."""
    source = node.args[0] if node.args else None
    while isinstance(_module(source, modules), _MONOTONE_MOVES) and len(source.users) == 1 \
            and not isinstance(_module(source, modules), QuantizedModule):
        source = source.args[0]
    if not isinstance(source, torch.fx.Node) or len(source.users) != 1:
        return None
    return _module(source, modules)


def _layers_reading(node: torch.fx.Node, modules: dict[str, nn.Module]) -> list[WeightedExport]:
    """The weighted layers that read ``node``'s value directly or through value-preserving modules."""
    found: list[WeightedExport] = []
    for user in node.users:
        module = _module(user, modules)
        if isinstance(module, WeightedExport) and isinstance(module.input_quantizer, Passthrough):
            found.append(module)
        elif isinstance(module, (*_MONOTONE_MOVES, nn.Flatten)) and user.args and user.args[0] is node:
            found.extend(_layers_reading(user, modules))
    return found


def integer_signs(form: nn.Module) -> int:
    """Write sign activations as codes that integer kernels produce and read (:meth:`RequantizeCodes.sign`).

    A sign whose value comes from one integer layer alone becomes that layer's requantization, with the
    int32 threshold bias of :meth:`WeightedExport.write_sign_threshold` (exact); any other sign quantizes
    its float input directly. A sign followed only by a max pool moves after it (the max of signs is the
    sign of the max), so the pool runs on codes and the clip on the pooled tensor. The layers reading a sign
    then have integer operands. Returns how many signs were rewritten."""
    graph = _trace(form)
    if graph is None:
        return 0
    modules = dict(form.named_modules())
    done = 0
    for node in graph.nodes:  # graph order: a layer reads its input signs' codes before its own sign is seen
        if not isinstance(_module(node, modules), SignExport):
            continue
        layer = _sole_producer(node, modules)
        if isinstance(layer, WeightedExport) and layer.integer_operands and layer.int32_bias:
            layer.write_sign_threshold()
        reader, users = RequantizeCodes.sign(), list(node.users)
        pool = _module(users[0], modules) if len(users) == 1 else None
        if isinstance(pool, (nn.MaxPool1d, nn.MaxPool2d)) and not isinstance(pool, QuantizedModule):
            form.set_submodule(node.target, nn.Identity())
            form.set_submodule(users[0].target, nn.Sequential(pool, reader))
            node = users[0]
        else:
            form.set_submodule(node.target, reader)
        for reading in _layers_reading(node, modules):
            reading.read_sign_codes()
        done += 1
    return done


def classify_kernels(form: nn.Module) -> None:
    """Record in each layer's report whether ONNX Runtime can run it on an integer kernel: quantized
    input, int8 weights, an int32 (or no) bias, and a quantizer reading its output; else why not."""
    graph = _trace(form)
    modules = dict(form.named_modules())
    quantized_output = set()
    if graph is not None:
        for node in graph.nodes:
            module = _module(node, modules)
            if isinstance(module, WeightedExport) and _consumer_quantizers(node, modules):
                quantized_output.add(id(module))
    for module in modules.values():
        if not isinstance(module, WeightedExport):
            continue
        if module.weight_codes is None:
            why = f"float weights ({module.record.note or 'not quantized'})"
        elif module.input_step is None:
            why = "float input: ONNX Runtime's integer kernels need quantized activations"
        elif module.bias_after:
            why = "float bias added after the layer"
        elif id(module) not in quantized_output:
            why = "float output: no quantizer reads it (the model output, or a float op)"
        else:
            module.record.kernel = "integer"
            continue
        module.record.kernel = f"float: {why}"


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
            report.activation_quantizers += isinstance(exported.input_quantizer, (*_READERS, SignExport))
    report.bn_folded = len(fusion.fused) + len(bn_into_scales)
    owned: set[str] = set()
    for name, module in list(form.named_modules()):
        if isinstance(module, QuantizedModule):
            module.input_quantizer = activation_export(module.input_quantizer, f"{name}.input_quantizer", activation_dtype)
            owned.add(f"{name}.input_quantizer" if name else "input_quantizer")
            report.activation_quantizers += isinstance(module.input_quantizer, (*_READERS, SignExport))
        elif isinstance(module, Quantizer) and name not in owned:
            exported = activation_export(module, name, activation_dtype)
            form.set_submodule(name, exported)
            report.activation_quantizers += isinstance(exported, (*_READERS, SignExport))
    if activation_dtype == "uint8":  # TensorRT's form keeps float signs (its parser dequantizes int8 only)
        integer_signs(form)
    report.value_moving_ops_quantized = quantize_before_value_moving_ops(form)
    classify_kernels(form)
    return form, report
