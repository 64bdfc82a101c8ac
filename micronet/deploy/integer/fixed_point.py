"""Fixed-point requantization (Jacob et al. 2018 / gemmlowp) and code comparison."""

from __future__ import annotations

import numpy as np

from micronet.deploy.integer.float32 import multiply_float32
from micronet.errors import DeployError

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
ROUNDINGS = ("single", "gemmlowp", "onnxruntime")
ADD_LEFT_SHIFT = 20  # TFLite's guard bits for 8-bit ADD: (255 << 20) · 2 still fits int32
FORMAT, FORMAT_VERSION = "micronet-integer-program", 1
PROGRAM_JSON, PARAMETERS_FILE = "program.json", "parameters.safetensors"


# ------------------------------------------------------------------------------------------ fixed point
def quantize_multiplier(real: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decompose M > 0 into ``(M0, shift)`` with ``M ≈ M0 · 2^-31 · 2^-shift`` and M0 in [2^30, 2^31).

    ``shift`` is a right shift (negative for M ≥ 1). Multipliers below 2^-32 cannot move any int32
    accumulator past 0.5, so they become ``(0, 0)``: the exact result rounds to 0 as well.
    """
    m = np.asarray(real, dtype=np.float64)
    if not np.all(np.isfinite(m)) or np.any(m < 0) or np.any(m >= 2.0**30):
        raise DeployError(f"requantization multiplier {m.ravel()[:4]} is outside [0, 2^30): check the graph's scales")
    fraction, exponent = np.frexp(m)  # m = fraction · 2^exponent, fraction in [0.5, 1)
    m0 = np.rint(fraction * 2.0**31).astype(np.int64)
    carry = m0 == 2**31  # fraction rounded up to 1.0
    m0 = np.where(carry, 2**30, m0)
    shift = -(exponent.astype(np.int64) + carry)
    negligible = m < 2.0**-32
    return np.where(negligible, 0, m0).astype(np.int32), np.where(negligible, 0, shift).astype(np.int32)


def _saturate_int32(x: np.ndarray) -> np.ndarray:
    return np.clip(x, INT32_MIN, INT32_MAX)


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """gemmlowp's SRDHM: ``a·b / 2^31`` rounded to nearest with ties up (gemmlowp's nudge-and-truncate),
    saturated to int32 (of int32 inputs, only ``a = b = INT32_MIN`` saturates). A wider ``a`` (a left-shifted
    accumulator) is multiplied exactly, so a result beyond int32 saturates instead of wrapping."""
    a64, b64 = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if int(np.abs(a64).max(initial=0)) * int(np.abs(b64).max(initial=0)) >= 2**62:
        a64, b64 = a64.astype(object), b64.astype(object)  # exact Python integers
    product = a64 * b64
    nudged = product + np.where(product >= 0, 1 << 30, 1 - (1 << 30))
    high = np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))  # C division truncates toward zero
    return np.minimum(np.maximum(high, INT32_MIN), INT32_MAX).astype(np.int64)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """gemmlowp's RoundingDivideByPOT: ``x / 2^exponent`` rounded to nearest, ties away from zero (exponent ≥ 0)."""
    x64, e = np.asarray(x, dtype=np.int64), np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = x64 & mask
    threshold = (mask >> 1) + (x64 < 0)
    return (x64 >> e) + (remainder > threshold)


def _shift_right_to_even(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``round_half_to_even(x / 2^shift)`` for shift ≥ 1: floor((x + 2^(shift-1) − 1 + parity) / 2^shift), where
    parity is that of floor(x / 2^shift), so exact halves go to the even neighbour."""
    parity = (x >> shift) & 1
    return (x + (np.int64(1) << (shift - 1)) - 1 + parity) >> shift


def multiply_by_quantized_multiplier(acc: np.ndarray, m0: np.ndarray, shift: np.ndarray,
                                     rounding: str = "single") -> np.ndarray:
    """``acc · M0 · 2^-(31+shift)`` rounded to an integer and saturated to int32: ``"single"`` rounds the exact
    product once, ties to even; ``"gemmlowp"`` rounds twice as gemmlowp does; ``"onnxruntime"`` takes a float32
    scale ``m0·2^-shift`` and rounds as ONNX Runtime's float32 requantization (see the package docstring for
    what each guarantees). ``m0``/``shift`` broadcast against ``acc``."""
    acc64 = np.asarray(acc, dtype=np.int64)
    m0, shift = np.asarray(m0, dtype=np.int64), np.asarray(shift, dtype=np.int64)
    if rounding == "single":
        total = 31 + shift  # ≥ 1 because M < 2^30
        product = acc64 * m0  # |acc| ≤ 2^31, M0 < 2^31: fits int64
        return _saturate_int32(_shift_right_to_even(product, total))
    if rounding == "onnxruntime":  # (m0, shift) from float32_multiplier: MLAS's float32 requantization
        return multiply_float32(acc64, m0, shift)
    if rounding == "gemmlowp":
        shifted = acc64 << np.maximum(-shift, 0)  # M ≥ 1: left shift first (exact in int64)
        return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, m0), np.maximum(shift, 0))
    raise DeployError(f"unknown rounding {rounding!r}: choose one of {', '.join(ROUNDINGS)}")


def divide_by_count(acc: np.ndarray, m0: np.ndarray, shift: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``acc · M0 / (count · 2^(31+shift))`` rounded half to even, exactly: the requantization of a pooled
    sum by ``M / count`` with one integer division (a window count is only known once the input shape is).
    Exact ties are common here (an even count with equal input and output scales), and ONNX's
    QuantizeLinear sends them to even. Falls back to Python integers should the divisor exceed int64."""
    numerator = np.asarray(acc, dtype=np.int64) * np.asarray(m0, dtype=np.int64)
    count = np.asarray(count, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if np.log2(max(int(count.max(initial=1)), 1)) + 31 + int(shift.max(initial=0)) > 61:
        numerator, count, shift = (np.asarray(a).astype(object) for a in (numerator, count, shift))
    divisor = count * (np.ones_like(shift) << (31 + shift))
    quotient, remainder = numerator // divisor, numerator % divisor  # floor division: remainder ≥ 0
    up = (2 * remainder > divisor) | ((2 * remainder == divisor) & (quotient % 2 == 1))
    return _saturate_int32((quotient + up).astype(np.int64))


def compare_codes(a: np.ndarray, b: np.ndarray) -> dict[str, float | int]:
    """Agreement of two integer code tensors: ``identical_fraction``, ``max_abs_diff`` (codes),
    ``off_by_one`` (fraction of elements differing by exactly one) and ``elements``."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise DeployError(f"cannot compare codes of shapes {a.shape} and {b.shape}: pass outputs of the same input")
    diff = np.abs(a.astype(np.int64) - b.astype(np.int64))
    return {"identical_fraction": float((diff == 0).mean()) if diff.size else 1.0,
            "max_abs_diff": int(diff.max()) if diff.size else 0,
            "off_by_one": float((diff == 1).mean()) if diff.size else 0.0,
            "elements": int(diff.size)}


