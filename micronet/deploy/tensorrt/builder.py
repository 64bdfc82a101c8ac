"""ONNX → serialized TensorRT 10 engine (FP32, FP16 or INT8), with a batch range taken from the ONNX input.

Everything that can be checked without TensorRT (the file, the precision, the batch range, calibrator versus
QDQ graph) is checked first, so a wrong call fails the same way on a machine without a GPU.

INT8 comes in two forms:

* a **QDQ ONNX** (QuantizeLinear/DequantizeLinear nodes, e.g. from micronet's exporter with
  ``activation_dtype="int8"`` or ONNX Runtime's ``quantize_static``): *explicit quantization*. TensorRT uses the
  graph's scales; no calibrator is needed and one is refused. Check the graph first with
  :func:`~micronet.deploy.tensorrt.check_tensorrt_qdq`: a Q/DQ placement TensorRT cannot fuse builds fine but
  runs partly in float (NVIDIA/TensorRT#1992).
* an **FP32 ONNX** plus a calibrator: *implicit quantization*, TensorRT measures the activation ranges itself
  (entropy calibration). TensorRT 10.1 deprecates it and TensorRT 11 removes it (and the INT8/FP16 builder
  flags: TensorRT 11 networks are strongly typed); prefer a QDQ export.

Both INT8 forms set ``BuilderFlag.INT8`` on a (weakly typed) network, the TensorRT 8.6–10 way to enable Q/DQ
layers; TensorRT 10 also accepts strongly typed networks for QDQ graphs, which micronet does not use yet.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx

from micronet.deploy.onnx.graph import GraphView, load_model
from micronet.deploy.tensorrt._support import make_logger, require_tensorrt
from micronet.deploy.tensorrt.calibrator import CalibrationFeeder, make_entropy_calibrator
from micronet.errors import DeployError
from micronet.io import atomic_write

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MAX_BATCH = 32
DEFAULT_WORKSPACE_MB = 1024


@dataclass(frozen=True)
class InputSpec:
    """One network input: its name and shape, with None for the dynamic batch dimension."""

    name: str
    shape: tuple[int | None, ...]

    @property
    def dynamic_batch(self) -> bool:
        return self.shape[0] is None


@dataclass(frozen=True)
class BatchRange:
    """The (min, opt, max) batch of the optimization profile; all equal for a static-batch ONNX."""

    min: int
    opt: int
    max: int

    def shape(self, spec: InputSpec, batch: int) -> tuple[int, ...]:
        return (batch, *spec.shape[1:])


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The ONNX inputs (initializers excluded); only the batch dimension may be dynamic."""
    view = GraphView(model)
    specs = []
    for value in model.graph.input:
        if value.name not in view.graph_inputs:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)
        if not shape:
            raise DeployError(f"the ONNX input '{value.name}' has no shape: export with an example input")
        if any(d is None for d in shape[1:]):
            raise DeployError(f"the ONNX input '{value.name}' has shape {['?' if d is None else d for d in shape]} with "
                              "a dynamic dimension other than the batch: export with a fixed image size")
        specs.append(InputSpec(value.name, shape))
    if not specs:
        raise DeployError("the ONNX model has no inputs: export the model with an example input")
    return specs


def batch_range(specs: list[InputSpec], min_batch: int, opt_batch: int | None, max_batch: int | None) -> BatchRange:
    """The profile's batch range: the requested one for a dynamic batch, the exported one for a static batch."""
    static = {spec.shape[0] for spec in specs if not spec.dynamic_batch}
    if static:
        if len(static) > 1 or any(spec.dynamic_batch for spec in specs):
            raise DeployError(f"the ONNX inputs disagree on the batch size ({sorted(static)} and dynamic): export "
                              "them with one batch dimension")
        fixed = static.pop()
        for label, asked in (("max_batch", max_batch), ("opt_batch", opt_batch)):
            if asked is not None and asked != fixed:
                raise DeployError(f"the ONNX input has a fixed batch of {fixed} but {label}={asked} was asked: export "
                                  f"with a dynamic batch (dynamic_batch=True) or leave {label} at {fixed}")
        return BatchRange(fixed, fixed, fixed)
    high = max(DEFAULT_MAX_BATCH, min_batch) if max_batch is None else max_batch
    opt = high if opt_batch is None else opt_batch
    if not 1 <= min_batch <= opt <= high:
        raise DeployError(f"batch range min={min_batch}, opt={opt}, max={high} is invalid: "
                          "use 1 <= min_batch <= opt_batch <= max_batch")
    return BatchRange(min_batch, opt, high)


def is_qdq(model: onnx.ModelProto) -> bool:
    """Whether the graph is already quantized (holds QuantizeLinear/DequantizeLinear nodes)."""
    counts = GraphView(model).op_counts()
    return bool(counts.get("QuantizeLinear", 0) or counts.get("DequantizeLinear", 0))


def _check_precision(precision: str, qdq: bool, calibrator) -> None:
    if precision not in PRECISIONS:
        raise DeployError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if qdq and precision != "int8":
        raise DeployError(f"the ONNX holds QuantizeLinear/DequantizeLinear nodes (an INT8 model) but precision="
                          f"{precision!r} was asked: build it with precision='int8', or export an FP32 ONNX")
    if calibrator is not None and precision != "int8":
        raise DeployError(f"a calibrator is only used for precision='int8' (got {precision!r}): drop the calibrator")
    if qdq and calibrator is not None:
        raise DeployError("the ONNX is already quantized (Q/DQ nodes): TensorRT uses its scales (explicit "
                          "quantization), so drop the calibrator")
    if precision == "int8" and not qdq and calibrator is None:
        raise DeployError("INT8 from an FP32 ONNX needs calibration data: pass calibrator=CalibrationFeeder(batches, "
                          "cache_path=...), or export a QDQ ONNX (explicit quantization, preferred in TensorRT 10)")


