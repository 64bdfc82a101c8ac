"""Expose intermediate tensors of an ONNX graph as graph outputs, so ONNX Runtime returns them.

Used to compare ONNX Runtime layer by layer with micronet's own references: the codes of every
QuantizeLinear (against the integer reference) and the inputs and outputs of every sign activation
(against the fake-quant model); and ONNX Runtime sessions whose int8 sums are exact on every x86 CPU.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from micronet.deploy.onnx import GraphView


def with_outputs(model: onnx.ModelProto, names: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns each tensor of ``names`` (name → ONNX element type)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    present = {out.name for out in model.graph.output}
    for name, dtype in names.items():
        if name not in present:
            model.graph.output.append(helper.make_tensor_value_info(name, dtype, None))
    return model


def with_quantized_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every QuantizeLinear output becomes a graph output, so ONNX Runtime returns its codes."""
    view = GraphView(model)
    return with_outputs(model, {node.output[0]: view.initializers[node.input[2]].data_type
                                for node in view.nodes("QuantizeLinear")})


def sign_activations(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(pre-sign value, ±1 output) of each binary sign the exporter writes as ``Sign(Sign(x) + 0.5)``, in
    graph order (the order in which the model calls its sign activations)."""
    view = GraphView(model)
    pairs = []
    for node in model.graph.node:  # integer form: QuantizeLinear → Clip on codes → DequantizeLinear (±1)
        clip = view.producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        quantize = view.producer.get(clip.input[0]) if clip is not None and clip.op_type == "Clip" else None
        if quantize is not None and quantize.op_type == "QuantizeLinear" and view.constant(node.input[2]) == 128:
            pairs.append((quantize.input[0], node.output[0]))
            continue
        add = view.producer.get(node.input[0]) if node.op_type == "Sign" else None
        inner = view.producer.get(add.input[0]) if add is not None and add.op_type == "Add" else None
        if inner is not None and inner.op_type == "Sign":
            pairs.append((inner.input[0], node.output[0]))
    return pairs


def with_sign_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    pairs = sign_activations(model)
    return with_outputs(model, {name: TensorProto.FLOAT for pair in pairs for name in pair}), pairs


def module_path(node_name: str) -> str:
    """The dotted module path of the torch module that wrote ``node_name``: the legacy exporter names
    nodes ``/layer1/layer1.0/conv1/input_quantizer/Clip`` (containers' children by full path, others by
    attribute) → ``layer1.0.conv1.input_quantizer``."""
    path = ""
    for part in node_name.strip("/").split("/")[:-1]:
        path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
    return path


def with_clipped_code_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Every ``Clip`` on integer codes (the export's narrow activation grids, e.g. DoReFa's) becomes a graph
    output; returns the model and {module path of the quantizer → its codes' tensor name}."""
    view = GraphView(model)
    codes = {}
    for node in view.nodes("Clip"):
        source = view.producer.get(node.input[0])
        if source is not None and source.op_type == "QuantizeLinear":
            codes[module_path(node.name)] = (node.output[0], view.initializers[source.input[2]].data_type)
    return with_outputs(model, dict(codes.values())), {path: name for path, (name, _) in codes.items()}


def unshared(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every Q/DQ node reads its own scale/zero-point initializers."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {init.name: init for init in model.graph.initializer}
    seen: collections.Counter = collections.Counter()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, name in enumerate(node.input):
            if name in initializers:
                seen[name] += 1
                if seen[name] > 1:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(initializers[name])
                    copy.name = f"{name}__{seen[name]}"
                    model.graph.initializer.append(copy)
                    node.input[k] = copy.name
    return model


def onnxruntime_session(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized_path=None):
    """A CPU session with ``session.x64quantprecision`` (MLAS's u8s8 kernels on CPUs without VNNI otherwise add
    product pairs in saturating int16), on an :func:`unshared` copy (that option trips an ONNX Runtime bug when
    Q/DQ nodes share scale/zero-point initializers)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.add_session_config_entry("session.x64quantprecision", "1")
    options.log_severity_level = 3
    if optimized_path:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(unshared(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnxruntime_codes(model: onnx.ModelProto, x: np.ndarray, **kwargs) -> dict[str, np.ndarray]:
    """ONNX Runtime's graph outputs and the codes of every quantized tensor (exact int32 sums: see
    :func:`onnxruntime_session`)."""
    model = with_quantized_outputs(model)
    session = onnxruntime_session(model, **kwargs)
    return dict(zip([out.name for out in session.get_outputs()], session.run(None, {"input": x})))
