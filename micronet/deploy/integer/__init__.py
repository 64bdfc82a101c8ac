"""Integer-only reference inference of a QDQ ONNX graph (Jacob et al. 2018, gemmlowp fixed point).

A QDQ graph describes an integer network in float clothing: ``DequantizeLinear(codes) → float op →
QuantizeLinear`` means "compute this op on integer codes and requantize". :class:`IntegerModel` compiles
such a graph into a list of integer steps and runs them with numpy/torch on int8/uint8 codes and int32
accumulators. Float arithmetic touches data only at the boundary: the ``QuantizeLinear`` of a graph input
and the dequantization of a graph output. Everything between is integer:

* Conv / Gemm / MatMul: ``acc = Σ (x_q − z_x)·(w_q − z_w) + bias_q`` (int32), then requantization by the
  fixed-point multiplier ``M = s_x·s_w / s_y = M0 · 2^-31 · 2^-shift`` (M0 a Q31 int32 in [2^30, 2^31),
  one per output channel for per-channel weights), ``y_q = saturate(z_y + requant(acc))``.
  The sum is computed by torch's float64 convolution/matmul on integer-valued tensors. This is exact: every
  product is an integer of magnitude ≤ 255·255 and every partial sum is an integer bounded by the
  per-channel worst case ``Σ|w_q − z_w| · max|x_q − z_x|``, which compilation checks to be < 2^31 (the int32
  accumulator of an integer runtime), far below 2^53; float64 represents all such integers exactly, so the
  result does not depend on the summation order or on FMA use. (torch has no integer convolution on
  CPU; the tests check this path against the direct int64 definition.)
* Bias: an int32 ``DequantizeLinear`` bias whose scale equals ``s_x·s_w`` to float32 precision is used
  as it is (what ONNX Runtime and TensorRT do); any other bias (another scale, or a float initializer) is
  quantized once at compile time to ``round_half_even(b / (s_x·s_w))``, which adds at most 0.5 units of
  the accumulator.
* Relu / Clip: exact on codes, because quantization is monotone: ``Q(clip(v, lo, hi)) =
  clamp(Q(v), Q(lo), Q(hi))``. A Relu right before a ``QuantizeLinear`` whose zero point is ``qmin`` is
  therefore implicit (the saturation already clamps at ``z_y``); otherwise it is ``max(y_q, z_y)``.
* MaxPool, Flatten, Reshape, Transpose, (Un)Squeeze, Identity, Concat of equal parameters: on codes.
* Add: TFLite's integer ADD (both inputs shifted left by 20 bits and rescaled to ``2·max(s_a, s_b)`` by
  fixed-point multipliers, summed in int32, then requantized to ``s_y``). The 20 guard bits make it one
  rounding to within 2^-20 of an output step, so it agrees with ONNX Runtime's float ``QLinearAdd`` except
  where the exact result lies within ~1e-5 step of a rounding boundary (off by one there).
* AveragePool / GlobalAveragePool: integer window sum of ``x_q − z_x`` (int32), then requantization by
  ``M / count`` with ``M = s_x / s_y`` as (M0, shift): ``round(sum·M0 / (count·2^(31+shift)))`` by one
  exact integer division (:func:`divide_by_count`), because the count is only known once the input shape
  is (dynamic-batch exports compute reshapes at run time, so static shapes are not available). ONNX
  Runtime's QLinear(Global)AveragePool rounds a float32 product instead; they differ only at near-ties.
* QuantizeLinear of a dequantized tensor (Q→DQ→Q chains, or Q after MaxPool/Flatten with other
  parameters): requantization with ``M = s_in / s_out``; equal parameters pass codes through.

Rounding (what :func:`multiply_by_quantized_multiplier` guarantees): ``M0`` and ``shift`` come from M
computed in float64 from the graph's float32 scales, so ``|M0·2^-(31+shift) − M| ≤ 2^-31·M``.

* ``rounding="single"`` (default): one rounding of the exact int64 product, ``round_half_to_even(acc·M0 /
  2^(31+shift))``, the tie rule of ONNX's QuantizeLinear (TFLite's single-rounding mode and CMSIS-NN also
  round once, with ties up). It equals ``round(acc·M)`` except where ``acc·M`` lies within
  ``|acc|·M·2^-31`` of a half-integer, where it may differ by one.
* ``rounding="gemmlowp"``: ``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc, M0), shift)``
  exactly as gemmlowp (ties up in the first, away from zero in the second). The high multiply rounds to
  ``shift`` fractional bits first, so the result is also off by one where ``acc·M`` lies within
  ``2^-(shift+1)`` of a half-integer: about 1 code in 2^(shift+1), ~0.4% for typical conv multipliers
  (shift ≈ 7), and those differences propagate through later layers.
* ``rounding="onnxruntime"``: the float32 arithmetic of ONNX Runtime's x86 kernels, reproduced bit for bit
  with integer operations (:mod:`micronet.deploy.integer.float32`). A Conv/Gemm/MatMul requantization is
  ``round_half_even(fl32(fl32(acc) · scale))`` with ``scale = fl32(fl32(s_x·s_w) / s_y)`` stored as a 24-bit
  mantissa and a shift (QLinearConv, QGemm), and an Add that only a QuantizeLinear reads (possibly through a
  Relu the output zero point makes redundant) is ONNX Runtime's QLinearAdd,
  ``round(fma(a_q, s_a/s_c, fma(b_q, s_b/s_c, z_c − fma(z_a, s_a/s_c, z_b·s_b/s_c))))``. Other
  requantizations (pooling, Q→DQ→Q) keep the exact rounding. Use it to check a deployment on ONNX Runtime
  code for code; ``"single"`` is the better integer reference for devices that round exactly.
* Pooled sums are always divided exactly (:func:`divide_by_count`, ties to even): with equal input and
  output scales and an even window count, exact ties are frequent.

Agreement with ONNX Runtime 1.32 (QLinearConv, QLinearAdd, QGemm, QLinear(Global)AveragePool, QLinearConcat;
MLAS requantizes in float32 with ties to even), measured on NIN, NIN-GC, ResNet-20 and a small CNN quantized by
``quantize_static`` and on micronet's NIN and ResNet-20 exports, 64 Fashion-MNIST images:

* ``"onnxruntime"``: every code of every layer identical, end to end.
* ``"single"``: fed the same input codes, each layer agrees on all but ~1e-6 of its codes — values that
  float32's 2^-24 relative error moves across a rounding boundary, where this reference is the exact one. End
  to end those rare off-by-ones propagate: the last quantized tensor agrees on 99.5% of codes (NIN) and
  95–96% (randomly initialised ResNet-20, where ONNX Runtime's own float QDQ path agrees with its integer
  kernels on about 94%).

On x86 CPUs without VNNI, ONNX Runtime's u8s8 kernels saturate int16 pair sums (off by up to 64 codes in the
first layer) unless the session sets ``session.x64quantprecision=1``; the comparisons above set it.
"""

from micronet.deploy.integer.fixed_point import (
    compare_codes,
    divide_by_count,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)
from micronet.deploy.integer.model import IntegerModel

__all__ = [
    "IntegerModel",
    "compare_codes",
    "divide_by_count",
    "multiply_by_quantized_multiplier",
    "quantize_multiplier",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
]
