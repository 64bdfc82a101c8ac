"""Will TensorRT run this QDQ ONNX in INT8? A graph-level check that needs neither TensorRT nor a GPU.

TensorRT builds a QDQ ONNX by *explicit quantization*: it runs a layer in INT8 only where the Q/DQ nodes say
so, and silently keeps the rest in float. A graph that ONNX Runtime runs happily can therefore give a TensorRT
engine that is no faster than FP16 (NVIDIA/TensorRT#1992, #3861: the residual Add of a ResNet is left in
float when its identity input has no Q/DQ, which also blocks the conv+add fusion), or that falls back to float
with "missing scale" warnings (#993), or that fails to parse (uint8 or asymmetric zero points, int32 biases).
The rules below encode what TensorRT 10 needs; each violation names the node and says what to change.

Rule ids (severity error unless marked):

* ``no-qdq``: the model has no QuantizeLinear/DequantizeLinear at all (an FP32 ONNX); nothing else is checked.
* ``opset``: the default-domain opset is at least 13 (per-channel QuantizeLinear/DequantizeLinear).
* ``input-qdq``: every activation input of a Conv, ConvTranspose, Gemm or MatMul comes from a DequantizeLinear.
* ``weight-qdq``: every weight input comes from a DequantizeLinear of a constant int8 tensor.
* ``weight-prequantized`` (warning): the weight DequantizeLinear reads a QuantizeLinear of a *float* constant.
  TensorRT 10 accepts it (it quantizes the weights at build time), but the file stores float weights (4× larger)
  and TensorRT's rounding, not the exporter's, decides the codes. Store int8 weights to make the ONNX and the
  engine use the same integers.
* ``zero-point``: every QuantizeLinear/DequantizeLinear zero point is int8 and all zeros: TensorRT supports
  symmetric signed INT8 only. A missing QuantizeLinear zero point means uint8 (the ONNX default) and is flagged;
  so is an int32 DequantizeLinear (a quantized bias: TensorRT dequantizes INT8 only, keep biases float).
  Source: onnx/onnx-tensorrt docs/operators.md (TensorRT 10.x: DequantizeLinear takes INT8/FP8/FP4/INT4 and
  ``x_zero_point`` must be zero; QuantizeLinear ``y_zero_point`` must be 0; UINT8 only as network I/O).
* ``scale-value``: every scale is a constant, finite and positive.
* ``activation-scale``: activation Q/DQ use one scale (TensorRT quantizes activations per tensor).
* ``weight-axis``: weight scales are per tensor, or per channel along the output-channel axis (Conv: 0,
  ConvTranspose: 1, Gemm: 0 with transB=1 else 1, MatMul: the last axis).
* ``residual-add``: an Add of two computed tensors gets both inputs from DequantizeLinear; one input may come
  straight from a Conv/ConvTranspose/Gemm/MatMul, which TensorRT fuses the Add into with the other (quantized)
  input as its INT8 residual (#1992). Any other float input keeps the Add, and its producer, in float.
* ``concat-scale``: every computed input of a Concat whose output feeds a QuantizeLinear comes from a
  DequantizeLinear, so no tensor reaches a quantized op without a scale (#993).
* ``concat-shared-scale`` (warning): those inputs carry the same scale as the Concat's output QuantizeLinear;
  otherwise TensorRT requantizes each input before concatenating.

``RulesReport.ok`` is true when no error-level rule is violated; warnings do not stop a build.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from micronet.deploy.onnx.graph import GraphView, attribute, load_model, opset_version

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
MIN_OPSET = 13

RULES = {
    "no-qdq": "the model holds Q/DQ nodes",
    "opset": f"opset >= {MIN_OPSET}",
    "input-qdq": "activation inputs of Conv/ConvTranspose/Gemm/MatMul come from DequantizeLinear",
    "weight-qdq": "weights come from DequantizeLinear of a constant int8 tensor",
    "weight-prequantized": "weights are stored as int8, not as float behind a QuantizeLinear (warning)",
    "zero-point": "Q/DQ zero points are int8 zeros (symmetric signed INT8)",
    "scale-value": "scales are constant, finite and positive",
    "activation-scale": "activations are quantized per tensor",
    "weight-axis": "weight scales are per tensor or per output channel",
    "residual-add": "both inputs of a residual Add are quantized (NVIDIA/TensorRT#1992)",
    "concat-scale": "inputs of a quantized Concat are quantized (NVIDIA/TensorRT#993)",
    "concat-shared-scale": "inputs of a quantized Concat share the output's scale (warning)",
}
WARNING_RULES = frozenset({"weight-prequantized", "concat-shared-scale"})


@dataclass(frozen=True)
class Violation:
    """One broken rule at one node: ``rule`` is an id of :data:`RULES`, ``node`` the ONNX node's name."""

    rule: str
    node: str
    message: str

    @property
    def severity(self) -> str:
        return "warning" if self.rule in WARNING_RULES else "error"


