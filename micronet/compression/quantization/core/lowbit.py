"""Low-bit quantizer families: binary, ternary and DoReFa weights; DoReFa, sign and float activations.

They are configurations of the same :class:`~micronet.compression.quantization.core.quantizers.Quantizer`
mechanism as the affine integer quantizers: each is registered with
:func:`~micronet.compression.quantization.core.scheme.register_quantizer_family` and placed by ``prepare``.
None of them has an observer: their parameters (α, Δ, the tanh maximum) are recomputed from the tensor on
every call, so ``observe`` stays a no-op and the modes only matter for the ``enabled`` switch.

Weight families produce integer codes: ``quantize(w)`` is computed as ``(codes − zero_point) · scale`` with
the very tensors :meth:`weight_codes` returns, so unpacking the codes reproduces the fake-quantized weight
bit for bit.

=========  =====  =====================  ==========  ==========  ========================================
family     bits   codes                  zero point  scale       output
=========  =====  =====================  ==========  ==========  ========================================
binary     1      {0, 1}                 0.5         2α          ±α, α = mean|W| per channel
ternary    2      {0, 1, 2}              1           α           {−α, 0, +α}, Δ = 0.7·mean|W| per channel
dorefa     k ≥ 2  0 … n (n = 2^k − 1)    n/2         2/n         n + 1 levels in [−1, 1]
dorefa     1      {0, 1}                 0.5         2·E|W|      ±E|W| (DoReFa's 1-bit weights)
=========  =====  =====================  ==========  ==========  ========================================

Activation families: ``dorefa_activation`` (k = 1..16 bits, values on {0, 1/n, …, 1}), ``sign`` (1 bit, ±1)
and ``float`` (32 bits: the identity, for "A = 32" / "W = 32").

Decisions (where they differ from the original micronet):

* sign(0) = +1 everywhere (weights and activations), so binary values are exactly two levels;
* ternary: |W| = Δ counts as 0 and is excluded from α (the original gave ±1 there but excluded it from α);
  a channel with every |W| ≤ Δ (only an all-zero channel) gets α = 0 instead of 0/0;
* rounding is half-to-even (``torch.round``, as ONNX and the affine quantizers); the original's
  half-away-from-zero is available as ``options={"rounding": "half_away"}``;
* binary ``center`` / ``clip`` (the original's W_clip) are differentiable out-of-place operations on a copy:
  the float weights the optimizer holds are never edited, and the clamp's gradient mask replaces the
  in-place clipping of the latent weights;
* straight-through estimators: identity through sign, ternarization and rounding (α stays differentiable);
  DoReFa activations pass the gradient (× ``pre_scale``) where the clamp is inactive; sign activations use
  the hardtanh mask (gradient only where |x| < 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from micronet.compression.quantization.core.native import activation_kernels, native_ready
from micronet.compression.quantization.core.quantizers import ActivationGrid, Quantizer, WeightCodes
from micronet.errors import QuantizationError

ROUNDING_MODES = ("half_even", "half_away")
TERNARY_THRESHOLD = 0.7  # Δ = 0.7 · mean|W| (Li & Liu, Ternary Weight Networks)


# ------------------------------------------------------------------------------------------ STEs
def sign_and_mask(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign(x) with sign(0) = +1, the bool mask |x| < 1): one pass of the C++ kernel where it is built and x
    is a dense float32 CPU tensor, else torch's four passes; the values are identical."""
    kernels = activation_kernels() if native_ready(x) else None
    if kernels is not None:
        out, inside = kernels.sign_forward(x)
        return out, inside
    return _sign(x), x.abs() < 1


class _SignSTE(torch.autograd.Function):
    """sign(x) with sign(0) = +1; gradient passed where |x| < 1 and zeroed outside (hardtanh STE).

    Saves the 1-byte mask |x| < 1 rather than x, so x's float storage can be freed; the forward is one pass
    (:func:`sign_and_mask`), the backward one ``where``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out, inside = sign_and_mask(x)
        ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0)


class _ApproxSignSTE(torch.autograd.Function):
    """sign(x) with sign(0) = +1; gradient × max(0, 2 − 2|x|), the derivative of Bi-Real Net's piecewise
    quadratic approximation of sign (ApproxSign): closer to sign's impulse than hardtanh's box."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(torch.clamp(2 - 2 * x.abs(), min=0.0))
        return _sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return grad * slope


