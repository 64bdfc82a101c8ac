"""ONNX: export of float and micronet-quantized models (FP32 or QDQ int8), and graph utilities."""

from micronet.deploy.onnx.export import EXPORTERS, ExportReport, export
from micronet.deploy.onnx.export_form import export_form
from micronet.deploy.onnx.graph import GraphView, attribute, load_model, opset_version, read_metadata

__all__ = ["EXPORTERS", "ExportReport", "GraphView", "attribute", "export", "export_form", "load_model", "opset_version", "read_metadata"]
