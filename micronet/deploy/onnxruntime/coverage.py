"""Int8 coverage: which nodes of the graph ONNX Runtime actually runs compute in int8, and which stay float.

A QDQ file only *asks* for int8; ORT decides at load time which DQ → op → Q groups it fuses into integer
kernels (QLinearConv, QGemm, QLinearAdd, ...). Whatever it does not fuse runs in float between a
DequantizeLinear and a QuantizeLinear, silently. So the report reads the graph ORT wrote after its own
optimizations (``optimized_model_filepath``), not the file on disk.

Level: ``"all"`` by default, because that is what :func:`~micronet.deploy.onnxruntime.benchmark.benchmark`
and a default ORT session run. Its graph has hardware-specific layout ops (NCHWc ``Conv (nchwc)``,
``NhwcMaxPool``, Transposes) and ORT warns that the saved file is not portable; we only read it.
``"extended"`` gives the portable graph, with the same int8 fusions but no layout changes.

Int8-ness is decided by op type for integer-only kernels and, for generic ops (MaxPool, Transpose,
Reshape, Flatten, ...), by the element type of the node's data input, propagated through the graph
(``onnx.shape_inference`` does not know ORT's contrib ops, so their output types come from the rules below).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
from onnx import TensorProto

from micronet.analysis import format_table
from micronet.deploy.onnx.graph import attribute
from micronet.deploy.onnxruntime.session import ModelSource, build_session

INT8_TYPES = frozenset({TensorProto.UINT8, TensorProto.INT8})
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})
# Kernels that only exist in integer form -> the index of their output zero point (the input before it is the
# output scale; without that scale the output is float, as for QGemm); None: a float or int32 result.
INTEGER_KERNELS: dict[str, int | None] = {
    "QLinearConv": 7, "QLinearMatMul": 7, "QLinearAdd": 7, "QLinearMul": 7, "QLinearAveragePool": 4,
    "QLinearGlobalAveragePool": 4, "QLinearConcat": 1, "QLinearLeakyRelu": 4, "QLinearSigmoid": 4,
    "QLinearSoftmax": 4, "QLinearReduceMean": 4, "QLinearWhere": 8, "QGemm": 8, "ConvInteger": None,
    "MatMulInteger": None, "MatMulIntegerToFloat": None, "DynamicQuantizeMatMul": None, "QAttention": None,
    "DynamicQuantizeLinear": None,
}
INT32_OUTPUT = frozenset({"ConvInteger", "MatMulInteger"})
INT8_COMPUTE = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger",
                          "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention"})
FLOAT_COMPUTE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul",
                           "NhwcFusedConv", "Attention"})
INT64_OUTPUT = frozenset({"Shape", "Size", "ArgMax", "ArgMin", "NonZero"})
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})


@dataclass
class CoverageReport:
    """Per op type, how many nodes run in int8 / float / neither (shape math on int64, unknown types)."""

    model: str
    optimization: str
    int8_ops: Counter = field(default_factory=Counter)
    float_ops: Counter = field(default_factory=Counter)
    other_ops: Counter = field(default_factory=Counter)
    float_compute_nodes: list[str] = field(default_factory=list)
    quantize_linear: int = 0
    dequantize_linear: int = 0

    @property
    def int8_compute(self) -> int:
        """Conv/Gemm/MatMul-class nodes running integer kernels."""
        return sum(n for op, n in self.int8_ops.items() if op in INT8_COMPUTE)

    @property
    def compute_coverage(self) -> float:
        """Share of Conv/Gemm/MatMul-class nodes that run in int8 (nan when there are none)."""
        total = self.int8_compute + len(self.float_compute_nodes)
        return self.int8_compute / total if total else float("nan")

    def summary(self) -> str:
        return (f"{self.model} as ONNX Runtime {ort.__version__} runs it (optimization {self.optimization}): "
                f"{self.int8_compute} of {self.int8_compute + len(self.float_compute_nodes)} Conv/Gemm/MatMul nodes "
                f"in int8; {self.quantize_linear} QuantizeLinear, {self.dequantize_linear} DequantizeLinear left")

    def to_text(self) -> str:
        ops = sorted(set(self.int8_ops) | set(self.float_ops) | set(self.other_ops))
        rows = [{"op": op, "int8": self.int8_ops.get(op, 0), "float": self.float_ops.get(op, 0),
                 "other": self.other_ops.get(op, 0)} for op in ops]
        floats = ", ".join(self.float_compute_nodes) if self.float_compute_nodes else "none"
        return f"{self.summary()}\n{format_table(rows)}\nfloat Conv/Gemm/MatMul nodes: {floats}"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "optimization": self.optimization, "onnxruntime": ort.__version__,
                "int8_ops": dict(self.int8_ops), "float_ops": dict(self.float_ops), "other_ops": dict(self.other_ops),
                "float_compute_nodes": list(self.float_compute_nodes), "int8_compute": self.int8_compute,
                "quantize_linear": self.quantize_linear, "dequantize_linear": self.dequantize_linear}


def _label(node: onnx.NodeProto) -> str:
    """``Conv`` for standard and com.microsoft ops, ``Conv (nchwc)`` for layout-specific domains."""
    return node.op_type if node.domain in STANDARD_DOMAINS else f"{node.op_type} ({node.domain.rsplit('.', 1)[-1]})"


def _seed_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types onnx knows: inputs, initializers, Constants and what standard shape inference derives."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # contrib ops or hardware-specific layouts can trip it; the rules below still apply
        inferred = model
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]
             if v.type.tensor_type.elem_type}
    types.update({init.name: init.data_type for init in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.data_type:
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def _output_types(node: onnx.NodeProto, types: dict[str, int]) -> list[int | None]:
    """Element types of ``node``'s outputs by rule (for ops shape inference left untyped)."""
    def of(index: int) -> int | None:
        return types.get(node.input[index]) if index < len(node.input) and node.input[index] else None

    op, first = node.op_type, next((types[i] for i in node.input if i in types), None)
    if op == "QuantizeLinear":
        out = of(2) or attribute(node, "output_dtype") or TensorProto.UINT8
    elif op == "DequantizeLinear":
        out = of(1) or TensorProto.FLOAT
    elif op == "DynamicQuantizeLinear":
        return [TensorProto.UINT8, TensorProto.FLOAT, TensorProto.UINT8]
    elif op in INT32_OUTPUT:
        out = TensorProto.INT32
    elif op in INTEGER_KERNELS:
        zero_point = INTEGER_KERNELS[op]
        quantized_output = zero_point is not None and len(node.input) >= zero_point and node.input[zero_point - 1]
        out = (of(zero_point) or TensorProto.UINT8) if quantized_output else TensorProto.FLOAT
    elif op in INT64_OUTPUT:
        out = TensorProto.INT64
    elif op == "Cast":
        out = attribute(node, "to")
    else:
        out = first
    return [out] * len(node.output)


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of the main graph that can be told statically."""
    types = _seed_types(model)
    for _ in range(3):  # saved graphs are topologically sorted; extra passes only guard against odd orders
        changed = False
        for node in model.graph.node:
            for name, elem in zip(node.output, _output_types(node, types)):
                if name and name not in types and elem:
                    types[name], changed = elem, True
        if not changed:
            break
    return types


def coverage_of_graph(model: onnx.ModelProto, name: str = "model", optimization: str = "as given") -> CoverageReport:
    """Coverage of ``model`` as it stands (call :func:`int8_coverage` for the graph ORT runs)."""
    report = CoverageReport(model=name, optimization=optimization)
    types = element_types(model)
    for node in model.graph.node:
        op, label = node.op_type, _label(node)
        if op == "QuantizeLinear":
            report.quantize_linear += 1
            continue
        if op == "DequantizeLinear":
            report.dequantize_linear += 1
            continue
        data = types.get(node.input[0]) if node.input and node.input[0] else None
        if op in INTEGER_KERNELS or op.startswith("QLinear") or data in INT8_TYPES:
            report.int8_ops[label] += 1
        elif data in FLOAT_TYPES:
            report.float_ops[label] += 1
            if op in FLOAT_COMPUTE:
                report.float_compute_nodes.append(node.name or node.output[0])
        else:
            report.other_ops[label] += 1
    return report


def int8_coverage(model: ModelSource, optimization: str = "all") -> CoverageReport:
    """Coverage of the graph ONNX Runtime runs for ``model`` at ``optimization`` (see the module notes)."""
    with tempfile.TemporaryDirectory(prefix="micronet-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        build_session(model, threads=1, optimization=optimization, optimized_model_path=optimized)
        graph = onnx.load(str(optimized))
    name = str(model) if isinstance(model, (str, Path)) else "the ONNX model"
    return coverage_of_graph(graph, name=name, optimization=optimization)
