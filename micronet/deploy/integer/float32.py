"""IEEE float32 rounding reproduced exactly in integer arithmetic.

ONNX Runtime's CPU kernels (MLAS) requantize in float32: ``QLinearConv``/``QGemm`` compute
``round(float(acc) · scale)`` with ``scale = (s_x·s_w)/s_y`` in float32, and ``QLinearAdd`` evaluates
``fma(a, s_a/s_c, fma(b, s_b/s_c, fixed))`` in float32 on the raw codes. Each float32 operation is "the exact
result rounded to 24 significant bits, ties to even", which integers reproduce bit for bit: a float32 is
``m·2^e`` with ``|m| < 2^24``, products and sums of such numbers at a common exponent are exact int64 (or
Python) integers, and rounding to 24 significant bits is a shift. That lets an integer-only program agree with
those kernels on every code instead of all but the ~1e-6 that float32's own rounding error moves across a
rounding boundary.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from micronet.errors import DeployError

SIGNIFICAND_BITS = 24


def bit_length(magnitude: np.ndarray) -> np.ndarray:
    """Bits needed for each non-negative integer (0 for 0), vectorised and exact up to 2^62."""
    magnitude = np.asarray(magnitude)
    if magnitude.dtype == object:
        return np.vectorize(lambda v: int(v).bit_length(), otypes=[np.int64])(magnitude)
    estimate = np.frexp(magnitude.astype(np.float64))[1].astype(np.int64)  # may be one too high near 2^k
    too_high = (estimate > 0) & ((magnitude >> np.maximum(estimate - 1, 0)) == 0)
    return estimate - too_high


def round_shift_to_even(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``round_half_to_even(x / 2^shift)`` for integers ``x`` and ``shift ≥ 0`` (any sign of ``x``)."""
    x = np.asarray(x)
    shift = np.asarray(shift, dtype=np.int64) if x.dtype != object else np.asarray(shift).astype(object)
    one = 1 if x.dtype == object else np.int64(1)
    half = np.where(shift > 0, one << np.maximum(shift - 1, 0), 0)
    parity = (x >> shift) & 1
    return (x + half - (shift > 0) + np.where(shift > 0, parity, 0)) >> shift


def round_to_float32(n: np.ndarray) -> np.ndarray:
    """The integers ``n`` rounded to 24 significant bits, ties to even: ``fl32(n·2^e)/2^e`` for any exponent
    ``e`` of the normal float32 range (the rounding of a float32 operation whose exact result is ``n·2^e``)."""
    n = np.asarray(n)
    magnitude = np.abs(n)
    drop = np.maximum(bit_length(magnitude) - SIGNIFICAND_BITS, 0)
    if n.dtype != object:
        drop = drop.astype(np.int64)
    rounded = round_shift_to_even(magnitude, drop) << drop
    return np.where(n < 0, -rounded, rounded)