def _check_calibration_shape(feeder: CalibrationFeeder, specs: list[InputSpec]) -> tuple[int, ...] | None:
    """The calibration batch shape, checked against the ONNX input (None when calibrating from a cache)."""
    shape = feeder.batch_shape
    if shape is None:
        return None
    if len(specs) != 1:
        raise DeployError(f"the ONNX has {len(specs)} inputs: micronet calibrates single-input image classifiers only")
    expected = specs[0].shape
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        raise DeployError(f"calibration batches have shape {list(shape)} but the ONNX input '{specs[0].name}' is "
                          f"{['batch' if d is None else d for d in expected]}: calibrate with images of the exported size")
    return shape


def _parse(trt, builder, logger, path: Path):
    network = builder.create_network(0)  # TensorRT 10: every network is explicit-batch; the flag is deprecated
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)] or ["no error recorded"]
        raise DeployError(f"TensorRT {trt.__version__} cannot parse {path} ({len(errors)} error(s): "
                          f"{' | '.join(errors)}): export with a supported opset/operators and check it with "
                          "micronet.deploy.tensorrt.check_tensorrt_qdq")
    return network, parser


def _add_profile(builder, config, specs: list[InputSpec], batches: BatchRange, calibration_shape):
    """One optimization profile over the batch range (TensorRT needs one whenever a dimension is dynamic), and
    for implicit INT8 a calibration profile fixed at the calibration batch shape."""
    if not any(spec.dynamic_batch for spec in specs):
        return
    profile = builder.create_optimization_profile()
    for spec in specs:
        profile.set_shape(spec.name, batches.shape(spec, batches.min), batches.shape(spec, batches.opt),
                          batches.shape(spec, batches.max))
    config.add_optimization_profile(profile)
    if calibration_shape is not None:
        calibration = builder.create_optimization_profile()
        calibration.set_shape(specs[0].name, calibration_shape, calibration_shape, calibration_shape)
        config.set_calibration_profile(calibration)


def build_engine(
    onnx_path: str | os.PathLike,
    precision: str = "fp32",
    *,
    calibrator: CalibrationFeeder | object | None = None,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    fp16_fallback: bool = False,
    engine_path: str | os.PathLike | None = None,
    verbose: bool = False,
) -> bytes:
    """Build a TensorRT engine from an ONNX file and return it serialized (also written to ``engine_path``).

    ``precision``: "fp32"; "fp16" (FP16 kernels allowed); "int8": explicit quantization for a QDQ ONNX (no
    calibrator), implicit quantization for an FP32 ONNX with ``calibrator`` (a :class:`CalibrationFeeder`, or
    any ready ``tensorrt.IInt8Calibrator``), deprecated since TensorRT 10.1. ``fp16_fallback``: with INT8, let
    the layers left in float run in FP16. Batch: a dynamic-batch ONNX gets one profile
    ``min_batch <= opt_batch <= max_batch`` (defaults 1, max_batch, 32); a static-batch ONNX keeps its batch and
    refuses another ``max_batch``/``opt_batch``. ``workspace_mb`` caps the scratch memory of a layer's tactic.
    The engine file is written atomically. A user-fixable problem raises :class:`DeployError`.
    """
    path = Path(onnx_path)
    model = load_model(path, check=False)
    qdq = is_qdq(model)
    _check_precision(precision, qdq, calibrator)
    specs = input_specs(model)
    batches = batch_range(specs, min_batch, opt_batch, max_batch)
    if workspace_mb < 1:
        raise DeployError(f"workspace_mb={workspace_mb} is invalid: give TensorRT at least 1 MB of workspace")
    feeder = calibrator if isinstance(calibrator, CalibrationFeeder) else None
    calibration_shape = None
    if feeder is not None:  # calibrate at the batches' shape, or at opt when only the cache will be read
        calibration_shape = _check_calibration_shape(feeder, specs) or batches.shape(specs[0], batches.opt)

    trt = require_tensorrt()
    logger = make_logger(trt, verbose)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, path)  # the parser must outlive the build
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision == "fp16" or (precision == "int8" and fp16_fallback):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if calibrator is not None:
            warnings.warn("INT8 calibration of an FP32 ONNX (implicit quantization) is deprecated since TensorRT "
                          "10.1 and removed in TensorRT 11: prefer a QDQ export", FutureWarning, stacklevel=2)
            config.int8_calibrator = make_entropy_calibrator(feeder) if feeder is not None else calibrator
    _add_profile(builder, config, specs, batches, calibration_shape)

    serialized = builder.build_serialized_network(network, config)
    if feeder is not None and feeder.error is not None:
        raise feeder.error
    if serialized is None:
        raise DeployError(f"TensorRT {trt.__version__} could not build an engine from {path} (its log above says "
                          "why): check the ONNX with check_tensorrt_qdq, or raise workspace_mb")
    data = bytes(serialized)
    if engine_path is not None:
        atomic_write(engine_path, lambda tmp: tmp.write_bytes(data))
    return data


__all__ = ["BatchRange", "InputSpec", "PRECISIONS", "batch_range", "build_engine", "input_specs", "is_qdq"]
