"""Deployment targets: which integer layout an int8 model is quantized and exported for.

An int8 file must not depend on the machine that wrote it. What differs between x86 CPUs is how ONNX
Runtime's u8s8 kernels (uint8 activations × int8 weights) add products:

* with VNNI or AMX (``vpdpbusd``) each product is accumulated in int32: exact for any int8 weight;
* without them (AVX2, AVX-512 without VNNI) ``vpmaddubsw`` adds *pairs* of products in saturating int16.
  With 8-bit weights a pair reaches 2·255·127 = 64770 > 32767 and saturates; with weights in ±63 it is
  at most 2·255·63 = 32130 ≤ 32767, so the sum is exact on every CPU (the reason for ONNX Runtime's
  ``reduce_range`` and NNCF's 7-bit weights on such CPUs).

The targets:

* ``portable`` (default): weights quantized to ±63 (7 bits, symmetric narrow range) and uint8
  activations: exact and on the fast u8s8 kernels of every x86 CPU. Layers whose codes exceed ±63 (a
  model quantized with 8-bit weights) are written as uint8 weights with zero point 128 — the same
  values, ONNX Runtime's u8u8 kernels: exact everywhere, but slower;
* ``vnni``: 8-bit weights (±127), int8 in the file: exact and fastest on CPUs with VNNI/AMX; on other
  CPUs ONNX Runtime's results drift (saturation), so use it only where the deployment CPU is known;
* ``tensorrt``: 8-bit weights and signed int8 activations with zero point 0 (what TensorRT accepts).

The target is stored in the quantization scheme (so a checkpoint remembers it) and in the ONNX file's
``metadata_props`` as ``micronet.target``.
"""

from __future__ import annotations

from dataclasses import dataclass

from micronet.errors import ConfigError


@dataclass(frozen=True)
class Target:
    name: str
    weight_bits: int  # IAO weight bits when the user does not choose them
    weight_code_max: int  # the largest |int8 weight code| the target's kernels sum exactly
    activation_dtype: str  # "uint8" (ONNX Runtime's u8s8 kernels) or "int8" (TensorRT)
    summary: str

    @property
    def needs_vnni(self) -> bool:
        """Whether ONNX Runtime's u8s8 kernels sum this target's weights exactly only on VNNI/AMX CPUs."""
        return self.activation_dtype == "uint8" and self.weight_code_max > PORTABLE_WEIGHT_CODE_MAX


PORTABLE_WEIGHT_CODE_MAX = 63  # 2·255·63 = 32130 ≤ 32767: no int16 saturation in vpmaddubsw
TARGETS: dict[str, Target] = {
    "portable": Target("portable", 7, PORTABLE_WEIGHT_CODE_MAX, "uint8",
                       "7-bit weights (±63), uint8 activations: exact and fast on AVX2, AVX-512 and VNNI CPUs"),
    "vnni": Target("vnni", 8, 127, "uint8",
                   "8-bit weights, uint8 activations: exact on CPUs with VNNI/AMX only"),
    "tensorrt": Target("tensorrt", 8, 127, "int8",
                       "8-bit weights, signed int8 activations with zero point 0 (TensorRT)"),
}
DEFAULT_TARGET = "portable"


def get_target(name: str | None) -> Target:
    """The :class:`Target` called ``name`` (None: the default, ``portable``)."""
    if name is None:
        name = DEFAULT_TARGET
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f"unknown target {name!r}: choose one of {', '.join(TARGETS)}") from None


def weight_dtype_for(target: Target, code_max: int) -> str:
    """The ONNX weight type of a layer whose largest |code| is ``code_max``: int8 where the target's kernels
    sum it exactly, else uint8 with zero point 128 (the same values, exact u8u8 kernels)."""
    return "int8" if code_max <= target.weight_code_max else "uint8"