@dataclass
class RulesReport:
    """All violations of one model, plus how many nodes of each kind were checked."""

    violations: list[Violation] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == "error"]

    @property
    def warnings(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def rules(self) -> Counter:
        """How many times each rule id was violated."""
        return Counter(v.rule for v in self.violations)

    def to_text(self) -> str:
        counts = ", ".join(f"{n} {op}" for op, n in self.checked.items() if n)
        head = (f"TensorRT INT8 rules: {'OK' if self.ok else 'FAILED'}, {len(self.errors)} error(s), "
                f"{len(self.warnings)} warning(s) (checked {counts or 'nothing'})")
        lines = [f"  {v.severity:<7} {v.rule:<20} {v.message}" for v in self.violations]
        return "\n".join([head, *lines])


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type} → {node.output[0]}>"


def _describe(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{_label(node)}'"


class _Checker:
    """Walks one graph; each ``rule_*`` method appends violations."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.view = GraphView(model)
        self.violations: list[Violation] = []

    # ------------------------------------------------------------------ graph helpers
    def flag(self, rule: str, node: onnx.NodeProto | str, message: str) -> None:
        name = node if isinstance(node, str) else _label(node)
        self.violations.append(Violation(rule, name, message))

    def producer(self, name: str) -> onnx.NodeProto | None:
        """The node computing ``name``, looking through Identity (the legacy exporter aliases constants)."""
        node = self.view.producer.get(name)
        while node is not None and node.op_type == "Identity" and not self.view.is_constant(name):
            name = node.input[0]
            node = self.view.producer.get(name)
        return None if self.view.is_constant(name) else node

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant (through Identity aliases), else None."""
        while not self.view.is_constant(name):
            node = self.view.producer.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return self.view.constant(name)

    def is_fixed(self, name: str) -> bool:
        """Whether ``name`` is known at build time: a constant, or a DequantizeLinear of constant weights."""
        if self.constant(name) is not None:
            return True
        node = self.producer(name)
        return node is not None and node.op_type == "DequantizeLinear" and self.weight_source(node) is not None

    def from_source(self, name: str) -> str:
        node = self.producer(name)
        if node is not None:
            return f"from {_describe(node)}"
        return "a graph input" if name in self.view.graph_inputs else "a constant"

    def weight_source(self, dq: onnx.NodeProto) -> tuple[str, np.ndarray] | None:
        """For a weight DequantizeLinear: ("int", codes) when it reads a constant, ("float", weights) when it
        reads a QuantizeLinear of a constant, None otherwise."""
        codes = self.constant(dq.input[0])
        if codes is not None:
            return "int", codes
        q = self.producer(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            weights = self.constant(q.input[0])
            if weights is not None:
                return "float", weights
        return None

    def quantized_dtype(self, node: onnx.NodeProto) -> np.dtype | None:
        """The integer type of a Q's output / a DQ's input (None when it cannot be told statically)."""
        if len(node.input) > 2 and node.input[2]:
            zero_point = self.constant(node.input[2])
            return None if zero_point is None else zero_point.dtype
        if node.op_type == "QuantizeLinear":
            output_dtype = attribute(node, "output_dtype", 0)  # opset 21; the default is uint8
            return np.dtype(helper.tensor_dtype_to_np_dtype(output_dtype)) if output_dtype else np.dtype(np.uint8)
        codes = self.constant(node.input[0])
        if codes is not None:
            return codes.dtype
        q = self.producer(node.input[0])
        return self.quantized_dtype(q) if q is not None and q.op_type == "QuantizeLinear" else None

    # ------------------------------------------------------------------ rules
    def rule_opset(self) -> None:
        version = opset_version(self.model)
        if version < MIN_OPSET:
            self.flag("opset", "model", f"the model uses opset {version}: TensorRT's per-channel Q/DQ needs opset "
                                        f">= {MIN_OPSET}: export again with opset_version={MIN_OPSET} or newer")

    def rule_qdq_nodes(self) -> None:
        for node in self.view.graph.node:
            if node.op_type not in QDQ_OPS:
                continue
            self._check_zero_point(node)
            self._check_scale(node)

    def _check_zero_point(self, node: onnx.NodeProto) -> None:
        what = _describe(node)
        has_zero_point = len(node.input) > 2 and bool(node.input[2])
        zero_point = self.constant(node.input[2]) if has_zero_point else None
        if has_zero_point and zero_point is None:
            self.flag("zero-point", node, f"{what} has a computed zero point: TensorRT needs a constant int8 zero "
                                          "point 0: make it an initializer")
            return
        dtype = self.quantized_dtype(node)
        if dtype is None:
            return
        if dtype == np.int32 and node.op_type == "DequantizeLinear":
            self.flag("zero-point", node, f"{what} dequantizes an int32 tensor (a quantized bias): TensorRT "
                                          "dequantizes INT8 only: keep biases float (e.g. ONNX Runtime quantize_static: "
                                          "extra_options={'QuantizeBias': False})")
        elif dtype != np.int8:
            hint = (" (a QuantizeLinear without zero point outputs uint8)"
                    if not has_zero_point and node.op_type == "QuantizeLinear" else "")
            self.flag("zero-point", node, f"{what} uses {dtype} codes{hint}: TensorRT supports symmetric signed INT8 "
                                          "only: quantize to int8 with zero point 0 (ONNX Runtime: QuantType.QInt8 "
                                          "with ActivationSymmetric/WeightSymmetric; micronet: activation_dtype='int8')")
        elif zero_point is not None and np.any(zero_point != 0):
            self.flag("zero-point", node, f"{what} has non-zero zero points (asymmetric quantization): TensorRT "
                                          "supports symmetric INT8 only: use zero point 0 (symmetric ranges)")

    def _check_scale(self, node: onnx.NodeProto) -> None:
        what = _describe(node)
        scale = self.constant(node.input[1])
        if scale is None:
            self.flag("scale-value", node, f"{what} has a computed scale: TensorRT needs build-time scales: make "
                                           "the scale an initializer")
            return
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            self.flag("scale-value", node, f"{what} has a zero, negative or non-finite scale (min {scale.min():.3g}): "
                                           "recalibrate; a scale must be a positive finite number")
        weight_path = (self.constant(node.input[0]) is not None if node.op_type == "QuantizeLinear"
                       else self.weight_source(node) is not None)
        if not weight_path and scale.size > 1:
            self.flag("activation-scale", node, f"{what} quantizes an activation with {scale.size} scales: TensorRT "
                                                "quantizes activations per tensor: use a single scale")

    def rule_weighted_ops(self) -> None:
        for node in self.view.graph.node:
            if node.op_type in WEIGHTED_OPS:
                self._check_weighted(node)

    def _weight_input_is_constant(self, node: onnx.NodeProto) -> bool:
        if len(node.input) < 2:
            return False
        return self.is_fixed(node.input[1])

    def _check_weighted(self, node: onnx.NodeProto) -> None:
        activations = [node.input[0]]
        if node.op_type in ("Gemm", "MatMul") and not self._weight_input_is_constant(node):
            activations.append(node.input[1])  # e.g. attention: both operands are activations
        else:
            self._check_weight(node)
        for name in activations:
            producer = self.producer(name)
            if producer is None or producer.op_type != "DequantizeLinear":
                self.flag("input-qdq", node, f"{_describe(node)}: its input '{name}' ({self.from_source(name)}) has "
                                             "no DequantizeLinear, so TensorRT runs the layer in float: insert "
                                             "QuantizeLinear→DequantizeLinear (int8) in front of it")

    def _check_weight(self, node: onnx.NodeProto) -> None:
        what = _describe(node)
        name = node.input[1] if len(node.input) > 1 else ""
        dq = self.producer(name) if name else None
        if dq is None or dq.op_type != "DequantizeLinear":
            source = "float constants" if name and self.constant(name) is not None else f"'{name}' ({self.from_source(name)})"
            self.flag("weight-qdq", node, f"{what}: its weights are {source} without DequantizeLinear, so TensorRT "
                                          "runs the layer in float: store int8 weights behind a DequantizeLinear "
                                          "(per output channel)")
            return
        source = self.weight_source(dq)
        if source is None:
            self.flag("weight-qdq", node, f"{what}: its weight DequantizeLinear '{_label(dq)}' reads a computed "
                                          "tensor: TensorRT needs constant weights: store them as an int8 initializer")
            return
        kind, weights = source
        if kind == "float":
            self.flag("weight-prequantized", node, f"{what}: its weights are float constants quantized by a "
                                                   "QuantizeLinear inside the graph: store the int8 codes as the "
                                                   "initializer (4× smaller file, the same integers in ONNX and engine)")
        self._check_weight_axis(node, dq, weights)

    def _check_weight_axis(self, node: onnx.NodeProto, dq: onnx.NodeProto, weights: np.ndarray) -> None:
        scale = self.constant(dq.input[1])
        if scale is None or scale.size <= 1:
            return  # per tensor (or a computed scale, reported by scale-value)
        rank = weights.ndim
        axis = attribute(dq, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        expected = {"Conv": 0, "ConvTranspose": 1, "MatMul": rank - 1}.get(node.op_type)
        if node.op_type == "Gemm":
            expected = 0 if attribute(node, "transB", 0) else 1
        channels = weights.shape[expected] if 0 <= expected < rank else None
        if axis != expected or scale.size != channels:
            self.flag("weight-axis", dq, f"{_describe(dq)} scales the weights of {_describe(node)} with {scale.size} "
                                         f"scales along axis {axis}, but its output channels ({channels}) are axis "
                                         f"{expected}: quantize per output channel (axis={expected}) or per tensor")

    def rule_residual_add(self) -> None:
        for node in self.view.nodes("Add"):
            computed = [name for name in node.input if not self.is_fixed(name)]
            if len(computed) < 2:
                continue  # a bias add or a constant offset, not a residual
            producers = [self.producer(name) for name in computed]
            fusable = sum(1 for p in producers if p is not None and p.op_type in WEIGHTED_OPS)
            for name, producer in zip(computed, producers):
                if producer is not None and producer.op_type == "DequantizeLinear":
                    continue
                if producer is not None and producer.op_type in WEIGHTED_OPS and fusable == 1:
                    continue  # TensorRT fuses the Add into this layer, the other input is its INT8 residual
                self.flag("residual-add", node, f"{_describe(node)}: its input '{name}' ({self.from_source(name)}) "
                                                "is not quantized, so TensorRT keeps the Add in float and cannot fuse "
                                                "it into the convolution (NVIDIA/TensorRT#1992): insert "
                                                "QuantizeLinear→DequantizeLinear on it (the identity branch too)")

    def rule_concat(self) -> None:
        for node in self.view.nodes("Concat"):
            output_q = [c for c in self.view.consumers[node.output[0]] if c.op_type == "QuantizeLinear"]
            if not output_q:
                continue
            scales = []
            for name in node.input:
                if self.is_fixed(name):
                    continue
                producer = self.producer(name)
                if producer is None or producer.op_type != "DequantizeLinear":
                    self.flag("concat-scale", node, f"{_describe(node)} feeds QuantizeLinear '{_label(output_q[0])}' "
                                                    f"but its input '{name}' ({self.from_source(name)}) has no scale, so "
                                                    "TensorRT falls back to float there (NVIDIA/TensorRT#993): insert "
                                                    "QuantizeLinear→DequantizeLinear on every Concat input")
                    scales = None
                elif scales is not None:
                    scales.append(self.constant(producer.input[1]))
            out_scale = self.constant(output_q[0].input[1])
            if scales and out_scale is not None and any(s is None or not np.allclose(s, out_scale) for s in scales):
                self.flag("concat-shared-scale", node, f"{_describe(node)}: its inputs' scales differ from its output "
                                                       "scale, so TensorRT requantizes each input: give all Concat "
                                                       "inputs the output's scale")


def check_tensorrt_qdq(model: onnx.ModelProto | str | os.PathLike) -> RulesReport:
    """Check a QDQ ONNX (a ModelProto or a path) against TensorRT 10's explicit-quantization rules.

    A missing or non-ONNX path raises :class:`~micronet.errors.DeployError`; broken rules never raise, they
    are listed in the returned :class:`RulesReport` (see the module docstring for each rule id).
    """
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model, check=False)
    checker = _Checker(model)
    counts = checker.view.op_counts()
    report = RulesReport(checked={op: counts.get(op, 0) for op in (*WEIGHTED_OPS, *QDQ_OPS, "Add", "Concat")})
    checker.rule_opset()
    if not any(counts.get(op, 0) for op in QDQ_OPS):
        checker.flag("no-qdq", "model", "the model holds no QuantizeLinear/DequantizeLinear (an FP32 ONNX): export a "
                                        "QDQ model, or let TensorRT calibrate it (precision='int8' with a calibrator)")
    else:
        checker.rule_qdq_nodes()
        checker.rule_weighted_ops()
        checker.rule_residual_add()
        checker.rule_concat()
    report.violations = checker.violations
    return report


__all__ = ["RULES", "RulesReport", "Violation", "check_tensorrt_qdq"]
