"""The two things every TensorRT entry point needs and may not have: the ``tensorrt`` module and a CUDA device.

TensorRT has no wheel for most machines (no GPU, no NVIDIA index), so ``import micronet.deploy.tensorrt`` must
never import it. Each function that talks to TensorRT calls :func:`require_tensorrt` at its start; device
memory comes from torch CUDA tensors (no pycuda dependency) through :func:`require_device`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from micronet.errors import DeployError

INSTALL_HINT = ("install TensorRT 10 for your CUDA (pip install tensorrt-cu12 on a machine with an NVIDIA GPU), "
                "or check the ONNX without it with micronet.deploy.tensorrt.check_tensorrt_qdq")


def require_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or a :class:`DeployError` saying how to get it."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as error:  # also the CUDA-library load errors the real wheel raises as ImportError
        detail = "" if isinstance(error, ModuleNotFoundError) else f" ({error})"
        raise DeployError(f"TensorRT is not installed{detail}: {INSTALL_HINT}") from None
    major = str(getattr(trt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < 10:
        raise DeployError(f"TensorRT {getattr(trt, '__version__', '?')} is too old: micronet uses the TensorRT 10 "
                          "API (build_serialized_network, execute_async_v3); install tensorrt 10")
    return trt


def make_logger(trt: ModuleType, verbose: bool = False):
    """A TensorRT logger printing warnings and errors (everything with ``verbose``)."""
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


def require_device(device: str | torch.device = "cuda") -> torch.device:
    """``device`` as a torch device; a CUDA device must exist. Another device type is accepted only because the
    test stand-in runs on CPU memory: real TensorRT reads and writes CUDA memory only."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeployError("CUDA is not available to PyTorch: TensorRT needs an NVIDIA GPU and a CUDA build of torch "
                          "(install torch from the CUDA wheel index that matches your driver)")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
