"""ONNX Runtime deployment: sessions with pinned threads, accuracy, latency, int8 coverage and ORT's own PTQ.

Importing this package imports onnxruntime; ``import micronet`` never does (the CLI imports it inside the
``evaluate --onnx`` and ``benchmark`` commands only).
"""

from micronet.deploy.onnxruntime.benchmark import BenchmarkResult, benchmark, machine_header, machine_info
from micronet.deploy.onnxruntime.coverage import CoverageReport, coverage_of_graph, int8_coverage
from micronet.deploy.onnxruntime.evaluate import evaluate, top1_agreement
from micronet.deploy.onnxruntime.ort_quantizer import quantize_with_onnxruntime
from micronet.deploy.onnxruntime.session import SaturatingKernelWarning, build_session, image_shape, run, runtime_label

__all__ = ["BenchmarkResult", "CoverageReport", "SaturatingKernelWarning", "benchmark", "build_session", "coverage_of_graph", "evaluate",
           "image_shape", "int8_coverage", "machine_header", "machine_info", "quantize_with_onnxruntime", "run",
           "runtime_label", "top1_agreement"]
