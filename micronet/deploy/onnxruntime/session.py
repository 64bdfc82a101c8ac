"""One way to open an ONNX file in ONNX Runtime, so that evaluation, benchmarks and the coverage report
measure the same thing: CPU provider, pinned thread counts, sequential execution, a named optimization level.

Threads are pinned (``intra_op_num_threads=threads``, ``inter_op_num_threads=1``) because ORT's default
takes every core, which makes timings on a shared machine meaningless and hides the 1- vs 2-thread gain.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort

from micronet.deploy.onnx.export import TARGET_KEY
from micronet.deploy.onnx.graph import load_model
from micronet.deploy.targets import TARGETS
from micronet.errors import ConfigError, DeployError

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
ModelSource = str | os.PathLike | bytes | onnx.ModelProto


INT8_KERNEL_LEVELS = ("extended", "all")  # the levels at which ORT fuses Q/DQ pairs into its int8 kernels


class SaturatingKernelWarning(UserWarning):
    """A file exported for VNNI CPUs runs on ONNX Runtime's int8 kernels on a CPU without VNNI."""


def _source_bytes_or_path(model: ModelSource) -> tuple[str | bytes, str, onnx.ModelProto]:
    """(what ORT opens, a name for messages, the parsed model); a path is checked first for a clear
    missing/not-ONNX error."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString(), "the ONNX model", model
    if isinstance(model, bytes):
        return model, "the ONNX model", onnx.ModelProto.FromString(model)
    proto = load_model(model, check=False)  # raises DeployError naming a missing file or one that is not ONNX
    return str(model), str(model), proto


def warn_if_saturating(proto: onnx.ModelProto, label: str, optimization: str) -> None:
    """Warn when a file exported for ``--target vnni`` (8-bit weights) is about to run on ONNX Runtime's
    int8 kernels on a CPU without VNNI: there its u8s8 kernels add pairs of uint8×int8 products in
    saturating int16, and the outputs are no longer those of the quantized model (on an AVX2 machine a
    W8A8 NIN's top-1 class changed on 9% of test images). The Q/DQ nodes computed in float (``basic``) are
    exact on every CPU."""
    from micronet import machine

    name = next((entry.value for entry in proto.metadata_props if entry.key == TARGET_KEY), None)
    target = TARGETS.get(name)
    if target is not None and target.needs_vnni and optimization in INT8_KERNEL_LEVELS and not machine.cpu_has_vnni():
        warnings.warn(f"{label} was exported with --target {name} (8-bit weights) but this CPU "
                      f"({machine.cpu_class()}) has no VNNI: ONNX Runtime's int8 kernels saturate here and the outputs "
                      "differ from the quantized model's; export with --target portable, which is exact on every CPU",
                      SaturatingKernelWarning, stacklevel=3)


def build_session(model: ModelSource, threads: int = 1, optimization: str = "all",
                  optimized_model_path: str | os.PathLike | None = None, runtime: str = "onnxruntime") -> ort.InferenceSession:
    """An ORT CPU session of ``model`` (a path, serialized bytes or a ModelProto) with pinned threads.

    ``runtime="openvino"``: the file compiled by OpenVINO instead (a path; same interface, see
    :mod:`micronet.deploy.openvino`).

    ``optimized_model_path`` makes ORT write the graph it actually runs (after its fusions) there; at
    ``optimization="all"`` that graph holds hardware-specific layout ops and ORT logs a warning about it,
    which is silenced here (we read the file, we do not ship it).
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise ConfigError(f"unknown ONNX Runtime optimization level {optimization!r}: use one of {', '.join(OPTIMIZATION_LEVELS)}")
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"thread count {threads!r} is invalid: use 1 or more threads")
    if runtime != "onnxruntime":
        from micronet.deploy.openvino import RUNTIMES, OpenVINOSession

        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
        if not isinstance(model, (str, os.PathLike)):
            raise ConfigError("OpenVINO reads ONNX files: pass the model as a path")
        return OpenVINOSession(model, threads)
    source, label, proto = _source_bytes_or_path(model)
    warn_if_saturating(proto, label, optimization)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = 3  # errors only: the NchwcTransformer "hardware specific" note is expected
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first = first.split(" failed:", 1)[-1].strip()  # drop ORT's "[ONNXRuntimeError] ... Load model from X failed:"
        raise DeployError(f"ONNX Runtime {ort.__version__} cannot load {label}: {first}: "
                          "export it again with standard ONNX ops and a supported opset") from None


def input_shape(session: ort.InferenceSession) -> list[int | str | None]:
    """The single input's shape as ORT reports it (an int per static dim, a name or None per dynamic one)."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise DeployError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}): "
                          "micronet runs image classifiers with exactly one input")
    return list(inputs[0].shape)


def image_shape(session: ort.InferenceSession) -> tuple[int, int, int]:
    """(C, H, W) of the NCHW input; each must be static, as a benchmark needs concrete inputs."""
    shape = input_shape(session)
    if len(shape) != 4:
        raise DeployError(f"the model input has shape {shape}, not N×C×H×W: micronet runs image classifiers")
    chw = shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in chw):
        raise DeployError(f"the model input has shape {shape} with a dynamic C, H or W: export with a fixed image size")
    return tuple(chw)  # type: ignore[return-value]


def check_image_shape(session: ort.InferenceSession, chw: tuple[int, int, int], what: str, fix: str) -> None:
    """Raise :class:`DeployError` when a static C, H or W of the input differs from ``chw`` (``what`` names its source)."""
    have = input_shape(session)
    if len(have) != 4 or any(isinstance(h, int) and h != w for h, w in zip(have[1:], chw)):
        raise DeployError(f"the model takes inputs of shape {have} but {what} is {'x'.join(map(str, chw))} (C,H,W): {fix}")


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size the input is fixed to, or None when the batch dimension is dynamic."""
    shape = input_shape(session)
    first = shape[0] if shape else None
    return first if isinstance(first, int) and first > 0 else None


def check_batch(session: ort.InferenceSession, batch: int) -> None:
    """Raise :class:`DeployError` when the model cannot take ``batch`` images at once."""
    fixed = fixed_batch(session)
    if fixed is not None and fixed != batch:
        raise DeployError(f"cannot run batch {batch}: the model was exported with a fixed batch of {fixed}: "
                          "export with a dynamic batch")


def run(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """The first output for one input batch (converted to contiguous float32)."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def runtime_label(threads: int, runtime: str = "onnxruntime") -> str:
    """``ONNX Runtime 1.32.0, 1 thread``: what produced a number, for report lines."""
    if runtime == "openvino":
        from micronet.deploy.openvino import openvino_version

        name = f"OpenVINO {openvino_version()}"
    else:
        name = f"ONNX Runtime {ort.__version__}"
    return f"{name}, {threads} thread" + ("" if threads == 1 else "s")


def as_session(model: ModelSource | ort.InferenceSession, threads: int = 1,
               runtime: str = "onnxruntime") -> ort.InferenceSession:
    """``model`` itself when it already is a session (ORT or OpenVINO), else :func:`build_session` of it."""
    if isinstance(model, ort.InferenceSession) or hasattr(model, "get_inputs"):
        return model
    return build_session(model, threads=threads, runtime=runtime)


__all__ = ["OPTIMIZATION_LEVELS", "as_session", "build_session", "check_batch", "check_image_shape", "fixed_batch",
           "image_shape", "input_shape", "run", "runtime_label"]
