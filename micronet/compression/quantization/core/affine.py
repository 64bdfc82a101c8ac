"""Affine (uniform integer) quantization arithmetic, shared by quantizers, observers and export.

Conventions are those of ONNX ``QuantizeLinear`` and torch.ao, so fake-quant, exported graphs and the
integer reference agree bit for bit:

* ``q = clamp(round_half_to_even(x / scale) + zero_point, quant_min, quant_max)``, ``x̂ = (q − zero_point) · scale``
* the range always contains 0 exactly (``lo ≤ 0 ≤ hi``), so zero padding is exact;
* symmetric: ``zero_point = 0`` and ``scale = max(|lo|, |hi|) / quant_max`` (the largest magnitude maps
  to the largest code, e.g. 127 — not 127.5 as in the original micronet, which clipped half a step);
* asymmetric: ``scale = (hi − lo) / (quant_max − quant_min)``, ``zero_point = quant_min − round(lo / scale)``;
* ``scale ≥ eps`` (float32 machine epsilon), so an all-zero tensor is representable without dividing by 0.
"""

from __future__ import annotations

import numpy as np
import torch

from micronet.compression.quantization.core.native import activation_kernels, native_ready
from micronet.errors import QuantizationError

EPS = torch.finfo(torch.float32).eps
MIN_BITS, MAX_BITS = 2, 16


class NonFiniteInputError(QuantizationError):
    """An observation met NaN or infinite values (the quantizer re-raises this with its own name)."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"observer received {kind} values")
        self.kind = kind


def quant_range(bits: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    """Integer code range: signed ``[-2^(b-1), 2^(b-1)-1]`` (narrow: ``-2^(b-1)+1``), unsigned ``[0, 2^b-1]``."""
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise QuantizationError(
            f"affine quantization supports {MIN_BITS} to {MAX_BITS} bits (got {bits}): "
            "use the binary/ternary presets for 1-2 bits or leave the layer in float"
        )
    bits = int(bits)
    if signed:
        low = -(2 ** (bits - 1))
        return (low + 1 if narrow_range else low), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def affine_qparams(
    lo: torch.Tensor, hi: torch.Tensor, quant_min: int, quant_max: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) mapping ``[lo, hi]`` (widened to include 0) onto the code range."""
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    if symmetric:
        bound = torch.maximum(lo.abs(), hi)
        scale = torch.clamp(bound / quant_max, min=EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((hi - lo) / (quant_max - quant_min), min=EPS)
        zero_point = torch.clamp(quant_min - torch.round(lo / scale), quant_min, quant_max).to(torch.int32)
    return scale, zero_point


def affine_qparams_scalar(lo: float, hi: float, quant_min: int, quant_max: int,
                          symmetric: bool) -> tuple[float, int]:
    """:func:`affine_qparams` of one per-tensor range, in float32 scalar arithmetic (the same operations in the
    same order, so the same bits) without a dozen tensor operations' dispatch: a quantizer that observes
    every training step pays that per call."""
    f32 = np.float32
    with np.errstate(over="ignore"):
        lo32, hi32 = min(f32(lo), f32(0.0)), max(f32(hi), f32(0.0))
        if symmetric:
            return float(max(max(abs(lo32), hi32) / f32(quant_max), f32(EPS))), 0
        scale = max((hi32 - lo32) / f32(quant_max - quant_min), f32(EPS))
        zero_point = f32(quant_min) - np.rint(lo32 / scale)
        return float(scale), int(min(max(zero_point, f32(quant_min)), f32(quant_max)))


def _quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                         quant_min: int, quant_max: int, with_mask: bool):
    """Per tensor on a dense float32 CPU tensor: one pass of the C++ kernel (same float operations, same
    order). Otherwise torch's chain with one new float tensor, the rest in place: large fresh allocations
    cost page faults on the CPU."""
    if scale.numel() == 1 and (zero_point is None or zero_point.numel() == 1) and native_ready(x):
        kernels = activation_kernels()
        if kernels is not None:
            step = np.float32(scale.item())
            inverse = float(np.float32(1.0) / step)  # torch's 1.0 / scale: a float32 reciprocal
            z = 0.0 if zero_point is None else float(zero_point)
            out, mask = kernels.affine_forward(x, inverse, float(step), z, quant_min, quant_max, with_mask)
            return out, (mask if with_mask else None)
    q = torch.mul(x, 1.0 / scale).round_()
    if zero_point is not None:
        q.add_(zero_point)
    mask = q.ge(quant_min).logical_and_(q.le(quant_max)) if with_mask else None
    q.clamp_(quant_min, quant_max)
    if zero_point is not None:
        q.sub_(zero_point)
    return q.mul_(scale), mask


