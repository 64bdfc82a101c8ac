"""The bias an integer runtime adds: int32 codes on the accumulator grid ``s_x·s_w``.

An int8 convolution accumulates ``Σ (x_q − z_x)·w_q`` in int32 at scale ``s_x·s_w`` (per output channel),
so ONNX Runtime's QLinearConv/QGemm, TFLite and gemmlowp add the bias as int32 codes on that grid:
``round(b / (s_x·s_w))``. That rounding moves each output by up to half an accumulator step; where an
output lies near a rounding boundary of the next quantizer its code flips, and deep residual nets amplify
the flips. So in eval mode the quantized layers add the rounded bias too
(``WeightedQuantizedModule.integer_bias``; :class:`IntegerBiasBatchNorm2d` for a BatchNorm the export
folds), and the exporter writes the same codes: the fake-quant model computes what the deployed one does.
Training and calibration keep the float bias (the rounding has no useful gradient, and the scales are not
final while observers run).

The bias is rounded where micronet's ONNX export writes an int32 bias: an enabled input quantizer with
integer codes on a uniform grid of at most 8 bits (affine or learned-scale per tensor: step ``s_x``;
DoReFa k ≤ 8 bits: step 1/(2^k − 1), whatever its ``pre_scale``) and a weight whose values are int8 codes
times a per-channel step (:func:`int8_weight_codes`: symmetric affine of at most 8 bits — possibly switched
off once the weights hold their quantized values, as after ``convert`` —, binary, ternary, DoReFa k ≤ 7).
Elsewhere (sign inputs, whose single threshold the export computes exactly; float weights; DoReFa 8-bit
weights, which no int8 tensor holds) the bias stays float, as in the export. DoReFa's grids are rational,
so pre-activations of layers without BatchNorm lie on a lattice whose points can fall exactly on the next
quantizer's rounding ties: there torch's float32 sums and the integer kernels' requantization may round
one code apart (the export tests check that every such difference sits at a tie). TensorRT's form (int8
activations) also keeps float biases, which its kernels add in float.
"""

from __future__ import annotations

import torch
from torch import nn

from micronet.compression.quantization.core.lowbit import LowBitWeightQuantizer
from micronet.compression.quantization.core.quantizers import AffineQuantizer, Quantizer
from micronet.errors import QuantizationError

INT32_MAX = 2**31 - 1
MAX_BITS = 8
INT8_MAX = 127


def input_step(quantizer: Quantizer) -> torch.Tensor | None:
    """The float32 step between the input codes an integer layer multiplies (0-dim), or ``None`` where the
    input is not integer codes on one uniform grid of at most 8 bits (float, sign, per channel, calibrating),
    as the quantizer describes itself (:meth:`Quantizer.activation_grid`)."""
    if not quantizer.enabled.item() or quantizer.observing:
        return None
    try:
        grid = quantizer.activation_grid()
    except QuantizationError:
        return None
    if grid.kind != "codes" or grid.bits > MAX_BITS or grid.per_channel or not grid.calibrated:
        return None
    return torch.tensor(grid.scale if grid.read_scale is None else grid.read_scale, dtype=torch.float32)


