"""The packed runtime's kernels: the C++ extension (built on first use) and its pure-torch twin.

Both implement the same five operations on :class:`PackedBits` (int64 words ``(N, H, W, ceil(C/64))``,
channel ``c`` in bit ``c % 64`` of word ``c // 64``, bit 1 = +1):

* ``pack_sign(x)``: float NCHW → bits of sign(x) (sign(0) = +1, as :class:`SignActivation`);
* ``unpack(bits, channels_last)``: bits → float ±1 NCHW (memory in channels-last order on request);
* ``max_pool(bits, …)``: max pooling of ±1 values = OR of the bits over the window;
* ``permute(bits, source)``: output channel ``c`` takes input channel ``source[c]`` (channel shuffle);
* ``conv(bits, layer)``: the integer dot product ``D`` of ±1 inputs and ±1 weights over the taps that lie
  inside the image (a padded zero contributes 0, as in the trained model), then the layer's epilogue:
  bits ``(D ≥ T) XOR flip`` per channel, or floats ``float(D)·α + bias`` (in channels-last memory when the
  layer's ``channels_last`` is set, else contiguous NCHW).

The reference computes ``D`` with a float convolution of ±1 tensors (exact: every partial sum is an
integer far below 2²⁴) and applies the same integer epilogue, so both paths give identical outputs.

Which kernel runs: :func:`resolve_isa` — the ``isa`` argument, else the ``MICRONET_PACKED_ISA``
environment variable (``avx512_vpopcnt``, ``avx512``, ``avx2``, ``scalar`` or ``reference``), else the
fastest this CPU supports. The extension is compiled once per source version with
``torch.utils.cpp_extension`` (ninja, cached in torch's extension folder); the vector kernels carry
function-level target attributes and are only called on CPUs that report the instructions, so one build
serves every x86-64 CPU. Where no compiler works, the reference runs and one warning says why.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from micronet.errors import DeployError
from micronet.native import NativeKernelWarning, load_extension

__all__ = ["ISAS", "PackedBits", "PackedRuntimeWarning", "available_isas", "kernels_for", "native_extension",
           "resolve_isa", "words_from_bits", "bits_from_words"]

ISA_ENV = "MICRONET_PACKED_ISA"
# fastest first; the native ids are the extension's enum values
ISAS = ("avx512_vpopcnt", "avx512", "avx2", "scalar", "reference")
_NATIVE_ID = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512_vpopcnt": 3}
_SOURCE = Path(__file__).with_name("csrc") / "packed_ops.cpp"
_SHIFTS = torch.arange(64, dtype=torch.int64)


class PackedRuntimeWarning(NativeKernelWarning):
    """The C++ kernels could not be built or loaded: the pure-torch reference runs instead."""


class PackedBits(NamedTuple):
    """A binary activation as packed bits: ``words`` (N, H, W, ceil(channels/64)) int64."""

    words: torch.Tensor
    channels: int


# ------------------------------------------------------------------------------------------ bit helpers
def words_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool ``(..., 64·k)`` → int64 ``(..., k)``: bit ``i`` of the last axis into bit ``i % 64`` of word ``i // 64``."""
    shaped = bits.reshape(*bits.shape[:-1], -1, 64).to(torch.int64)
    return (shaped << _SHIFTS).sum(dim=-1)  # distinct bits: the sum is the OR (bit 63 wraps to the sign bit)


