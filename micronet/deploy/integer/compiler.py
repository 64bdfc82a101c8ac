"""Compilation of a QDQ ONNX graph into integer steps."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx

from micronet.deploy.integer.fixed_point import ADD_LEFT_SHIFT, INT32_MAX, ROUNDINGS, quantize_multiplier
from micronet.deploy.integer.float32 import float32_multiplier, qlinear_add_parameters
from micronet.deploy.integer.steps import (
    _INDEX_OPS,
    Add,
    Clamp,
    Concat,
    Conv,
    Dequantize,
    IndexOp,
    MatMul,
    MaxPool,
    Mul,
    PoolSum,
    QLinearAdd,
    QuantizeInput,
    Requantize,
    SaturatingRequantize,
    Shape,
    Step,
)
from micronet.deploy.onnx.graph import GraphView, attribute
from micronet.errors import DeployError

# a requantization multiplier this large saturates every non-zero integer (|q|·M ≥ 2^30 > any code range)
SATURATING_MULTIPLIER = 2.0**30


# ------------------------------------------------------------------------------------------ compile-time values
@dataclass(frozen=True)
class QParams:
    """Scale (float64, scalar or per ``axis``), zero point (int64, same shape) and code dtype."""

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str
    axis: int | None = None

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.dtype).min)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.dtype).max)

    def s(self) -> float:
        return float(self.scale.reshape(-1)[0])

    def z(self) -> int:
        return int(self.zero_point.reshape(-1)[0])

    def same_as(self, other: QParams) -> bool:
        return (self.per_tensor and other.per_tensor and self.dtype == other.dtype and self.z() == other.z()
                and np.float32(self.s()) == np.float32(other.s()))

    def code(self, value: float) -> int:
        """ONNX QuantizeLinear of one float (float32 division, round half even, saturate)."""
        if np.isinf(value):
            return self.qmin if value < 0 else self.qmax
        q = int(np.rint(np.float32(value) / np.float32(self.s()))) + self.z()
        return min(max(q, self.qmin), self.qmax)

    def max_centered(self) -> int:
        """The largest ``|q − z|`` a code can have."""
        return max(self.z() - self.qmin, self.qmax - self.z())


@dataclass(frozen=True)
class Codes:
    """A float tensor that is ``scale·(codes − zero_point)`` clipped to ``[lo, hi]``; ``name`` is the
    integer tensor in the run-time environment (or a constant initializer when ``constant``)."""

    name: str
    q: QParams
    constant: bool = False
    lo: float = -np.inf
    hi: float = np.inf

    @property
    def clipped(self) -> bool:
        return self.lo > -np.inf or self.hi < np.inf


@dataclass(frozen=True)
class Accumulator:
    """A float tensor that is ``acc·scale`` (int32 ``acc``; ``scale`` broadcasts against it) clipped to
    ``[lo, hi]`` (and divided by the window counts in ``divisor``): the output of Conv/Gemm/Add/pooling
    before its QuantizeLinear."""

    name: str
    scale: np.ndarray
    lo: float = -np.inf
    hi: float = np.inf
    divisor: str = ""  # pooled sums: the real value is divided by these window counts
    spatial_divisor: bool = False  # the counts vary over the window positions (padding excluded)
    product: bool = False  # a Conv/Gemm/MatMul sum at scale s_x·s_w (ONNX Runtime requantizes it in float32)


@dataclass(frozen=True)
class FloatTensor:
    """A graph input (float) that only a QuantizeLinear may read."""

    name: str


@dataclass(frozen=True)
class IndexTensor:
    """A small int64 tensor of shape arithmetic (see :class:`IndexOp`)."""

    name: str


@dataclass(frozen=True)
class PendingConcat:
    """A Concat of codes with different parameters: each part is requantized by the QuantizeLinear."""

    parts: tuple
    axis: int
    lo: float = -np.inf
    hi: float = np.inf


Value = Codes | Accumulator | FloatTensor | IndexTensor | PendingConcat


def _label(node: onnx.NodeProto) -> str:
    return f"{node.name!r} ({node.op_type})" if node.name else f"{node.op_type} → {node.output[0]!r}"


def _text(node: onnx.NodeProto, name: str, default: str = "NOTSET") -> str:
    value = attribute(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def _aligned(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A per-channel vector reshaped to broadcast along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


class _Compiler:
    """Walks the graph once in (ONNX-mandated) topological order and emits :class:`Step` objects."""

    def __init__(self, model: onnx.ModelProto, rounding: str) -> None:
        if rounding not in ROUNDINGS:
            raise DeployError(f"unknown rounding {rounding!r}: choose one of {', '.join(ROUNDINGS)}")
        self.view = GraphView(model)
        self.rounding = rounding
        self.steps: list[Step] = []
        self.values: dict[str, Value] = {name: FloatTensor(name) for name in self.view.graph_inputs}
        self.constants: dict[str, np.ndarray] = {}
        self.aliases: dict[str, str] = {}  # integer tensor → the env name that holds it
        self.quantized: list[str] = []  # QuantizeLinear outputs, in order
        self._temporaries = 0

    # ---------------------------------------------------------------- helpers
    def _temp(self, base: str) -> str:
        self._temporaries += 1
        return f"{base}::{self._temporaries}"

    def _out(self, node: onnx.NodeProto) -> str:
        """Where the integer tensor behind the float output ``node.output[0]`` lives at run time: under its
        ONNX name, unless that is a graph output, whose name the final :class:`Dequantize` writes."""
        name = node.output[0]
        return f"{name}::int" if name in self.view.graph_outputs else name

    def _emit(self, step: Step) -> None:
        self.steps.append(step)

    def _constant(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
        name = node.input[index] if index < len(node.input) else ""
        value = self.view.constant(name) if name else None
        if value is None:
            raise DeployError(f"node {_label(node)}: its {what} ({name or 'missing'}) must be a constant: "
                              "fold it into an initializer (e.g. export with constant folding)")
        return value

    def _qparams(self, node: onnx.NodeProto) -> QParams:
        if attribute(node, "block_size", 0):
            raise DeployError(f"node {_label(node)}: blocked quantization has no integer mapping: "
                              "quantize per tensor or per channel")
        scale = self._constant(node, 1, "scale").astype(np.float64)
        if len(node.input) > 2 and node.input[2]:
            zero = self._constant(node, 2, "zero point")
            dtype = zero.dtype
        else:
            output_dtype = attribute(node, "output_dtype", 0) or onnx.TensorProto.UINT8  # ONNX's default
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(output_dtype))
            zero = np.zeros(scale.shape, dtype)
        if dtype.kind not in "iu":
            raise DeployError(f"node {_label(node)}: codes of type {dtype} have no integer mapping: "
                              "use int8/uint8 (int32 for biases)")
        if np.any(scale <= 0):
            raise DeployError(f"node {_label(node)}: scales must be positive: re-quantize the model")
        axis = attribute(node, "axis", 1) if scale.size > 1 else None
        return QParams(scale, zero.astype(np.int64), dtype.name, axis)

    def _value(self, node: onnx.NodeProto, index: int) -> Value:
        name = node.input[index]
        if name not in self.values:
            if self.view.constant(name) is not None:
                raise DeployError(f"node {_label(node)} reads the float constant {name!r}, which is not quantized: "
                                  "quantize it with a QuantizeLinear/DequantizeLinear pair")
            raise DeployError(f"node {_label(node)} reads {name!r}, which no earlier node produces: "
                              "the graph is not topologically sorted or uses an unsupported input")
        return self.values[name]

    def _codes(self, node: onnx.NodeProto, index: int) -> Codes:
        """Input ``index`` as codes, applying a pending on-grid Relu/Clip."""
        value = self._value(node, index)
        if not isinstance(value, Codes):
            raise DeployError(f"node {_label(node)} reads {node.input[index]!r}, which is not quantized: insert a "
                              "QuantizeLinear/DequantizeLinear pair before it (the integer program needs codes there)")
        if value.constant:
            self.constants[value.name] = self.view.constant(value.name)
        if not value.clipped:
            return value
        q = value.q
        bounds = []
        for bound in (value.lo, value.hi):
            level = bound / q.s() + q.z()
            if np.isfinite(level) and abs(level - round(level)) > 1e-3 and q.qmin < level < q.qmax:
                raise DeployError(f"node {_label(node)} reads {node.input[index]!r}, clipped at {bound:g}, which is "
                                  "not on its quantization grid: add a QuantizeLinear after the Clip")
            bounds.append(q.code(bound))
        out = self._temp(node.input[index])
        self._emit(Clamp(node.name, out, value.name, bounds[0], bounds[1]))
        return Codes(out, q)

    def _activation(self, node: onnx.NodeProto, index: int) -> Codes:
        codes = self._codes(node, index)
        if not codes.q.per_tensor:
            raise DeployError(f"node {_label(node)}: input {node.input[index]!r} is quantized per channel: "
                              "quantize activations per tensor")
        return codes

    def _weight(self, node: onnx.NodeProto, index: int, channel_axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Constant weight codes, per-output-channel zero points and scales (``channel_axis`` of the codes)."""
        value = self._value(node, index)
        if not (isinstance(value, Codes) and value.constant):
            raise DeployError(f"node {_label(node)}: its weight {node.input[index]!r} must be a DequantizeLinear of a "
                              "constant int8 tensor: quantize the weights (or this op has no integer mapping)")
        codes = self.view.constant(value.name)
        channels = codes.shape[channel_axis]
        q = value.q
        if q.per_tensor:
            return codes, np.full(channels, q.z()), np.full(channels, q.s())
        if q.axis % codes.ndim != channel_axis % codes.ndim:
            raise DeployError(f"node {_label(node)}: weight {node.input[index]!r} is quantized along axis {q.axis}, "
                              "not along the output channels: quantize weights per output channel")
        return codes, q.zero_point.reshape(-1), q.scale.reshape(-1)

    def _bias(self, node: onnx.NodeProto, index: int, acc_scale: np.ndarray) -> np.ndarray:
        """The int32 bias at the accumulator scale (see the module docstring for its rounding)."""
        name = node.input[index] if index < len(node.input) else ""
        if not name:
            return np.zeros(acc_scale.shape, np.int32)
        value = self.values.get(name)
        if isinstance(value, Codes) and value.constant:
            codes = self.view.constant(value.name).astype(np.int64) - value.q.zero_point.reshape(-1)
            scale = np.broadcast_to(value.q.scale.reshape(-1), codes.shape)
            if np.allclose(scale, acc_scale, rtol=2.0**-22, atol=0):
                return np.broadcast_to(codes, acc_scale.shape).astype(np.int64)
            real = codes * scale
        elif self.view.constant(name) is not None:
            real = self.view.constant(name).astype(np.float64).reshape(-1)
        else:
            raise DeployError(f"node {_label(node)}: its bias {name!r} must be a constant: fold it into an initializer")
        bias = np.rint(np.broadcast_to(real, acc_scale.shape) / acc_scale)
        if np.abs(bias).max(initial=0) > INT32_MAX:
            raise DeployError(f"node {_label(node)}: its bias does not fit int32 at scale s_x·s_w: the weight or "
                              "input scale is far too small; re-quantize the model")
        return bias.astype(np.int64)

    def _check_accumulator(self, node: onnx.NodeProto, centered: np.ndarray, reduce_axes: tuple, x: Codes,
                           bias: np.ndarray) -> None:
        """Worst case of |acc| per output channel must fit int32 (and so is exact in float64)."""
        worst = np.abs(centered).sum(axis=reduce_axes) * x.q.max_centered() + np.abs(bias)
        if worst.max(initial=0) > INT32_MAX:
            raise DeployError(f"node {_label(node)}: its int32 accumulator can overflow (worst case "
                              f"{int(worst.max())}): split the layer or use narrower weights")

    def _quantize(self, value: Value, q: QParams, out: str, node: onnx.NodeProto) -> None:
        """Emit the steps that write ``value`` quantized with ``q`` to the integer tensor ``out``."""
        if isinstance(value, FloatTensor):
            self._emit(QuantizeInput(node.name, out, value.name, q.s(), q.z(), q.dtype))
            return
        if isinstance(value, PendingConcat):
            parts = []
            for part in value.parts:
                name = self._temp(out)
                self._quantize(part, q, name, node)
                parts.append(self.aliases.get(name, name))
            joined = self._temp(out) if value.lo > -np.inf or value.hi < np.inf else out
            self._emit(Concat(node.name, joined, parts, value.axis))
            if joined != out:
                self._emit(Clamp(node.name, out, joined, q.code(value.lo), q.code(value.hi)))
            return
        lo, hi = q.code(value.lo), q.code(value.hi)
        if isinstance(value, Codes):
            if value.q.same_as(q):
                if value.clipped:
                    self._emit(Clamp(node.name, out, value.name, lo, hi))
                else:
                    self.aliases[out] = self.aliases.get(value.name, value.name)
                return
            if not value.q.per_tensor:
                raise DeployError(f"node {_label(node)} requantizes a per-channel tensor: "
                                  "quantize activations per tensor")
            offset, real = value.q.z(), np.asarray(value.q.s() / q.s())
            reference = {"input_scale": value.q.s(), "output_scale": q.s()}
        else:
            offset, real = 0, value.scale / q.s()
            reference = {"accumulator_scale": value.scale.reshape(-1).tolist(), "output_scale": q.s()}
        reference["multiplier"] = np.asarray(real).reshape(-1).tolist()
        divisor = value.divisor if isinstance(value, Accumulator) else ""
        if not divisor and np.all(np.asarray(real) >= SATURATING_MULTIPLIER):  # every non-zero input saturates
            self._emit(SaturatingRequantize(node.name, out, value.name, offset, q.z(), lo, hi, q.dtype))
            return
        if divisor:
            reference["divided_by_window_count"] = True
        rounding = self.rounding
        if rounding == "onnxruntime" and isinstance(value, Accumulator) and value.product and not divisor:
            # QLinearConv/QGemm: fl32(fl32(acc) · fl32(fl32(s_x·s_w) / s_y)), rounded half to even
            m0, shift = float32_multiplier(np.float32(value.scale) / np.float32(q.s()))
        else:
            rounding = "single" if rounding == "onnxruntime" else rounding  # ops MLAS does not fuse: exact rounding
            m0, shift = quantize_multiplier(real)
        self._emit(Requantize(node.name, out, value.name, offset, np.atleast_1d(m0), np.atleast_1d(shift), q.z(),
                              lo, hi, q.dtype, rounding, divisor, reference))

    # ---------------------------------------------------------------- op handlers
    def quantize_linear(self, node: onnx.NodeProto) -> None:
        q = self._qparams(node)
        if not q.per_tensor:
            raise DeployError(f"node {_label(node)} quantizes an activation per channel: "
                              "quantize activations per tensor")
        out = node.output[0]
        self._quantize(self._value(node, 0), q, out, node)
        self.quantized.append(out)

    def dequantize_linear(self, node: onnx.NodeProto) -> None:
        source = node.input[0]
        q = self._qparams(node)
        if self.view.constant(source) is not None:
            self.values[node.output[0]] = Codes(source, q, constant=True)
        elif source in self.quantized or source in self.view.graph_inputs:
            self.values[node.output[0]] = Codes(self.aliases.get(source, source), q)
        else:
            raise DeployError(f"node {_label(node)} dequantizes {source!r}, which is neither a constant nor a "
                              "QuantizeLinear output: this integer tensor has no integer mapping")

    def conv(self, node: onnx.NodeProto) -> None:
        x = self._activation(node, 0)
        codes, w_zero, w_scale = self._weight(node, 1, channel_axis=0)
        nd = codes.ndim - 2
        if not 1 <= nd <= 3:
            raise DeployError(f"node {_label(node)}: {nd}-d convolution has no integer mapping: use 1-d to 3-d convs")
        acc_scale = x.q.s() * w_scale
        bias = self._bias(node, 2, acc_scale)
        centered = codes.astype(np.int64) - _aligned(w_zero, 0, codes.ndim)
        self._check_accumulator(node, centered, tuple(range(1, codes.ndim)), x, bias)
        out = self._out(node)
        self._emit(Conv(node.name, out, x.name, x.q.z(), codes, w_zero.astype(codes.dtype), bias.astype(np.int32),
                        list(attribute(node, "strides", [1] * nd)), list(attribute(node, "pads", [0] * 2 * nd)),
                        list(attribute(node, "dilations", [1] * nd)), int(attribute(node, "group", 1)),
                        _text(node, "auto_pad"),
                        {"input_scale": x.q.s(), "weight_scale": w_scale.tolist()}))
        self.values[node.output[0]] = Accumulator(out, _aligned(acc_scale, 1, codes.ndim), product=True)

    def gemm(self, node: onnx.NodeProto) -> None:
        trans_b = int(attribute(node, "transB", 0)) if node.op_type == "Gemm" else 0
        alpha = float(attribute(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        beta = float(attribute(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        if alpha <= 0 or beta != 1.0:
            raise DeployError(f"node {_label(node)}: Gemm with alpha={alpha}, beta={beta} has no integer mapping: "
                              "export linear layers with alpha > 0 and beta = 1")
        a = self._activation(node, 0)
        codes, w_zero, w_scale = self._weight(node, 1, channel_axis=0 if trans_b else 1)
        if codes.ndim != 2:
            raise DeployError(f"node {_label(node)}: its weight must be a matrix (got shape {codes.shape})")
        weight = codes.T if trans_b else codes  # (K, N)
        acc_scale = alpha * a.q.s() * w_scale
        bias = self._bias(node, 2, acc_scale) if node.op_type == "Gemm" else np.zeros(0, np.int64)
        centered = weight.astype(np.int64) - w_zero
        self._check_accumulator(node, centered, (0,), a, bias if bias.size else np.zeros(1))
        out = self._out(node)
        self._emit(MatMul(node.name, out, a.name, a.q.z(), np.ascontiguousarray(weight), w_zero.astype(codes.dtype),
                          bias.astype(np.int32), int(attribute(node, "transA", 0)),
                          {"input_scale": a.q.s(), "weight_scale": w_scale.tolist(), "alpha": alpha}))
        self.values[node.output[0]] = Accumulator(out, acc_scale, product=alpha == 1.0)

    def _fused_quantize(self, node: onnx.NodeProto) -> QParams | None:
        """The parameters of the QuantizeLinear that alone reads ``node``'s output, directly or through a Relu
        that its zero point at ``qmin`` makes redundant: ONNX Runtime drops such a Relu and fuses the rest."""
        name, through_relu = node.output[0], False
        while True:
            consumers = self.view.consumers.get(name, [])
            if name in self.view.graph_outputs or len(consumers) != 1 or consumers[0].domain not in ("", "ai.onnx"):
                return None
            consumer = consumers[0]
            if consumer.op_type == "Relu" and not through_relu:
                name, through_relu = consumer.output[0], True
                continue
            if consumer.op_type != "QuantizeLinear":
                return None
            q = self._qparams(consumer)
            return q if q.per_tensor and (not through_relu or q.z() == q.qmin) else None

    def add(self, node: onnx.NodeProto) -> None:
        a, b = self._activation(node, 0), self._activation(node, 1)
        q = self._fused_quantize(node) if self.rounding == "onnxruntime" else None
        if q is not None and a.q.dtype == b.q.dtype == q.dtype:  # ONNX Runtime's QLinearAdd, bit for bit
            out = self._out(node)
            constants = qlinear_add_parameters(a.q.s(), a.q.z(), b.q.s(), b.q.z(), q.s(), q.z())
            self._emit(QLinearAdd(node.name, out, [a.name, b.name], *(float(v) for v in constants.values()), q.dtype,
                                  {"input_scales": [a.q.s(), b.q.s()], "output_scale": q.s()}))
            self.values[node.output[0]] = Codes(out, q)
            return
        twice_max = 2 * max(a.q.s(), b.q.s())
        m0, shift = quantize_multiplier(np.array([a.q.s(), b.q.s()]) / twice_max)
        out = self._out(node)
        rounding = "single" if self.rounding == "onnxruntime" else self.rounding
        self._emit(Add(node.name, out, [a.name, b.name], [a.q.z(), b.q.z()], m0, shift, ADD_LEFT_SHIFT, rounding,
                       {"input_scales": [a.q.s(), b.q.s()]}))
        self.values[node.output[0]] = Accumulator(out, np.asarray(twice_max * 2.0**-ADD_LEFT_SHIFT))

    def mul(self, node: onnx.NodeProto) -> None:
        a, b = self._activation(node, 0), self._activation(node, 1)
        out = self._out(node)
        self._emit(Mul(node.name, out, [a.name, b.name], [a.q.z(), b.q.z()]))
        self.values[node.output[0]] = Accumulator(out, np.asarray(a.q.s() * b.q.s()))

    def global_average_pool(self, node: onnx.NodeProto) -> None:
        x = self._activation(node, 0)
        out = self._out(node)
        self._emit(PoolSum(node.name, out, x.name, x.q.z(), f"{out}::count"))
        self.values[node.output[0]] = Accumulator(out, np.asarray(x.q.s()), divisor=f"{out}::count")

    def average_pool(self, node: onnx.NodeProto) -> None:
        x = self._activation(node, 0)
        kernel = list(attribute(node, "kernel_shape"))
        nd = len(kernel)
        if attribute(node, "ceil_mode", 0):
            raise DeployError(f"node {_label(node)}: AveragePool with ceil_mode=1 has no integer mapping: "
                              "use ceil_mode=0")
        pads = list(attribute(node, "pads", [0] * 2 * nd))
        auto_pad = _text(node, "auto_pad")
        include_pad = int(attribute(node, "count_include_pad", 0))
        out = self._out(node)
        self._emit(PoolSum(node.name, out, x.name, x.q.z(), f"{out}::count", kernel,
                           list(attribute(node, "strides", [1] * nd)), pads,
                           list(attribute(node, "dilations", [1] * nd)),
                           auto_pad, include_pad))
        varying = not include_pad and (any(pads) or auto_pad.startswith("SAME"))
        self.values[node.output[0]] = Accumulator(out, np.asarray(x.q.s()), divisor=f"{out}::count",
                                                  spatial_divisor=varying)

    def max_pool(self, node: onnx.NodeProto) -> None:
        if len(node.output) > 1 and node.output[1]:
            raise DeployError(f"node {_label(node)}: MaxPool indices have no integer mapping: drop the second output")
        x = self._codes(node, 0)
        kernel = list(attribute(node, "kernel_shape"))
        nd = len(kernel)
        out = self._out(node)
        self._emit(MaxPool(node.name, out, x.name, kernel, list(attribute(node, "strides", [1] * nd)),
                           list(attribute(node, "pads", [0] * 2 * nd)), list(attribute(node, "dilations", [1] * nd)),
                           int(attribute(node, "ceil_mode", 0)), _text(node, "auto_pad")))
        self.values[node.output[0]] = Codes(out, x.q)

    def clip(self, node: onnx.NodeProto) -> None:
        if node.op_type == "Clip" and node.input[0] in self.quantized:
            self._clip_codes(node)
            return
        value = self._value(node, 0)
        if isinstance(value, FloatTensor):
            raise DeployError(f"node {_label(node)} runs on the float input {value.name!r}: quantize the input first")
        if node.op_type == "Relu":
            lo, hi = 0.0, np.inf
        elif len(node.input) > 1 or not node.attribute:  # opset ≥ 11: bounds are inputs
            lo = float(self._constant(node, 1, "min")) if len(node.input) > 1 and node.input[1] else -np.inf
            hi = float(self._constant(node, 2, "max")) if len(node.input) > 2 and node.input[2] else np.inf
        else:
            lo, hi = float(attribute(node, "min", -np.inf)), float(attribute(node, "max", np.inf))
        self.values[node.output[0]] = dataclasses.replace(value, lo=max(value.lo, lo), hi=min(value.hi, hi))

    def _clip_codes(self, node: onnx.NodeProto) -> None:
        """A Clip on a QuantizeLinear's integer codes (a narrow grid inside the 8-bit one, as micronet writes
        DoReFa's k-bit activations and signs): clamp the codes; a DequantizeLinear reads the result."""
        source = node.input[0]
        bounds = []
        for index, default in ((1, -np.inf), (2, np.inf)):
            name = node.input[index] if index < len(node.input) else ""
            bounds.append(float(self._constant(node, index, "bound")) if name else default)
        lo, hi = (int(np.clip(b, -2**31, 2**31 - 1)) for b in bounds)
        self._emit(Clamp(node.name, node.output[0], self.aliases.get(source, source), lo, hi))
        self.quantized.append(node.output[0])

    def identity(self, node: onnx.NodeProto) -> None:
        self.values[node.output[0]] = self._value(node, 0)

    def reshape(self, node: onnx.NodeProto) -> None:
        value = self._value(node, 0)
        if isinstance(value, Accumulator) and value.scale.size == 1 and not value.spatial_divisor:
            source = value
        else:
            source = self._codes(node, 0)
        kind = node.op_type
        options: dict[str, Any] = {}
        if kind == "Flatten":
            options["axis"] = int(attribute(node, "axis", 1))
        elif kind == "Reshape":
            if isinstance(self.values.get(node.input[1]), IndexTensor):
                options["shape_input"] = self.values[node.input[1]].name
            else:
                options["shape"] = self._constant(node, 1, "shape").astype(int).tolist()
            options["allowzero"] = int(attribute(node, "allowzero", 0))
        elif kind == "Transpose":
            options["perm"] = list(attribute(node, "perm", []))
        else:  # Squeeze / Unsqueeze: axes are an attribute before opset 13, an input after
            axes = attribute(node, "axes", None)
            if axes is None and len(node.input) > 1 and node.input[1]:
                axes = self._constant(node, 1, "axes").astype(int).tolist()
            options["axes"] = list(axes or [])
        out = self._out(node)
        self._emit(Shape(node.name, out, source.name, kind, **options))
        changes = {"name": out, "constant": False} if isinstance(source, Codes) else {"name": out}
        self.values[node.output[0]] = dataclasses.replace(source, **changes)

    def concat(self, node: onnx.NodeProto) -> None:
        values = [self._value(node, i) for i in range(len(node.input))]
        axis = int(attribute(node, "axis"))
        out = self._out(node)
        if all(isinstance(v, Codes) and not v.clipped and v.q.same_as(values[0].q) for v in values):
            parts = [self._codes(node, i).name for i in range(len(values))]
            self._emit(Concat(node.name, out, parts, axis))
            self.values[node.output[0]] = Codes(out, values[0].q)
        else:
            self.values[node.output[0]] = PendingConcat(tuple(self._codes(node, i) for i in range(len(values))), axis)

    HANDLERS: ClassVar[dict[str, str]] = {
        "QuantizeLinear": "quantize_linear", "DequantizeLinear": "dequantize_linear", "Conv": "conv",
        "Gemm": "gemm", "MatMul": "gemm", "Add": "add", "Mul": "mul", "GlobalAveragePool": "global_average_pool",
        "AveragePool": "average_pool", "MaxPool": "max_pool", "Relu": "clip", "Clip": "clip",
        "Identity": "identity", "Dropout": "identity", "Flatten": "reshape", "Reshape": "reshape",
        "Transpose": "reshape", "Squeeze": "reshape", "Unsqueeze": "reshape", "Concat": "concat",
    }

    def _index_op(self, node: onnx.NodeProto) -> bool:
        """Compile ``node`` as shape arithmetic when it computes on shapes and integer constants only."""
        if node.op_type not in _INDEX_OPS or node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "Shape":
            source = self._value(node, 0)
            if isinstance(source, PendingConcat):
                raise DeployError(f"node {_label(node)} reads the shape of {node.input[0]!r}, a Concat of differently "
                                  "quantized inputs: quantize the Concat output first")
            names = [source.name]
        else:
            names, constants = [], {}
            for name in node.input:
                value = self.values.get(name)
                constant = self.view.constant(name) if name and value is None else None
                if isinstance(value, IndexTensor):
                    names.append(value.name)
                elif constant is not None and constant.dtype.kind in "iu":
                    constants[name] = constant
                    names.append(name)
                elif not name:
                    names.append("")
                else:
                    return False  # it reads quantized data: a data op, compiled by its handler
            self.constants.update(constants)
        attributes = {a.name: _jsonable(onnx.helper.get_attribute_value(a)) for a in node.attribute}
        out = self._out(node)
        self._emit(IndexOp(node.name, out, node.op_type, names, attributes))
        self.values[node.output[0]] = IndexTensor(out)
        return True

    def compile(self, source: str) -> tuple[list[Step], dict[str, str]]:
        """Compile every node; return the steps and, per graph output, the integer tensor it dequantizes."""
        if not self.view.nodes("QuantizeLinear") and not self.view.nodes("DequantizeLinear"):
            raise DeployError(f"{source}: the model has no quantized tensors (no QuantizeLinear/DequantizeLinear): "
                              "quantize it to QDQ first, e.g. onnxruntime.quantization.quantize_static(..., "
                              "quant_format=QuantFormat.QDQ) or micronet's export of a quantized model")
        for node in self.view.graph.node:
            if node.op_type == "Constant":
                continue  # GraphView serves its value as a constant
            if self._index_op(node):
                continue
            handler = self.HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if handler is None:
                raise DeployError(f"node {_label(node)} has no integer mapping: op type {node.op_type} cannot run in "
                                  "the integer-only reference; remove it from the quantized model or keep it outside")
            if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
                raise DeployError(f"node {_label(node)}: the Dropout mask has no integer mapping: export in eval mode")
            getattr(self, handler)(node)
        return self.steps, self._outputs()

    def _outputs(self) -> dict[str, str]:
        """Emit the final dequantizations; map each graph output to the integer tensor behind it (the ONNX
        name of a QuantizeLinear output, or the run-time name of an int32 accumulator)."""
        sources = {}
        for output in self.view.graph.output:
            name = output.name
            if name in self.quantized:  # an integer graph output: the codes themselves
                sources[name] = name
                continue
            value = self.values.get(name)
            if isinstance(value, Codes):
                self._emit(Dequantize(name, name, value.name, value.q.z(),
                                      np.atleast_1d(value.q.scale.astype(np.float32)), value.lo, value.hi))
            elif isinstance(value, Accumulator):
                self._emit(Dequantize(name, name, value.name, 0, np.atleast_1d(value.scale), value.lo, value.hi,
                                      value.divisor))
            else:
                raise DeployError(f"graph output {name!r} is not a quantized tensor: end the model with a "
                                  "DequantizeLinear (or a Conv/Gemm/pooling of quantized inputs)")
            producer = self.view.producer.get(name)
            dequantized = (producer is not None and producer.op_type == "DequantizeLinear"
                           and producer.input[0] in self.quantized)
            sources[name] = producer.input[0] if dequantized else value.name
        return sources


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None  # an unbounded Clip limit (standard JSON has no infinity); loading restores the default
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