def _per_axis(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


@torch.no_grad()
def int8_weight_codes(quantizer: Quantizer, weight: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor] | str:
    """``(int8 codes, float32 step per output channel along axis, or one 0-dim step)`` with
    ``codes·step`` = the weight the layer computes with, or the reason why no int8 tensor holds it.

    Every family's :meth:`~Quantizer.weight_codes` gives ``(codes − zero_point)·scale``; centred codes
    that are integers (affine, ternary) or half-integers (binary ±½ around ½, DoReFa's odd multiples of
    ½ around (2^k − 1)/2) become int8 at the scale or half of it, when they fit ±127."""
    target = quantizer.quantize(weight) if quantizer.enabled.item() else weight
    try:
        frozen = isinstance(quantizer, LowBitWeightQuantizer) and not quantizer.enabled.item()
        codes = quantizer.codes_of_values(weight) if frozen else quantizer.weight_codes(weight)
    except Exception as error:  # noqa: BLE001 - a family without integer codes (e.g. float weights)
        return f"no integer codes ({error})"
    centred = codes.codes.double() - codes.zero_point.double()
    scale = codes.scale.double().expand_as(centred) if codes.scale.dim() else codes.scale.double()
    for factor in (1.0, 2.0):  # integers, or half-integers
        doubled = centred * factor
        if torch.equal(doubled, doubled.round()) and doubled.abs().max() <= INT8_MAX:
            int_codes = doubled.to(torch.int8)
            step = scale / factor
            break
    else:
        return f"{int(quantizer.bits)}-bit codes need more than int8 (values kept float, exact)"
    if axis is None or step.dim() == 0:
        channel_step = step.reshape(-1)[:1].reshape(())
    else:
        dims = [d for d in range(step.dim()) if d != axis]
        channel_step = step.amax(dim=dims) if dims else step
        if not torch.equal(_per_axis(channel_step, axis, step.dim()).expand_as(step), step):
            return "scales vary inside a channel"
    channel_step = channel_step.float()
    rebuilt = int_codes.float() * (channel_step if channel_step.dim() == 0 else _per_axis(channel_step, axis, weight.dim()))
    tolerance = 4 * torch.finfo(torch.float32).eps * float(target.abs().max().clamp(min=1e-30))
    if (rebuilt - target).abs().max() > tolerance:
        return "integer codes do not reproduce the layer's weights"
    return int_codes, channel_step


def weight_step(quantizer: Quantizer, weight: torch.Tensor | None, axis: int | None) -> torch.Tensor | None:
    """The float32 step of the layer's int8 weight codes (per output channel, or 0-dim), or ``None``.
    Affine weights: their scale (the quantizer may be off once the weights hold their quantized values);
    low-bit families: from the codes of ``weight`` (binary and ternary steps are α, which depends on it)."""
    if isinstance(quantizer, AffineQuantizer):
        if not (int(quantizer.bits) <= MAX_BITS and quantizer.calibrated and quantizer.symmetric) or quantizer.observing:
            return None
        return quantizer.scale.detach().float()
    if isinstance(quantizer, LowBitWeightQuantizer) and weight is not None:
        packed = int8_weight_codes(quantizer, weight.detach(), axis)
        return None if isinstance(packed, str) else packed[1]
    return None


def integer_bias_grid(input_quantizer: Quantizer, weight_quantizer: Quantizer, weight: torch.Tensor | None = None,
                      axis: int | None = 0) -> torch.Tensor | None:
    """The float32 grid ``s_x·s_w`` (per output channel, or one value) of the layer's int32 bias, or ``None``
    where deployment keeps the bias float (see the module docstring). ``weight`` (and its channel ``axis``)
    is needed by the families whose step depends on it (binary and ternary α)."""
    x_step = input_step(input_quantizer)
    w_step = None if x_step is None else weight_step(weight_quantizer, weight, axis)
    return None if w_step is None else (x_step * w_step).reshape(-1)


def bias_codes(bias: torch.Tensor, grid: torch.Tensor) -> torch.Tensor | None:
    """``round_half_even(bias / grid)`` in float64 (int-valued), or ``None`` when a code overflows int32."""
    codes = torch.round(bias.detach().double() / grid.double())
    return None if bool((codes.abs() >= INT32_MAX).any()) else codes


def round_bias(bias: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
    """``bias`` moved onto the int32 grid (its value as the runtime adds it), or unchanged where there is
    no grid or the codes overflow int32. The gradient passes straight through."""
    codes = None if grid is None else bias_codes(bias, grid)
    if codes is None:
        return bias
    rounded = (codes * grid.double()).to(bias.dtype)
    return bias + (rounded - bias).detach()


# ------------------------------------------------------------------------------------------ BatchNorm
def batchnorm_factor_and_bias(bn: nn.Module, conv_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(γ/σ, β + (b − μ)·γ/σ)`` per channel in float64: a BatchNorm folded into the conv before it."""
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    factor = gamma / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    bias = conv_bias.detach().double() if conv_bias is not None else torch.zeros_like(mean)
    return factor, beta + (bias - mean) * factor


def folded_channel_scale(weight_scale: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The float32 per-channel weight scale once a BatchNorm's ``factor`` is folded into it (the codes keep
    their magnitudes; a zero factor leaves the scale, and the codes become 0)."""
    scale = weight_scale.detach().double().reshape(-1).expand(factor.shape)
    return torch.where(factor == 0, scale, scale * factor.abs()).float()


class IntegerBiasBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d after a quantized conv, which the export folds into that conv: the codes stay, the
    per-channel weight scales take γ/σ, and β + (b − μ)·γ/σ becomes one int32 bias on the folded grid
    ``s_x·s_w·|γ/σ|``. In eval mode this module adds that int32 bias instead of its float shift, so the
    fake-quant model computes what the deployed one does; training is ``nn.BatchNorm2d``'s. Parameters and
    buffers are a BatchNorm2d's (same state_dict); the conv is referenced, not registered."""

    _conv: nn.Module | None = None

    @classmethod
    def attach(cls, bn: nn.BatchNorm2d, conv: nn.Module) -> nn.BatchNorm2d:
        bn.__class__ = cls
        object.__setattr__(bn, "_conv", conv)  # not a submodule: its tensors stay the conv's own
        return bn

    def integer_shift(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(γ/σ, float shift β + (b − μ)·γ/σ, the int32-grid shift added instead)`` per channel in float64,
        or ``None`` where the eval forward adds the float shift (training, no grid, int32 overflow)."""
        conv = self._conv
        if self.training or conv is None or not self.track_running_stats or self.running_mean is None:
            return None
        x_step = input_step(conv.input_quantizer)
        w_step = None if x_step is None else weight_step(conv.weight_quantizer, conv.deployed_weight(), conv.weight_axis)
        if w_step is None:
            return None
        factor, shift = batchnorm_factor_and_bias(self, conv.bias)
        grid = (x_step * folded_channel_scale(w_step, factor)).float()
        codes = bias_codes(shift, grid)
        return None if codes is None else (factor, shift, codes * grid.double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = self.integer_shift()
        if folded is None:
            return super().forward(x)
        factor, _, shift = folded
        added = self._conv.integer_bias(self._conv.bias)  # what the conv already added to x
        total = shift - (added.detach().double() * factor if added is not None else 0.0)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * factor.to(x.dtype).reshape(shape) + total.to(x.dtype).reshape(shape)