class _IdentitySTE(torch.autograd.Function):
    """Forward ``fn(x)`` (a piecewise-constant map), backward the identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


class _ClampRoundSTE(torch.autograd.Function):
    """DoReFa's activation in one node: round(clamp(x·pre_scale, 0, 1)·n) / n.

    Forward and backward are one pass each of the C++ kernel where it is built and the tensors are dense
    float32 on the CPU; otherwise forward works in place on one fresh tensor and saves the 1-byte mask of the
    clamp's linear range, and backward repeats autograd's chain of the unfused expression operation by
    operation (÷n, ×n, mask, ×pre_scale). Both paths give values and gradients bit-identical to it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, pre_scale: float, levels: int, rounding: str) -> torch.Tensor:  # type: ignore[override]
        ctx.pre_scale, ctx.levels = pre_scale, levels
        kernels = activation_kernels() if native_ready(x) else None
        if kernels is not None:
            out, inside = kernels.clamp_round_forward(x, pre_scale, levels, rounding == "half_away")
            ctx.save_for_backward(inside)
            return out
        scaled = x * pre_scale
        clipped = torch.clamp(scaled, 0.0, 1.0)
        ctx.save_for_backward(clipped == scaled)  # inside [0, 1] (NaN: outside, as clamp's own backward)
        return _rounding(rounding)(clipped.mul_(levels)).div_(levels)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        kernels = activation_kernels() if native_ready(grad) and grad.stride() == inside.stride() else None
        if kernels is not None:
            return kernels.clamp_round_backward(grad, inside, ctx.pre_scale, ctx.levels), None, None, None
        through = (grad / ctx.levels).mul_(ctx.levels)
        return torch.where(inside, through, 0.0).mul_(ctx.pre_scale), None, None, None


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Binary activation: values exactly {−1, +1} (0 → +1), hardtanh straight-through gradient."""
    return _SignSTE.apply(x)


def approx_sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Binary activation: values exactly {−1, +1} (0 → +1), ApproxSign gradient max(0, 2 − 2|x|)."""
    return _ApproxSignSTE.apply(x)


SIGN_GRADIENTS = ("hardtanh", "approx")


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """The original DoReFa rounding: ties go away from zero (2.5 → 3, −2.5 → −3)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _rounding(mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if mode not in ROUNDING_MODES:
        raise QuantizationError(f"unknown rounding {mode!r}: choose one of {', '.join(ROUNDING_MODES)}")
    return torch.round if mode == "half_even" else round_half_away


# ------------------------------------------------------------------------------------------ helpers
def _reduce_dims(x: torch.Tensor, ch_axis: int | None) -> tuple[int, ...]:
    """Every dimension but the channel axis (all of them for one value per tensor)."""
    return tuple(d for d in range(x.dim()) if d != ch_axis)


def _channel_mean(x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    """Mean per channel, shaped to broadcast against ``x`` ((1, C, 1, 1) for axis 1; 0-dim per tensor)."""
    return x.mean() if ch_axis is None else x.mean(dim=_reduce_dims(x, ch_axis), keepdim=True)


def _channel_sum(x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    return x.sum() if ch_axis is None else x.sum(dim=_reduce_dims(x, ch_axis), keepdim=True)


def _channel_max(x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    return x.max() if ch_axis is None else x.amax(dim=_reduce_dims(x, ch_axis), keepdim=True)


def _input_axis(ch_axis: int | None) -> int:
    """The input-channel axis of a weight: the other of dims 0 and 1 (dim 1 when there is no channel axis)."""
    return 0 if ch_axis == 1 else 1


def _check_bits(family: str, bits: int, allowed: range | tuple[int, ...], meaning: str) -> int:
    if int(bits) not in allowed:
        raise QuantizationError(f"{family} quantizers take {meaning} (got bits={bits})")
    return int(bits)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def on_half_grid(alpha: torch.Tensor) -> torch.Tensor:
    """α rounded to the nearest float16 value (straight-through gradient), so a packed artifact stores it
    in 2 bytes exactly: with 1-bit codes a float32 α per channel would add 25 % to a grouped layer's size.
    The relative change, ≤ 2⁻¹¹, is far below the binarization error. Values beyond float16's range are
    left as they are."""
    rounded = alpha.detach().to(torch.float16).to(alpha.dtype)
    rounded = torch.where(torch.isfinite(rounded), rounded, alpha.detach())
    return alpha + (rounded - alpha.detach())


def _binary_codes(w: torch.Tensor, ch_axis: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sign(w)·α as codes {0, 1}, zero point 0.5, scale 2α with α = mean|w| (per channel or per tensor).

    The codes are (sign + 1)/2 so that the identity STE through sign gives ∂output/∂w = α.
    """
    alpha = on_half_grid(_channel_mean(w.abs(), ch_axis))
    codes = (_IdentitySTE.apply(w, _sign) + 1) / 2
    return codes, _scalar(0.5, w), 2 * alpha


