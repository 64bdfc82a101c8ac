"""Read-only views of an ONNX graph shared by the exporter's passes, the runtime reports and the checks.

:func:`load_model` is the one place that opens a user's ONNX file, so every command gives the same clear
error for a missing file or a file that is not ONNX.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from micronet.errors import DeployError


def load_model(path: str | os.PathLike, check: bool = True) -> onnx.ModelProto:
    """Load and (by default) check an ONNX file; raise :class:`DeployError` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"{path}: no such ONNX file (export one with: micronet export --checkpoint DIR --out {path})")
    try:
        model = onnx.load(str(path))
    except Exception as error:  # protobuf raises DecodeError, RuntimeWarning or ValueError depending on the bytes
        raise DeployError(f"{path}: not an ONNX model ({type(error).__name__}): pass a .onnx file written by an exporter") from None
    if not model.graph.node:
        raise DeployError(f"{path}: not an ONNX model (the file parsed but holds no graph): pass a .onnx file written by an exporter")
    if check:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as error:
            first = str(error).strip().splitlines()[0]
            raise DeployError(f"{path}: invalid ONNX model: {first}") from None
    return model


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's ``metadata_props`` (micronet's exports record ``micronet.dataset`` and ``micronet.model``)."""
    return {entry.key: entry.value for entry in load_model(path, check=False).metadata_props}


class GraphView:
    """Producer/consumer maps and constant lookup over ``model.graph`` (the main graph only)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        for node in self.graph.node:  # Constant nodes count as constants too
            if node.op_type == "Constant" and node.attribute:
                self.initializers.setdefault(node.output[0], node.attribute[0].t)
        self.graph_outputs = {out.name for out in self.graph.output}
        self.graph_inputs = {inp.name for inp in self.graph.input} - set(self.initializers)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, or None when ``name`` is computed."""
        tensor = self.initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def is_constant(self, name: str) -> bool:
        return name in self.initializers

    def op_counts(self) -> Counter:
        return Counter(node.op_type for node in self.graph.node)

    def nodes(self, op_type: str) -> list[onnx.NodeProto]:
        return [node for node in self.graph.node if node.op_type == op_type]


def attribute(node: onnx.NodeProto, name: str, default=None):
    """An attribute's Python value (ints, floats, lists) or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def opset_version(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise DeployError("the ONNX model imports no default-domain opset")