def bits_from_words(words: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`words_from_bits`, keeping the first ``count`` bits of the last axis (bool)."""
    bits = ((words.unsqueeze(-1) >> _SHIFTS) & 1).bool()
    return bits.reshape(*words.shape[:-1], -1)[..., :count]


def _pad_channels(bits: torch.Tensor) -> torch.Tensor:
    return F.pad(bits, (0, (-bits.shape[-1]) % 64))


# ------------------------------------------------------------------------------------------ reference
class ReferenceKernels:
    """Pure torch: unpack, compute on ±1 floats, pack. Slow, exact, runs everywhere."""

    name = "reference"

    def pack_sign(self, x: torch.Tensor) -> PackedBits:
        bits = (x >= 0).permute(0, 2, 3, 1)
        return PackedBits(words_from_bits(_pad_channels(bits)).contiguous(), x.shape[1])

    def unpack(self, packed: PackedBits, channels_last: bool = False) -> torch.Tensor:
        bits = bits_from_words(packed.words, packed.channels)
        values = (bits.to(torch.float32) * 2 - 1).permute(0, 3, 1, 2)
        return values if channels_last else values.contiguous()

    def _repack(self, x: torch.Tensor) -> PackedBits:
        return self.pack_sign(x)

    def max_pool(self, packed: PackedBits, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], output: tuple[int, int]) -> PackedBits:
        return self._repack(F.max_pool2d(self.unpack(packed), kernel, stride, padding))

    def permute(self, packed: PackedBits, source: torch.Tensor) -> PackedBits:
        return self._repack(self.unpack(packed).index_select(1, source))

    def conv(self, packed: PackedBits, layer: Any) -> torch.Tensor | PackedBits:
        x = self.unpack(packed)
        dot = F.conv2d(x, layer.reference_weight(), None, layer.stride, layer.padding, layer.dilation, layer.groups)
        dot = torch.round(dot).to(torch.int32)  # exact integers already; the cast keeps the type honest
        if layer.bits_out:
            cout = layer.out_channels
            bits = (dot >= layer.threshold[:cout].view(1, -1, 1, 1)) ^ layer.flip[:cout].bool().view(1, -1, 1, 1)
            return PackedBits(words_from_bits(_pad_channels(bits.permute(0, 2, 3, 1))).contiguous(), cout)
        out = dot.to(torch.float32) * layer.alpha.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
        return out.contiguous(memory_format=torch.channels_last) if layer.channels_last else out


# ------------------------------------------------------------------------------------------ native
class NativeKernels:
    """The C++ extension at one instruction set."""

    def __init__(self, module: Any, isa: str) -> None:
        self._ops = module
        self.name = isa
        self._isa = _NATIVE_ID[isa]

    def pack_sign(self, x: torch.Tensor) -> PackedBits:
        x = x.float()
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return PackedBits(self._ops.pack_sign_nhwc(x.permute(0, 2, 3, 1)), x.shape[1])
        return PackedBits(self._ops.pack_sign(x.contiguous()), x.shape[1])

    def unpack(self, packed: PackedBits, channels_last: bool = False) -> torch.Tensor:
        if channels_last:
            return self._ops.unpack_nhwc(packed.words, packed.channels).permute(0, 3, 1, 2)
        return self._ops.unpack(packed.words, packed.channels)

    def max_pool(self, packed: PackedBits, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], output: tuple[int, int]) -> PackedBits:
        return PackedBits(self._ops.max_pool(packed.words, *kernel, *stride, *padding, *output), packed.channels)

    def permute(self, packed: PackedBits, source: torch.Tensor) -> PackedBits:
        return PackedBits(self._ops.permute_channels(packed.words, source), packed.channels)

    def conv(self, packed: PackedBits, layer: Any) -> torch.Tensor | PackedBits:
        words = packed.words
        out = self._ops.conv_run(self._plan(layer, words), words, self._isa)
        if layer.bits_out:
            return PackedBits(out, layer.out_channels)
        return out if layer.channels_last else out.contiguous()  # floats come channels-last

    def _plan(self, layer: Any, words: torch.Tensor) -> Any:
        """The layer's plan for this input size (padding corrections, epilogue limits, tap offsets and the
        layer's tensors), built once: at batch 1 rebuilding it cost more than the popcounts. A plan whose
        tensors changed in place is rebuilt; the layer drops its plans when its tensors are replaced."""
        size = words.shape[1:]
        plans = layer.plans()
        plan = plans.get(size)
        if plan is None or not plan.current():
            height, width, count = size
            oh, ow = layer.output_size(height, width)
            geometry = [height, width, count, *layer.kernel_size, *layer.stride, *layer.padding, *layer.dilation,
                        layer.out_channels, layer.in_channels // layer.groups, layer.groups, oh, ow]
            plan = plans[size] = self._ops.conv_plan(layer.weight_words, layer.word_start, layer.group_mask,
                                                     geometry, layer.threshold, layer.flip, layer.alpha, layer.bias,
                                                     layer.bits_out)
        return plan

    def __deepcopy__(self, memo: dict) -> NativeKernels:
        return self  # stateless apart from the loaded extension, which cannot be copied


# ------------------------------------------------------------------------------------------ building
@functools.lru_cache(maxsize=None)
def native_extension() -> Any | None:
    """The compiled extension, or ``None`` (with one :class:`PackedRuntimeWarning`) when it cannot be built."""
    if os.environ.get(ISA_ENV, "").strip().lower() == "reference":
        return None
    return load_extension("packed_runtime", _SOURCE, PackedRuntimeWarning,
                          "the pure-torch reference path (identical results, slower)",
                          extra_cflags=("-ffp-contract=off",))


def available_isas() -> list[str]:
    """Kernels this machine can run, fastest first (``reference`` always)."""
    module = native_extension()
    native = set(module.supported_isas()) if module is not None else set()
    return [isa for isa in ISAS if isa in native or isa == "reference"]


def resolve_isa(isa: str | None = None) -> str:
    """``isa``, else ``$MICRONET_PACKED_ISA``, else the fastest available; an unknown name or one this CPU
    cannot run raises :class:`DeployError`; a native name without a working compiler gives ``reference``."""
    wanted = (isa or os.environ.get(ISA_ENV, "")).strip().lower()
    if not wanted:
        return available_isas()[0]
    if wanted not in ISAS:
        raise DeployError(f"unknown packed kernel {wanted!r} (from {'isa' if isa else ISA_ENV}): choose one of "
                          f"{', '.join(ISAS)}")
    if wanted == "reference":
        return wanted
    if native_extension() is None:
        return "reference"  # already warned once
    if wanted not in available_isas():
        raise DeployError(f"this CPU cannot run the {wanted} kernels (it runs {', '.join(available_isas())}): "
                          f"choose one of those")
    return wanted


def kernels_for(isa: str) -> ReferenceKernels | NativeKernels:
    if isa == "reference":
        return ReferenceKernels()
    module = native_extension()
    if module is None:
        return ReferenceKernels()
    return NativeKernels(module, isa)
