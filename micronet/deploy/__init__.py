"""Deployment: ONNX export (FP32 and QDQ int8), ONNX Runtime, integer-only reference, TensorRT.

Subpackages are imported on demand so that ``import micronet`` never needs onnx, onnxruntime or TensorRT.
"""
