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

The bias is rounded where micronet's ONNX export writes an int32 bias: an enabled affine (or learned-scale)
per-tensor input quantizer of at most 8 bits, and a symmetric affine weight quantizer of at most 8 bits
(int8 codes; it may be switched off once the weights hold their quantized values, as after ``convert`` or
loading a packed artifact). Elsewhere (DoReFa or sign inputs, float weights) the bias stays float, as in
the export. TensorRT's form (int8 activations) also keeps float biases, which its kernels add in float.
"""

from __future__ import annotations

import torch
from torch import nn

from micronet.compression.quantization.core.quantizers import AffineQuantizer, Quantizer

INT32_MAX = 2**31 - 1
MAX_BITS = 8


def _calibrated(quantizer: AffineQuantizer) -> bool:
    initialized = getattr(quantizer, "scale_initialized", None)  # learned scales
    if initialized is not None:
        return bool(initialized.item())
    return quantizer.observer.is_initialized


def integer_bias_grid(input_quantizer: Quantizer, weight_quantizer: Quantizer) -> torch.Tensor | None:
    """The float32 grid ``s_x·s_w`` (per output channel, or one value) of the layer's int32 bias, or ``None``
    where deployment keeps the bias float (see the module docstring)."""
    for quantizer in (input_quantizer, weight_quantizer):
        if not (isinstance(quantizer, AffineQuantizer) and int(quantizer.bits) <= MAX_BITS and _calibrated(quantizer)):
            return None
    if not input_quantizer.enabled.item():  # a float input: the layer runs in float
        return None
    if input_quantizer.observing or weight_quantizer.observing:  # calibrating: the scales are not final yet
        return None
    if input_quantizer.ch_axis is not None or not weight_quantizer.symmetric:
        return None
    input_scale = input_quantizer.scale.detach().float().reshape(())
    return (input_scale * weight_quantizer.scale.detach().float()).reshape(-1)


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
        grid = None if self.training or conv is None else integer_bias_grid(conv.input_quantizer, conv.weight_quantizer)
        if grid is None or not self.track_running_stats or self.running_mean is None:
            return None
        factor, shift = batchnorm_factor_and_bias(self, conv.bias)
        input_scale = conv.input_quantizer.scale.detach().float().reshape(())
        grid = (input_scale * folded_channel_scale(conv.weight_quantizer.scale, factor)).float()
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