# ------------------------------------------------------------------------------------------ weights
class LowBitWeightQuantizer(Quantizer):
    """Weight families: subclasses return ``(codes, zero_point, scale)`` from :meth:`encode`; the output is
    ``(codes − zero_point) · scale``, the formula :class:`WeightCodes` dequantizes with."""

    def __init__(self, bits: int, ch_axis: int | None = None) -> None:
        super().__init__(bits)
        self.ch_axis = ch_axis

    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        codes, zero_point, scale = self.encode(x)
        return (codes - zero_point) * scale

    @torch.no_grad()
    def weight_codes(self, w: torch.Tensor) -> WeightCodes:
        codes, zero_point, scale = self.encode(w)
        return WeightCodes(codes.to(torch.int64), int(self.bits), scale, zero_point)

    def value_grid(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(zero point, scale)`` of weights that already hold this family's quantized values."""
        raise NotImplementedError

    @torch.no_grad()
    def codes_of_values(self, values: torch.Tensor) -> WeightCodes:
        """The codes of weights that already hold this family's quantized values (after ``convert``, which
        stores them and switches the quantizer off). Encoding them again is not the identity for every
        family (DoReFa's tanh, binary centring), so the codes are read off the values' own grid; a weight
        not on that grid gives codes that do not reproduce it, which callers check."""
        zero_point, scale = self.value_grid(values)
        codes = torch.round(values / scale.clamp(min=torch.finfo(values.dtype).tiny) + zero_point)
        return WeightCodes(codes.to(torch.int64), int(self.bits), scale, zero_point)

    def extra_repr(self) -> str:
        return f"bits={int(self.bits)}, ch_axis={self.ch_axis}"


def _binary_value_grid(values: torch.Tensor, ch_axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """±α: zero point ½, scale 2α, α the largest magnitude per channel."""
    return _scalar(0.5, values), 2 * _channel_max(values.abs(), ch_axis)


class BinaryWeightQuantizer(LowBitWeightQuantizer):
    """±α per output channel, α = mean|W| (XNOR-Net / BWN).

    ``center`` subtracts the mean over the input-channel axis and ``clip`` clamps to [−1, 1] before the
    sign and α are taken — the original's W_clip, here on a copy (the float weights are untouched).
    Filters with a single input channel (depthwise convs) are not centred: centring would zero them.
    """

    def __init__(self, ch_axis: int | None = None, *, center: bool = False, clip: bool = False) -> None:
        super().__init__(1, ch_axis)
        self.center = center
        self.clip = clip

    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        axis = _input_axis(self.ch_axis)
        if self.center and w.dim() > 1 and w.shape[axis] > 1:
            w = w - w.mean(dim=axis, keepdim=True)
        if self.clip:
            w = torch.clamp(w, -1.0, 1.0)
        return _binary_codes(w, self.ch_axis)

    def value_grid(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _binary_value_grid(values, self.ch_axis)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, center={self.center}, clip={self.clip}"


def _ternary(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """+1 above Δ, −1 below −Δ, 0 in between (|w| = Δ → 0, consistent with α's strict |w| > Δ)."""
    return (w > delta).to(w.dtype) - (w < -delta).to(w.dtype)


class TernaryWeightQuantizer(LowBitWeightQuantizer):
    """{−α, 0, +α} per output channel: Δ = 0.7·mean|W|, α = mean of |W| over |W| > Δ (TWN).

    Δ is not differentiable (it only decides the mask); α is.
    """

    def __init__(self, ch_axis: int | None = None) -> None:
        super().__init__(2, ch_axis)

    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        magnitude = w.abs()
        delta = TERNARY_THRESHOLD * _channel_mean(magnitude.detach(), self.ch_axis)
        above = (magnitude > delta).to(w.dtype)
        alpha = on_half_grid(_channel_sum(magnitude * above, self.ch_axis) / _channel_sum(above, self.ch_axis).clamp(min=1))
        ternary = _IdentitySTE.apply(w, lambda v: _ternary(v, delta))
        return ternary + 1, _scalar(1.0, w), alpha

    def value_grid(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """{−α, 0, α}: zero point 1, scale α, the largest magnitude per channel."""
        return _scalar(1.0, values), _channel_max(values.abs(), self.ch_axis)


class DoReFaWeightQuantizer(LowBitWeightQuantizer):
    """k ≥ 2: t = tanh(W), u = t / (2·max|t|) + 0.5, codes round(u·n) with n = 2^k − 1, output
    (codes − n/2)·(2/n) ∈ [−1, 1]; the maximum is per tensor (per channel when ``ch_axis`` is set) and
    differentiable, as in DoReFa. k = 1: sign(W)·E|W| (the paper's binary weights)."""

    def __init__(self, bits: int, ch_axis: int | None = None, *, rounding: str = "half_even") -> None:
        super().__init__(_check_bits("dorefa", bits, range(1, 17), "1 to 16 bits"), ch_axis)
        self.rounding = rounding
        self._round = _rounding(rounding)

    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bits = int(self.bits)
        if bits == 1:
            return _binary_codes(w, self.ch_axis)
        levels = 2**bits - 1
        t = torch.tanh(w)
        peak = _channel_max(t.abs(), self.ch_axis)
        u = t / (2 * peak.clamp(min=torch.finfo(t.dtype).tiny)) + 0.5
        codes = _IdentitySTE.apply(u * levels, self._round)
        return codes, _scalar(levels / 2, w), _scalar(2 / levels, w)

    def value_grid(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k ≥ 2: the fixed grid (zero point n/2, scale 2/n); k = 1: ±α as binary weights."""
        bits = int(self.bits)
        if bits == 1:
            return _binary_value_grid(values, self.ch_axis)
        levels = 2**bits - 1
        return _scalar(levels / 2, values), _scalar(2 / levels, values)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rounding={self.rounding}"


# ------------------------------------------------------------------------------------------ activations
class DoReFaActivationQuantizer(Quantizer):
    """clamp(x·pre_scale, 0, 1) on the k-bit grid {0, 1/n, …, 1}, n = 2^k − 1.

    ``pre_scale`` = 1 clips at 1; the original used 0.1 (a clip at 10) and did not scale back, so layers
    after it saw activations 10× smaller. Gradient: ``pre_scale`` where 0 ≤ x·pre_scale ≤ 1, else 0.
    """

    def __init__(self, bits: int, *, pre_scale: float = 1.0, rounding: str = "half_even") -> None:
        super().__init__(_check_bits("dorefa", bits, range(1, 17), "1 to 16 bits"))
        if not float(pre_scale) > 0:
            raise QuantizationError(f"dorefa pre_scale must be positive (got {pre_scale}); the original used 0.1")
        self.pre_scale = float(pre_scale)
        self.rounding = rounding
        self._round = _rounding(rounding)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return _ClampRoundSTE.apply(x, self.pre_scale, 2 ** int(self.bits) - 1, self.rounding)

    def activation_grid(self) -> ActivationGrid:
        """Codes round(x·p·n) clipped to 0..n, read at 1/n."""
        levels = 2 ** int(self.bits) - 1
        return ActivationGrid("codes", 1.0 / (self.pre_scale * levels), 0, 0, levels, read_scale=1.0 / levels,
                              bits=int(self.bits))

    def extra_repr(self) -> str:
        return f"bits={int(self.bits)}, pre_scale={self.pre_scale}, rounding={self.rounding}"


class SignActivation(Quantizer):
    """Binary activation ±1 (sign(0) = +1). ``prepare`` puts it in place of the ReLUs in front of
    binarized layers: a ReLU followed by a sign would make every activation +1.

    ``gradient``: ``"hardtanh"`` (default) passes the gradient where |x| < 1; ``"approx"`` scales it by
    max(0, 2 − 2|x|) (Bi-Real Net's ApproxSign). Only training differs: the forward values are the same.
    """

    def __init__(self, gradient: str = "hardtanh") -> None:
        super().__init__(1)
        if gradient not in SIGN_GRADIENTS:
            raise QuantizationError(f"unknown sign gradient {gradient!r}: choose one of {', '.join(SIGN_GRADIENTS)}")
        self.gradient = gradient

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return sign_ste(x) if self.gradient == "hardtanh" else approx_sign_ste(x)

    def activation_grid(self) -> ActivationGrid:
        return ActivationGrid("sign", bits=1)

    def extra_repr(self) -> str:
        return "" if self.gradient == "hardtanh" else f"gradient={self.gradient}"


class FloatQuantizer(Quantizer):
    """Identity ("32 bits"): keeps a tensor in float inside an otherwise quantized scheme."""

    def __init__(self) -> None:
        super().__init__(32)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def activation_grid(self) -> ActivationGrid:
        return ActivationGrid("float", bits=32)


# ------------------------------------------------------------------------------------------ registration
def _options(spec: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    unknown = set(spec.options) - set(allowed)
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise QuantizationError(
            f"{spec.family} quantizers have no option {', '.join(sorted(unknown))} (accepted: {accepted})"
        )
    return dict(spec.options)


def _build_binary(spec: Any, ch_axis: int | None, num_channels: int | None) -> Quantizer:
    _check_bits("binary", spec.bits, (1,), "1 bit (codes {0, 1}): set bits=1")
    return BinaryWeightQuantizer(ch_axis, **_options(spec, ("center", "clip")))


def _build_ternary(spec: Any, ch_axis: int | None, num_channels: int | None) -> Quantizer:
    _check_bits("ternary", spec.bits, (2,), "2 bits (codes {0, 1, 2}): set bits=2")
    _options(spec, ())
    return TernaryWeightQuantizer(ch_axis)


def _build_dorefa(spec: Any, ch_axis: int | None, num_channels: int | None) -> Quantizer:
    return DoReFaWeightQuantizer(spec.bits, ch_axis, **_options(spec, ("rounding",)))


def _build_dorefa_activation(spec: Any, ch_axis: int | None, num_channels: int | None) -> Quantizer:
    return DoReFaActivationQuantizer(spec.bits, **_options(spec, ("pre_scale", "rounding")))


def _build_sign(spec: Any, ch_axis: int | None, num_channels: int | None) -> Quantizer:
    _check_bits("sign", spec.bits, (1,), "1 bit (values ±1): set bits=1")
    return SignActivation(**_options(spec, ("gradient",)))


def _build_float(spec: Any, ch_axis: int | None, num_channels: int | None) -> Quantizer:
    _check_bits("float", spec.bits, (32,), "32 bits (they keep the tensor in float): set bits=32")
    _options(spec, ())
    return FloatQuantizer()


FAMILIES: dict[str, Callable[[Any, "int | None", "int | None"], Quantizer]] = {
    "binary": _build_binary,
    "ternary": _build_ternary,
    "dorefa": _build_dorefa,
    "dorefa_activation": _build_dorefa_activation,
    "sign": _build_sign,
    "float": _build_float,
}
