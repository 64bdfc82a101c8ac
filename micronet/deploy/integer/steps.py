"""The integer run-time steps an :class:`~micronet.deploy.integer.IntegerModel` executes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from micronet.deploy.integer.fixed_point import (
    ADD_LEFT_SHIFT,
    _saturate_int32,
    divide_by_count,
    multiply_by_quantized_multiplier,
)
from micronet.deploy.integer.float32 import qlinear_add


# ------------------------------------------------------------------------------------------ window helpers
def _resolve_pads(auto_pad: str, pads: list[int], spatial: tuple[int, ...], kernel: list[int],
                  strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads ``[begin..., end...]``, computing SAME_UPPER/SAME_LOWER from the input size."""
    nd = len(kernel)
    if auto_pad in ("", "NOTSET"):
        return list(pads) if pads else [0] * (2 * nd)
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin + end


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX ``[b1, b2, e1, e2]`` → torch's last-dimension-first ``[b2, e2, b1, e1]``."""
    nd = len(pads) // 2
    return [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])]


def _windows(x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int], pads: list[int],
             ceil_mode: bool, pad_value: int) -> np.ndarray:
    """A view ``(N, C, *out, *kernel)`` of the pooling windows of ``x`` (padded with ``pad_value``)."""
    nd = len(kernel)
    spatial = x.shape[2:]
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    extra = []
    for i in range(nd):
        span = spatial[i] + pads[i] + pads[i + nd] - extents[i]
        out = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
        if ceil_mode and (out - 1) * strides[i] >= spatial[i] + pads[i]:
            out -= 1  # the last window must start inside the input or the left padding
        extra.append(max((out - 1) * strides[i] + extents[i] - (spatial[i] + pads[i] + pads[i + nd]), 0))
    widths = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd] + extra[i]) for i in range(nd)]
    padded = np.pad(x, widths, constant_values=pad_value)
    view = np.lib.stride_tricks.sliding_window_view(padded, extents, axis=tuple(range(2, 2 + nd)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(
        slice(None, None, d) for d in dilations)
    return view[index]


# ------------------------------------------------------------------------------------------ run-time steps
Env = dict[str, np.ndarray]


@dataclass
class Step:
    """One integer operation of the program: reads ``env`` by tensor name and writes ``output``.

    Array fields are the layer's parameters (saved to safetensors by
    :meth:`IntegerModel.export_parameters`); the other fields are JSON attributes. ``reference`` holds
    float scales for humans and checks only; no step reads it while running.
    """

    op: ClassVar[str] = ""
    node: str
    output: str

    def run(self, env: Env) -> None:
        raise NotImplementedError


@dataclass
class QuantizeInput(Step):
    """The float boundary: ONNX ``QuantizeLinear`` of a graph input (float32 division, round half even)."""

    op: ClassVar[str] = "QuantizeInput"
    input: str
    scale: float
    zero_point: int
    dtype: str

    def run(self, env: Env) -> None:
        x = np.asarray(env[self.input], dtype=np.float32)
        info = np.iinfo(self.dtype)
        codes = np.rint(x / np.float32(self.scale)).astype(np.int64) + self.zero_point
        env[self.output] = np.clip(codes, info.min, info.max).astype(self.dtype)


@dataclass
class Dequantize(Step):
    """The float boundary at a graph output: ``(q − offset) · scale`` clipped to ``[lo, hi]`` (float32)."""

    op: ClassVar[str] = "Dequantize"
    input: str
    offset: int
    scale: np.ndarray
    lo: float = -np.inf
    hi: float = np.inf
    divisor: str = ""  # a pooled sum: divide by its window count

    def run(self, env: Env) -> None:
        q = env[self.input].astype(np.int64) - self.offset
        if self.scale.dtype == np.float32:  # codes: exactly ONNX DequantizeLinear (|q| < 2^24 is exact in float32)
            y = q.astype(np.float32) * self.scale
        else:  # an int32 accumulator at a float64 scale
            y = (q * self.scale / (env[self.divisor] if self.divisor else 1)).astype(np.float32)
        env[self.output] = np.clip(y, np.float32(self.lo), np.float32(self.hi))


@dataclass
class Requantize(Step):
    """``clamp(z_out + M·(q − offset), lo, hi)`` with the fixed-point multiplier (M0, shift) broadcast
    against the input (per channel for conv accumulators)."""

    op: ClassVar[str] = "Requantize"
    input: str
    offset: int
    multiplier: np.ndarray  # M0, int32 Q31
    shift: np.ndarray  # right shift, int32
    zero_point: int
    lo: int  # the output dtype's range, narrowed by any Relu/Clip
    hi: int
    dtype: str
    rounding: str = "single"
    divisor: str = ""  # a pooled sum: M is divided by its window count (exact division, see divide_by_count)
    reference: dict = field(default_factory=dict)

    def run(self, env: Env) -> None:
        acc = env[self.input].astype(np.int64) - self.offset
        if self.divisor:
            y = divide_by_count(acc, self.multiplier, self.shift, env[self.divisor])
        else:
            y = multiply_by_quantized_multiplier(acc, self.multiplier, self.shift, self.rounding)
        y = y + self.zero_point
        env[self.output] = np.clip(y, self.lo, self.hi).astype(self.dtype)


@dataclass
class SaturatingRequantize(Step):
    """Requantization by a multiplier M ≥ 2^30 (a sign written as codes, e.g. micronet's sign activations at
    step 2^-100): every non-zero integer ``q − offset`` saturates, so the result is ``z_out`` for 0 and the
    range's end of its sign otherwise, clamped to ``[lo, hi]``: exact, with no multiplier to represent."""

    op: ClassVar[str] = "SaturatingRequantize"
    input: str
    offset: int
    zero_point: int
    lo: int
    hi: int
    dtype: str

    def run(self, env: Env) -> None:
        acc = env[self.input].astype(np.int64) - self.offset
        info = np.iinfo(self.dtype)
        y = np.where(acc > 0, info.max, np.where(acc < 0, info.min, self.zero_point))
        env[self.output] = np.clip(y, self.lo, self.hi).astype(self.dtype)


@dataclass
class Clamp(Step):
    """Relu/Clip on codes whose bounds are on the quantization grid: ``clamp(q, lo, hi)``."""

    op: ClassVar[str] = "Clamp"
    input: str
    lo: int
    hi: int

    def run(self, env: Env) -> None:
        q = env[self.input]
        env[self.output] = np.clip(q, self.lo, self.hi).astype(q.dtype)


def _float64(codes: np.ndarray, offset: np.ndarray | int) -> torch.Tensor:
    """``codes − offset`` as a float64 tensor: exact, since the values are small integers."""
    return torch.from_numpy(codes.astype(np.int64) - offset).to(torch.float64)


def _to_int32(exact: torch.Tensor, bias: np.ndarray | None = None) -> np.ndarray:
    """An integer-valued float64 result (exact, < 2^31 by the compile-time bound) plus an int32 bias."""
    acc = exact.numpy().astype(np.int64)
    if bias is not None and bias.size:
        acc = acc + bias
    return acc.astype(np.int32)


@dataclass
class Conv(Step):
    """``acc = conv(x_q − z_x, w_q − z_w) + bias_q`` (int32; any ``group``, stride, dilation, padding)."""

    op: ClassVar[str] = "Conv"
    input: str
    input_zero_point: int
    weight: np.ndarray  # int8 codes, (C_out, C_in/group, *kernel)
    weight_zero_point: np.ndarray  # (C_out,)
    bias: np.ndarray  # int32, (C_out,)
    strides: list
    pads: list
    dilations: list
    group: int
    auto_pad: str = "NOTSET"
    reference: dict = field(default_factory=dict)
    _centered: torch.Tensor | None = field(default=None, init=False, repr=False)

    def run(self, env: Env) -> None:
        if self._centered is None:
            shape = (-1,) + (1,) * (self.weight.ndim - 1)
            self._centered = _float64(self.weight, self.weight_zero_point.astype(np.int64).reshape(shape))
        x = _float64(env[self.input], self.input_zero_point)
        kernel = list(self.weight.shape[2:])
        pads = _resolve_pads(self.auto_pad, self.pads, tuple(x.shape[2:]), kernel, self.strides, self.dilations)
        x = F.pad(x, _torch_pad(pads))  # zero-padding with real zero = code z_x, i.e. 0 after centering
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(kernel) - 1]
        out = conv(x, self._centered, None, self.strides, 0, self.dilations, self.group)
        env[self.output] = _to_int32(out, self.bias.astype(np.int64).reshape((-1,) + (1,) * len(kernel)))


@dataclass
class MatMul(Step):
    """``acc = (A_q − z_a) @ (W_q − z_w) + bias_q`` for Gemm (2-D, optional transA) and MatMul (N-D A).
    ``weight`` is stored as (K, N) whatever the graph's layout."""

    op: ClassVar[str] = "MatMul"
    input: str
    input_zero_point: int
    weight: np.ndarray  # int8 codes, (K, N)
    weight_zero_point: np.ndarray  # (N,)
    bias: np.ndarray  # int32, (N,) or empty
    trans_a: int = 0
    reference: dict = field(default_factory=dict)
    _centered: torch.Tensor | None = field(default=None, init=False, repr=False)

    def run(self, env: Env) -> None:
        if self._centered is None:
            self._centered = _float64(self.weight, self.weight_zero_point.astype(np.int64))
        a = _float64(env[self.input], self.input_zero_point)
        if self.trans_a:
            a = a.T
        env[self.output] = _to_int32(torch.matmul(a, self._centered), self.bias.astype(np.int64))


@dataclass
class Add(Step):
    """TFLite's integer ADD: ``((a_q − z_a) << 20)·M_a + ((b_q − z_b) << 20)·M_b`` at scale
    ``2·max(s_a, s_b) / 2^20`` (int32); the following requantization brings it to the output scale."""

    op: ClassVar[str] = "Add"
    inputs: list
    zero_points: list
    multipliers: np.ndarray  # (2,) M0 of s_i / (2·max(s_a, s_b))
    shifts: np.ndarray  # (2,)
    left_shift: int = ADD_LEFT_SHIFT
    rounding: str = "single"
    reference: dict = field(default_factory=dict)

    def run(self, env: Env) -> None:
        total = 0
        for name, zero, m0, shift in zip(self.inputs, self.zero_points, self.multipliers, self.shifts):
            shifted = (env[name].astype(np.int64) - zero) << self.left_shift
            total = total + multiply_by_quantized_multiplier(shifted, m0, shift, self.rounding)
        env[self.output] = _saturate_int32(total).astype(np.int32)


@dataclass
class QLinearAdd(Step):
    """ONNX Runtime's fused ``DequantizeLinear → Add → QuantizeLinear`` (its x86 ``QLinearAdd`` kernel),
    bit for bit in integers: ``saturate(round(fma(a_q, s_a/s_c, fma(b_q, s_b/s_c, fixed))))`` in float32
    (:func:`~micronet.deploy.integer.float32.qlinear_add`)."""

    op: ClassVar[str] = "QLinearAdd"
    inputs: list
    ratio_a: float
    ratio_b: float
    fixed: float
    dtype: str
    reference: dict = field(default_factory=dict)

    def run(self, env: Env) -> None:
        a, b = (env[name] for name in self.inputs)
        y = qlinear_add(a, b, np.float32(self.ratio_a), np.float32(self.ratio_b), np.float32(self.fixed))
        info = np.iinfo(self.dtype)
        env[self.output] = np.clip(y, info.min, info.max).astype(self.dtype)


@dataclass
class Mul(Step):
    """``acc = (a_q − z_a)·(b_q − z_b)`` at scale ``s_a·s_b`` (int32)."""

    op: ClassVar[str] = "Mul"
    inputs: list
    zero_points: list

    def run(self, env: Env) -> None:
        a, b = (env[n].astype(np.int64) - z for n, z in zip(self.inputs, self.zero_points))
        env[self.output] = (a * b).astype(np.int32)


@dataclass
class PoolSum(Step):
    """Integer sum of ``x_q − z_x`` over each pooling window (``kernel`` empty: over all spatial axes, i.e.
    GlobalAveragePool), and the window counts in ``count_output`` (a scalar, or a map when padding is
    excluded from the average); the requantization divides by them."""

    op: ClassVar[str] = "PoolSum"
    input: str
    input_zero_point: int
    count_output: str
    kernel: list = field(default_factory=list)
    strides: list = field(default_factory=list)
    pads: list = field(default_factory=list)
    dilations: list = field(default_factory=list)
    auto_pad: str = "NOTSET"
    count_include_pad: int = 0

    def run(self, env: Env) -> None:
        x = env[self.input].astype(np.int32) - np.int32(self.input_zero_point)
        nd = x.ndim - 2
        window_axes = tuple(range(-nd, 0))
        if not self.kernel:
            env[self.output] = x.sum(axis=tuple(range(2, 2 + nd)), keepdims=True, dtype=np.int32)
            env[self.count_output] = np.asarray(np.prod(x.shape[2:]), np.int64)
            return
        pads = _resolve_pads(self.auto_pad, self.pads, x.shape[2:], self.kernel, self.strides, self.dilations)
        env[self.output] = _windows(x, self.kernel, self.strides, self.dilations, pads, False, 0).sum(
            axis=window_axes, dtype=np.int32)
        if self.count_include_pad or not any(pads):
            env[self.count_output] = np.asarray(np.prod(self.kernel), np.int64)
        else:  # count the real (unpadded) inputs of each window
            ones = np.ones((1, 1, *x.shape[2:]), np.int64)
            env[self.count_output] = _windows(ones, self.kernel, self.strides, self.dilations, pads, False, 0).sum(
                axis=window_axes)


@dataclass
class MaxPool(Step):
    """Max over windows of the codes (monotone quantization commutes with max)."""

    op: ClassVar[str] = "MaxPool"
    input: str
    kernel: list
    strides: list
    pads: list
    dilations: list
    ceil_mode: int = 0
    auto_pad: str = "NOTSET"

    def run(self, env: Env) -> None:
        x = env[self.input]
        pads = _resolve_pads(self.auto_pad, self.pads, x.shape[2:], self.kernel, self.strides, self.dilations)
        view = _windows(x, self.kernel, self.strides, self.dilations, pads, bool(self.ceil_mode),
                        int(np.iinfo(x.dtype).min))
        env[self.output] = view.max(axis=tuple(range(-len(self.kernel), 0)))


@dataclass
class Shape(Step):
    """Flatten / Reshape / Transpose / Squeeze / Unsqueeze: move integers without changing them."""

    op: ClassVar[str] = "Shape"
    input: str
    kind: str
    axis: int = 1
    shape: list = field(default_factory=list)
    perm: list = field(default_factory=list)
    axes: list = field(default_factory=list)
    allowzero: int = 0
    shape_input: str = ""  # a Reshape target computed at run time (an IndexOp output)

    def run(self, env: Env) -> None:
        x = env[self.input]
        if self.kind == "Flatten":
            axis = self.axis % x.ndim if x.ndim else 0
            y = x.reshape(int(np.prod(x.shape[:axis])), -1)
        elif self.kind == "Reshape":
            shape = env[self.shape_input].tolist() if self.shape_input else self.shape
            y = x.reshape(_reshape_target(x, shape, self.allowzero))
        elif self.kind == "Transpose":
            y = x.transpose(self.perm or None)
        elif self.kind == "Squeeze":
            y = np.squeeze(x, axis=tuple(self.axes) if self.axes else None)
        else:  # Unsqueeze
            y = _unsqueeze(x, tuple(self.axes))
        env[self.output] = y


@dataclass
class Concat(Step):
    """Concatenate codes that share quantization parameters."""

    op: ClassVar[str] = "Concat"
    inputs: list
    axis: int

    def run(self, env: Env) -> None:
        env[self.output] = np.concatenate([env[name] for name in self.inputs], axis=self.axis)


def _reshape_target(x: np.ndarray, shape: list[int], allowzero: int) -> list[int]:
    return [x.shape[i] if s == 0 and not allowzero else int(s) for i, s in enumerate(shape)]


def _slice(args: list, attrs: dict) -> np.ndarray:
    data, starts, ends = args[0], args[1], args[2]
    axes = args[3] if len(args) > 3 and args[3] is not None else range(len(starts))
    steps = args[4] if len(args) > 4 and args[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[int(axis)] = slice(int(start), int(end), int(step))
    return data[tuple(index)]


def _axes(args: list, attrs: dict) -> tuple[int, ...]:
    axes = attrs.get("axes")
    if axes is None and len(args) > 1 and args[1] is not None:
        axes = args[1].tolist()
    return tuple(axes or ())


def _unsqueeze(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    for axis in sorted(a % (x.ndim + len(axes)) for a in axes):
        x = np.expand_dims(x, axis)
    return x


def _truncating_divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))


# ONNX semantics of the ops that dynamic-batch exports use to compute shapes (Shape → Slice → Concat → Reshape).
_INDEX_OPS: dict[str, Callable[[list, dict], np.ndarray]] = {
    "Shape": lambda args, attrs: np.array(args[0].shape[attrs.get("start", 0):attrs.get("end")], np.int64),
    "Slice": _slice,
    "Concat": lambda args, attrs: np.concatenate(args, axis=attrs["axis"]),
    "Gather": lambda args, attrs: np.take(args[0], args[1], axis=attrs.get("axis", 0)),
    "Add": lambda args, attrs: args[0] + args[1],
    "Sub": lambda args, attrs: args[0] - args[1],
    "Mul": lambda args, attrs: args[0] * args[1],
    "Div": lambda args, attrs: _truncating_divide(args[0], args[1]),
    "Mod": lambda args, attrs: (np.fmod if attrs.get("fmod", 0) else np.mod)(args[0], args[1]),
    "Reshape": lambda args, attrs: args[0].reshape(_reshape_target(args[0], args[1].tolist(),
                                                                   attrs.get("allowzero", 0))),
    "Unsqueeze": lambda args, attrs: _unsqueeze(args[0], _axes(args, attrs)),
    "Squeeze": lambda args, attrs: np.squeeze(args[0], axis=_axes(args, attrs) or None),
    "Cast": lambda args, attrs: args[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"])),
    "Identity": lambda args, attrs: args[0],
}


@dataclass
class IndexOp(Step):
    """Shape arithmetic on small int64 tensors, as dynamic-batch exports compute reshape targets; it reads
    tensor shapes, never quantized values."""

    op: ClassVar[str] = "IndexOp"
    kind: str
    inputs: list
    attributes: dict = field(default_factory=dict)

    def run(self, env: Env) -> None:
        args = [env[name] if name else None for name in self.inputs]
        env[self.output] = _INDEX_OPS[self.kind](args, self.attributes)


STEP_TYPES: dict[str, type[Step]] = {cls.op: cls for cls in (QuantizeInput, Dequantize, Requantize, SaturatingRequantize,
                                                            Clamp, Conv, MatMul, Add, QLinearAdd, Mul, PoolSum, MaxPool,
                                                            Shape, Concat, IndexOp)}


