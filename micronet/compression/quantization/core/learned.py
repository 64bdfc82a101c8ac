"""Learned step size quantization (LSQ, Esser et al. 2020): the scale of an affine quantizer is trained.

At 4 bits and below a min/max range wastes most of the few levels on outliers; LSQ lets the loss choose
the clipping point. The quantizer is an :class:`AffineQuantizer` whose ``scale`` is an ``nn.Parameter``
(symmetric, zero point 0), so calibration, freezing, checkpoints, integer codes and export work unchanged,
and the deployed arithmetic is the same integer affine quantization.

* The first batch observed in QAT initialises the scale from the observer (use the ``histogram`` observer
  for activations: the least-squares clipping range, not the maximum); after that the observer rests and
  gradient descent moves the scale. ``CALIBRATE`` mode (PTQ) sets it from the observer as usual.
* The scale's gradient is multiplied by ``1/sqrt(n · quant_max)`` (n = elements per scale), the paper's
  rule that keeps the step comparable to the weights' steps.
* Frozen (QAFT) or in eval mode the scale is a constant and the output is bit-identical to
  ``torch.fake_quantize_per_*_affine`` with the same scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from micronet.compression.quantization.core.observers import Observer
from micronet.compression.quantization.core.quantizers import FROZEN, QAT, AffineQuantizer
from micronet.errors import QuantizationError


class _ScaleGradient(torch.autograd.Function):
    """Identity forward (bit-exact), gradient multiplied by ``factor``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad


class LearnedScaleQuantizer(AffineQuantizer):
    """Symmetric affine quantizer with a trained scale (see the module docstring)."""

    def __init__(self, bits: int, observer: Observer, *, signed: bool | None = None, narrow_range: bool = False) -> None:
        super().__init__(bits, observer, symmetric=True, signed=signed, narrow_range=narrow_range)
        initial = self._buffers.pop("scale")
        self.scale = nn.Parameter(initial.clone())
        self.register_buffer("scale_initialized", torch.zeros((), dtype=torch.uint8))

    def observe(self, x: torch.Tensor) -> None:
        if int(self.mode.item()) == QAT and self.scale_initialized.item():
            return  # learnt by gradient descent from here on
        super().observe(x)
        self.scale_initialized.fill_(1)

    @property
    def calibrated(self) -> bool:
        return bool(self.scale_initialized.item())

    def reobserve(self, x: torch.Tensor) -> bool:
        """A learnt scale is a parameter of the model, never re-derived from the data."""
        return False if self.scale_initialized.item() else super().reobserve(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        learning = self.training and torch.is_grad_enabled() and int(self.mode.item()) != FROZEN
        if not learning or not self.scale.requires_grad:
            return super().quantize(x)
        if not self.scale_initialized.item():
            raise QuantizationError(
                f"quantizer {self.qualified_name or 'LearnedScaleQuantizer'} has no scale yet: "
                "train it in QAT mode or calibrate it first"
            )
        quant_min, quant_max = self.quant_min_max
        scale = _ScaleGradient.apply(self.scale, 1.0 / math.sqrt(x.numel() / self.scale.numel() * quant_max))
        if self.ch_axis is not None:
            shape = [1] * x.dim()
            shape[self.ch_axis] = -1
            scale = scale.reshape(shape)
        return torch.clamp(_RoundSTE.apply(x * (1.0 / scale)), quant_min, quant_max) * scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, learned scale"


def build_learned(spec, ch_axis: int | None, num_channels: int | None) -> LearnedScaleQuantizer:
    """Quantizer-family builder for ``QuantizerSpec(family="lsq", ...)``."""
    from micronet.compression.quantization.core.observers import build_observer

    if not spec.symmetric:
        raise QuantizationError("learned-scale (lsq) quantization is symmetric only: use symmetric=True (q_type 0)")
    observer = build_observer(spec.observer, ch_axis, num_channels, **spec.observer_options)
    return LearnedScaleQuantizer(spec.bits, observer, signed=spec.signed, narrow_range=spec.narrow_range)