def float32_parts(value: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact decomposition of float32 values into ``(m, e)`` with ``value = m·2^e``, ``|m| < 2^24`` (int64)."""
    value = np.asarray(value, dtype=np.float32)
    if not np.all(np.isfinite(value)):
        raise DeployError(f"float32 value {value.ravel()[:4]} is not finite: check the graph's scales")
    fraction, exponent = np.frexp(value)  # fraction in [0.5, 1): 24 bits of it are an integer
    mantissa = (fraction.astype(np.float64) * 2.0**SIGNIFICAND_BITS).astype(np.int64)
    return mantissa, exponent.astype(np.int64) - SIGNIFICAND_BITS


def fraction_to_float32(value: Fraction) -> np.float32:
    """An exact rational rounded once to the nearest float32, ties to even (``float(value)`` would round
    twice: to float64, then to float32)."""
    if value == 0:
        return np.float32(0.0)
    magnitude = abs(value)
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:
        exponent -= 1  # now 2^exponent ≤ |value| < 2^(exponent+1)
    unit = Fraction(2) ** (exponent - SIGNIFICAND_BITS + 1)
    mantissa = round(magnitude / unit)  # Python rounds Fractions half to even
    result = np.float32(float(mantissa * unit))  # ≤ 25 significant bits: exact in float64, exact in float32
    return -result if value < 0 else result


# ------------------------------------------------------------------------------------------ MLAS requantization
def float32_multiplier(scale: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A positive float32 requantization scale as ``(m, shift)``: ``scale = m·2^-shift`` exactly, m < 2^24."""
    scale = np.asarray(scale, dtype=np.float32)
    if np.any(scale <= 0) or np.any(scale >= np.float32(2.0**30)):
        raise DeployError(f"requantization scale {scale.ravel()[:4]} is outside (0, 2^30): check the graph's scales")
    mantissa, exponent = float32_parts(scale)
    return mantissa.astype(np.int32), (-exponent).astype(np.int32)


def multiply_float32(acc: np.ndarray, m: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """MLAS's requantization of an int32 accumulator, in integers: ``round_half_to_even(fl32(fl32(acc)·scale))``
    with ``scale = m·2^-shift`` (from :func:`float32_multiplier`; broadcast against ``acc``), saturated to int32."""
    acc = round_to_float32(np.asarray(acc, dtype=np.int64))  # float(acc): exact below 2^24
    product = round_to_float32(acc * np.asarray(m, dtype=np.int64))  # |acc| ≤ 2^31, m < 2^24: fits int64
    shift = np.asarray(shift, dtype=np.int64)
    right = round_shift_to_even(product, np.maximum(shift, 0))
    result = right << np.maximum(-shift, 0)
    return np.clip(result, -(2**31), 2**31 - 1)


def qlinear_add_parameters(scale_a: float, zero_a: int, scale_b: float, zero_b: int, scale_c: float,
                           zero_c: int) -> dict[str, np.float32]:
    """The float32 constants of MLAS's ``QLinearAdd`` kernel: ``ratio_a = s_a/s_c``, ``ratio_b = s_b/s_c`` and
    ``fixed = z_c − fma(z_a, ratio_a, ratio_b·z_b)``, each rounded to float32 as the compiled kernel does."""
    f32 = np.float32
    ratio_a, ratio_b = f32(f32(scale_a) / f32(scale_c)), f32(f32(scale_b) / f32(scale_c))
    zero_part = f32(ratio_b * f32(zero_b))
    fused = fraction_to_float32(Fraction(int(zero_a)) * Fraction(float(ratio_a)) + Fraction(float(zero_part)))
    return {"ratio_a": ratio_a, "ratio_b": ratio_b, "fixed": f32(f32(zero_c) - fused)}


def qlinear_add(a: np.ndarray, b: np.ndarray, ratio_a: float, ratio_b: float, fixed: float) -> np.ndarray:
    """MLAS's float ``QLinearAdd`` in integers: ``round_half_to_even(fma(a, ratio_a, fma(b, ratio_b, fixed)))``
    on the raw codes ``a``, ``b`` (the zero points live in ``fixed``); saturate to the output type afterwards."""
    terms = [(int(m), int(e)) for m, e in (float32_parts(v) for v in (ratio_a, ratio_b, fixed))]
    base = min((e for m, e in terms if m != 0), default=0)  # the common exponent of all exact intermediates
    (m_a, e_a), (m_b, e_b), (m_f, e_f) = ((m, e - base if m != 0 else 0) for m, e in terms)
    span = max(e_a, e_b, e_f) + SIGNIFICAND_BITS + 8 + 2  # bits of the largest exact intermediate
    dtype = np.int64 if span < 62 else object  # Python integers when the exponents are far apart
    a, b = np.asarray(a).astype(np.int64).astype(dtype), np.asarray(b).astype(np.int64).astype(dtype)
    inner = round_to_float32(b * (m_b << e_b) + (m_f << e_f))
    total = round_to_float32(a * (m_a << e_a) + inner)
    if base >= 0:
        return (total << base).astype(np.int64)
    return round_shift_to_even(total, np.full(total.shape, -base, dtype=np.int64 if dtype is np.int64 else object)
                               ).astype(np.int64)
