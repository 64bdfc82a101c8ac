"""One-pass C++ kernels of the fake-quantization activations (sign, DoReFa, affine), built on first use.

torch runs each of these activations as a chain of elementwise passes (the affine fake-quant: nine, with
temporaries); the kernels in ``csrc/fake_quant_ops.cpp`` read the input once and write the output and the
straight-through mask, performing torch's own float operations in torch's order, so values and gradients
are bit-identical. Where no compiler works, one :class:`~micronet.native.NativeKernelWarning` and the torch
chains run; ``MICRONET_NATIVE_ACTIVATIONS=0`` uses the torch chains without trying.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from micronet.native import NativeKernelWarning, load_extension

__all__ = ["NATIVE_ACTIVATIONS_ENV", "activation_kernels", "native_ready"]

_SOURCE = Path(__file__).with_name("csrc") / "fake_quant_ops.cpp"
NATIVE_ACTIVATIONS_ENV = "MICRONET_NATIVE_ACTIVATIONS"


@functools.lru_cache(maxsize=None)
def activation_kernels() -> Any | None:
    """The compiled kernels, or ``None`` (switched off, or no compiler: the torch chains run)."""
    if os.environ.get(NATIVE_ACTIVATIONS_ENV, "").strip() == "0":
        return None
    return load_extension("fake_quant_activations", _SOURCE, NativeKernelWarning,
                          "the pure-torch activations (identical values, slower training steps)",
                          # no FMA; if-converted selects; the min/max reduction's simd pragma
                          extra_cflags=("-ffp-contract=off", "-fno-trapping-math", "-fopenmp-simd"))


def native_ready(*tensors: torch.Tensor) -> bool:
    """True when every tensor is a dense (NCHW or channels-last) float32 CPU tensor the kernels read."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32
               and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)) for t in tensors)
