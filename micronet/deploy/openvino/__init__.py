"""OpenVINO: the same ONNX file on Intel's CPU runtime (optional dependency: ``pip install openvino``).

:class:`OpenVINOSession` compiles the file for the CPU with pinned threads (one stream, the latency hint)
and answers the few calls micronet's evaluation and benchmark make of an ONNX Runtime session
(``get_inputs()``, ``run(None, feed)``), so accuracy and latency are measured by the same code for both
runtimes. OpenVINO reads the QDQ graph and runs its own int8 kernels where it finds them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from micronet.errors import DeployError

RUNTIMES = ("onnxruntime", "openvino")


def openvino_version() -> str | None:
    """The installed OpenVINO version, or None when it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version().split("-")[0]


def _openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise DeployError("OpenVINO is not installed: pip install openvino (or use --runtime onnxruntime)") from None
    return openvino


@dataclass(frozen=True)
class _Input:
    name: str
    shape: list[int | str | None]


class OpenVINOSession:
    """A model compiled by OpenVINO for the CPU, with ONNX Runtime's session interface."""

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        ov = _openvino()
        from micronet.deploy.onnx.graph import load_model

        load_model(path, check=False)  # a missing file or one that is not ONNX: the same error as for ORT
        core = ov.Core()
        try:
            model = core.read_model(str(path))
            # f32: OpenVINO's CPU default on processors with bf16 instructions is bf16, which computes another
            # network (measured on the demo's files: 96.45% top-1 agreement with ONNX Runtime for binary NIN,
            # 97.80% for DoReFa W4A4, 100.00% with f32)
            self._compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1,
                                                               "PERFORMANCE_HINT": "LATENCY",
                                                               "INFERENCE_PRECISION_HINT": "f32"})
        except Exception as error:  # OpenVINO raises RuntimeError with multi-line text
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DeployError(f"OpenVINO {openvino_version()} cannot compile {path}: {first[:300]}") from None
        self._request = self._compiled.create_infer_request()
        port = self._compiled.inputs[0]
        shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        self._inputs = [_Input(port.get_any_name(), shape)]
        self.threads = threads

    def get_inputs(self) -> list[_Input]:
        return self._inputs

    def run(self, output_names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        (x,) = feed.values()
        result = self._request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return [np.array(result[self._compiled.outputs[0]])]


__all__ = ["RUNTIMES", "OpenVINOSession", "openvino_version"]
