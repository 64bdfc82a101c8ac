"""ONNX Runtime's own post-training quantization: the baseline micronet's QDQ export is compared against.

The recipe is the one that is fast on x86 CPUs with ORT 1.32 (PEERS.md §6): ``quant_pre_process`` (shape
inference and graph cleanup), then ``quantize_static`` in QDQ format with per-channel symmetric int8
weights and asymmetric uint8 activations (U8S8; S8S8 is 1.3-3.8x slower), MinMax calibration. On CPUs
without VNNI (AVX2 only) ORT's u8s8 kernels saturate with 8-bit weights; ORT's documented remedy is
``reduce_range`` (7-bit weights), which is what ``reduce_range=None`` picks there.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from micronet.deploy.onnx.graph import GraphView, load_model
from micronet.errors import DeployError
from micronet.io import atomic_write


class _BatchReader(CalibrationDataReader):
    """Feeds the calibration batches to ORT's calibrator, one ``{input: batch}`` dict at a time."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self._feeds = iter([{name: batch} for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _float_batches(batches: Iterable, fixed_batch: int | None) -> list[np.ndarray]:
    arrays = []
    for batch in batches:
        if hasattr(batch, "detach"):  # a torch tensor
            batch = batch.detach().cpu().numpy()
        array = np.ascontiguousarray(batch, dtype=np.float32)
        if fixed_batch is not None and array.shape[0] != fixed_batch:
            raise DeployError(f"a calibration batch has {array.shape[0]} images but the model was exported with a fixed "
                              f"batch of {fixed_batch}: export with a dynamic batch or calibrate with batches of {fixed_batch}")
        arrays.append(array)
    if not arrays:
        raise DeployError("no calibration batches: pass a few batches of training images (e.g. 32-512 images)")
    return arrays


def quantize_with_onnxruntime(fp32_onnx_path: str | os.PathLike, out_path: str | os.PathLike,
                              calibration_batches: Iterable, per_channel: bool = True,
                              reduce_range: bool | None = None, calibrate_method: str = "minmax",
                              weight_bits: int = 8, activation_bits: int = 8) -> Path:
    """Write ORT's QDQ int8 version of ``fp32_onnx_path`` to ``out_path`` (atomically) and return the path.

    ``reduce_range``: 7-bit weights; None: on exactly the CPUs whose u8s8 kernels would saturate.
    ``calibrate_method``: ORT's activation range estimator (minmax, entropy, percentile, distribution);
    ``weight_bits`` / ``activation_bits``: 8, or 4 (ORT's int4 QDQ types, run by dequantizing to float)."""
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}
    if calibrate_method not in methods:
        raise DeployError(f"unknown ORT calibration method {calibrate_method!r}: choose one of {', '.join(methods)}")
    types = {(8, True): QuantType.QInt8, (8, False): QuantType.QUInt8, (4, True): QuantType.QInt4, (4, False): QuantType.QUInt4}
    if (weight_bits, True) not in types or (activation_bits, False) not in types:
        raise DeployError(f"ORT quantizes to 8 or 4 bits, not W{weight_bits}A{activation_bits}")
    if reduce_range is None:
        from micronet.machine import cpu_has_vnni

        reduce_range = not cpu_has_vnni()
    source = Path(fp32_onnx_path)
    view = GraphView(load_model(source))
    inputs = [i for i in view.graph.input if i.name in view.graph_inputs]
    if len(inputs) != 1:
        raise DeployError(f"{source} has {len(inputs)} inputs: ORT calibration here feeds image classifiers with one input")
    first_dim = inputs[0].type.tensor_type.shape.dim[0] if inputs[0].type.tensor_type.shape.dim else None
    fixed = first_dim.dim_value if first_dim is not None and first_dim.HasField("dim_value") else None
    batches = _float_batches(calibration_batches, fixed)
    with tempfile.TemporaryDirectory(prefix="micronet-ortq-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(source), str(prepared))
        except Exception as error:  # symbolic shape inference fails on some graphs; quantizing still works
            warnings.warn(f"ORT quant_pre_process failed on {source} ({type(error).__name__}: {error}); "
                          "quantizing the file as exported", stacklevel=2)
            prepared = source

        def write(path: Path) -> None:
            quantize_static(str(prepared), str(path), _BatchReader(inputs[0].name, batches),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=types[activation_bits, False], weight_type=types[weight_bits, True],
                            calibrate_method=methods[calibrate_method], reduce_range=reduce_range and weight_bits == 8,
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})

        return atomic_write(out_path, write)