class _FakeQuantize(torch.autograd.Function):
    """Quantize-dequantize with the clip-STE gradient; the mask is kept as one byte per element."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max):  # type: ignore[override]
        out, mask = _quantize_dequantize(x, scale, zero_point, quant_min, quant_max, with_mask=True)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        kernels = activation_kernels() if native_ready(grad) and grad.stride() == mask.stride() else None
        product = kernels.masked_product(grad, mask) if kernels is not None else grad * mask
        return product, None, None, None, None


def _channel_affine(w, prev_lo, prev_hi, signed_range, unsigned_range, signed_policy, symmetric, with_mask):
    results = activation_kernels().channel_affine_forward(w, prev_lo, prev_hi, list(signed_range),
                                                          list(unsigned_range), signed_policy, symmetric,
                                                          float(EPS), with_mask)
    if not results:
        raise NonFiniteInputError("NaN" if bool(torch.isnan(w).any()) else "infinite")
    return results  # out, mask, lo, hi, scale, zero_point, signed


class _ObservedChannelFakeQuantize(torch.autograd.Function):
    """Per-channel weight observation, parameters and fake-quant in one C++ call (forward), the clip-STE
    gradient (backward). Outputs: the quantized tensor and, not differentiable, the new extremes, scale,
    zero point and signedness."""

    @staticmethod
    def forward(ctx, w, prev_lo, prev_hi, signed_range, unsigned_range, signed_policy, symmetric):  # type: ignore[override]
        out, mask, *params = _channel_affine(w, prev_lo, prev_hi, signed_range, unsigned_range, signed_policy,
                                             symmetric, with_mask=True)
        ctx.save_for_backward(mask)
        ctx.mark_non_differentiable(*params)
        return (out, *params)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        kernels = activation_kernels() if native_ready(grad) and grad.stride() == mask.stride() else None
        product = kernels.masked_product(grad, mask) if kernels is not None else grad * mask
        return product, None, None, None, None, None, None


def observed_channel_fake_quantize(
    w: torch.Tensor, prev_lo: torch.Tensor | None, prev_hi: torch.Tensor | None, bits: int, narrow_range: bool,
    signed_policy: bool | None, symmetric: bool,
) -> tuple[torch.Tensor, ...]:
    """What a per-channel (axis 0) min/max weight quantizer does in a training step (observe the weights,
    derive scale and zero point with :func:`affine_qparams`, :func:`fake_quantize`), as one C++ call with the
    same float32 operations: a ResNet-20 step otherwise runs about 40 small tensor operations per weight.
    ``prev_lo`` / ``prev_hi``: running extremes to merge (``None``: the latest weights alone). Returns
    (quantized, lo, hi, scale, zero_point, signed); raises :class:`NonFiniteInputError` on NaN or inf.
    Needs :func:`activation_kernels` and a contiguous float32 CPU ``w``."""
    empty = torch.empty(0)
    policy = -1 if signed_policy is None else int(bool(signed_policy))
    args = (w, empty if prev_lo is None else prev_lo, empty if prev_hi is None else prev_hi,
            quant_range(bits, True, narrow_range), quant_range(bits, False, narrow_range), policy, symmetric)
    if torch.is_grad_enabled() and w.requires_grad:
        return _ObservedChannelFakeQuantize.apply(*args)
    out, _, *params = _channel_affine(*args, with_mask=False)
    return (out, *params)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    quant_min: int,
    quant_max: int,
    ch_axis: int | None,
) -> torch.Tensor:
    """Quantize-dequantize, bit-identical to ``torch.fake_quantize_per_{tensor,channel}_affine`` (the same
    ``round(x · (1/scale))``, half to even); the gradient is the straight-through estimator masked to the
    values that fall inside ``[quant_min, quant_max]`` after rounding (the "clip STE").

    ``zero_point=None`` means all zero (symmetric quantization) and saves two passes over ``x``. Written
    with elementwise tensor ops rather than torch's fused kernels because those are not vectorised on every
    CPU: on an AVX2 machine the per-tensor kernel took 8× longer than these ops.
    """
    scale = scale.to(x.dtype)
    if zero_point is not None:
        zero_point = zero_point.to(x.dtype)
    if ch_axis is not None:
        shape = [1] * x.dim()
        shape[ch_axis] = -1
        scale = scale.reshape(shape)
        zero_point = None if zero_point is None else zero_point.reshape(shape)
    if torch.is_grad_enabled() and x.requires_grad:
        return _FakeQuantize.apply(x, scale, zero_point, quant_min, quant_max)
    return _quantize_dequantize(x, scale, zero_point, quant_min, quant_max, with_mask=False)[0]
