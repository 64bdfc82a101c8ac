"""Modules of a packed model: binary layers that read and write :class:`PackedBits`.

:class:`PackedConv2d` holds its weight as packed sign bits (1 bit per weight, laid out in blocks of 8
output channels so one 512-bit vector holds a word of 8 channels) and one of two epilogues:

* **bits out** (the conv feeds a sign, possibly through BatchNorm or other per-channel monotone modules):
  per channel an integer threshold ``T`` and a ``flip`` flag, output bit ``(D ≥ T) XOR flip``, where ``D``
  is the ±1 dot product. ``T`` is found by evaluating the model's own modules between the conv and the
  sign on every possible ``D``, so the bits equal what the PyTorch model computes; BatchNorm, the sign
  fold's threshold bias and per-channel α all end up in ``T``.
* **float out**: ``float(D)·α + bias`` (NCHW), for a conv whose output is added, pooled in float, or fed
  to a float layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from micronet.deploy.packed.kernels import PackedBits, ReferenceKernels, bits_from_words, words_from_bits

__all__ = ["PackSign", "PackedChannelShuffle", "PackedConv2d", "PackedMaxPool2d", "Unpack"]

LANES = 8  # output channels per weight block (kernels' kLanes)
INT32_MAX = 2**31 - 1


class _PackedModule(nn.Module):
    """Holds the kernels it runs on (set by :func:`micronet.deploy.packed.set_isa`)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Any = ReferenceKernels()


class PackSign(_PackedModule):
    """sign(x) packed into bits: where a float tensor enters the binary part of the network."""

    def forward(self, x: torch.Tensor) -> PackedBits:
        return self.kernels.pack_sign(x)


class Unpack(_PackedModule):
    """Bits → float ±1 NCHW, where a float layer reads a binary activation (channels-last memory when the
    float layers run channels-last)."""

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last

    def forward(self, packed: PackedBits) -> torch.Tensor:
        return self.kernels.unpack(packed, self.channels_last)


class PackedMaxPool2d(_PackedModule):
    """Max pooling of ±1 values on packed bits (the OR of the window; padding never wins)."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        pair = nn.modules.utils._pair
        self.kernel_size, self.stride = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size)
        self.padding = pair(pool.padding)

    def forward(self, packed: PackedBits) -> PackedBits:
        h, w = packed.words.shape[1:3]
        out = tuple((size + 2 * p - k) // s + 1
                    for size, p, k, s in zip((h, w), self.padding, self.kernel_size, self.stride))
        return self.kernels.max_pool(packed, self.kernel_size, self.stride, self.padding, out)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class PackedChannelShuffle(_PackedModule):
    """ShuffleNet channel shuffle on packed bits (channel ``i·(C/g) + j`` → ``j·g + i``)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self._sources: dict[int, torch.Tensor] = {}

    def source(self, channels: int) -> torch.Tensor:
        if channels not in self._sources:
            order = torch.arange(channels).view(self.groups, -1).t().reshape(-1)
            self._sources[channels] = order.contiguous()
        return self._sources[channels]

    def forward(self, packed: PackedBits) -> PackedBits:
        return self.kernels.permute(packed, self.source(packed.channels))

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class PackedConv2d(_PackedModule):
    """Binary-weight, binary-input conv on packed bits (see the module docstring for the epilogues)."""

    def __init__(self, conv: nn.Conv2d, signs: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor,
                 threshold: torch.Tensor | None, flip: torch.Tensor | None, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last  # float output in channels-last memory (the kernels' own order)
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        self.bits_out = threshold is not None
        words, start, mask = _pack_weight(signs, self.in_channels, self.groups)
        self.register_buffer("weight_words", words)
        self.register_buffer("word_start", start)
        self.register_buffer("group_mask", mask)
        # Each epilogue keeps only its own numbers (the other pair stays empty).
        padded = math.ceil(self.out_channels / 64) * 64 if self.bits_out else 0
        fill = torch.full((padded,), INT32_MAX, dtype=torch.int32)  # padding channels: bit never set
        flips = torch.zeros(padded, dtype=torch.uint8)
        if threshold is not None:
            fill[: self.out_channels] = threshold.to(torch.int32)
            flips[: self.out_channels] = flip.to(torch.uint8)
        self.register_buffer("threshold", fill)
        self.register_buffer("flip", flips)
        keep = not self.bits_out
        self.register_buffer("alpha", alpha.detach().reshape(-1).float().clone() if keep else torch.empty(0))
        self.register_buffer("bias", bias.detach().reshape(-1).float().clone() if keep else torch.empty(0))
        self._reference_weight: torch.Tensor | None = None

    # Native kernel plans per input size (see NativeKernels.conv): derived from this layer's tensors, so
    # dropped whenever they are replaced and never copied or pickled with the layer.
    def plans(self) -> dict[Any, Any]:
        return self.__dict__.setdefault("_native_plans", {})

    def _apply(self, fn: Any, recurse: bool = True) -> PackedConv2d:
        self.__dict__.pop("_native_plans", None)
        return super()._apply(fn, recurse)

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__.pop("_native_plans", None)
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_native_plans", None)
        return state

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1  # type: ignore[return-value]
                     for size, p, d, k, s in zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride))

    def reference_weight(self) -> torch.Tensor:
        """The ±1 float weight (out, in/groups, kh, kw), rebuilt from the packed words on first use."""
        if self._reference_weight is None:
            self._reference_weight = _unpack_weight(self)
        return self._reference_weight

    def resident_bytes(self) -> int:
        """Bytes this layer keeps for inference on the native path (weights, offsets, masks, epilogue)."""
        names = ("weight_words", "word_start", "group_mask", "alpha", "bias", "threshold", "flip")
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    def forward(self, x: PackedBits | torch.Tensor) -> PackedBits | torch.Tensor:
        if isinstance(x, torch.Tensor):  # a float input whose sign the conv's input quantizer takes
            x = self.kernels.pack_sign(x)
        return self.kernels.conv(x, self)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, out={'bits' if self.bits_out else 'float'}")


def _group_words(in_channels: int, groups: int) -> tuple[list[int], int]:
    """First input word of each group's window and the window's width in words (the same for every group,
    and never past the last word)."""
    per_group = in_channels // groups
    total = math.ceil(in_channels / 64)
    first = [(g * per_group) // 64 for g in range(groups)]
    width = max(math.ceil((g + 1) * per_group / 64) - first[g] for g in range(groups))
    return [min(f, total - width) for f in first], width


def _paired_taps(in_channels: int, groups: int, taps: int) -> bool:
    """Whether two taps share each weight word (the kernels' paired layout): one group of at most 32 input
    channels would leave half of every word empty."""
    return groups == 1 and in_channels <= 32 and taps > 1


def _pair_taps(words: torch.Tensor) -> torch.Tensor:
    """(out, taps, 1) words of at most 32 bits → (out, ceil(taps/2), 1): tap 2t in the low half of word t,
    tap 2t + 1 in the high half."""
    out, taps, _ = words.shape
    words = torch.nn.functional.pad(words, (0, 0, 0, taps % 2)).view(out, -1, 2, 1)
    return words[:, :, 0] | (words[:, :, 1] << 32)


def _unpair_taps(words: torch.Tensor, taps: int) -> torch.Tensor:
    low, high = words & 0xFFFFFFFF, (words >> 32) & 0xFFFFFFFF
    return torch.stack((low, high), dim=2).reshape(words.shape[0], -1, 1)[:, :taps]


def _pack_weight(signs: torch.Tensor, in_channels: int, groups: int) -> tuple[torch.Tensor, ...]:
    """``signs`` (out, in/groups, kh, kw) bool (True = +1) → weight words (blocks, kh·kw, width, LANES), each
    group's bits at their position in the input's words (``(blocks, ceil(kh·kw/2), 1, LANES)`` with paired
    taps); the first word of each group's window; its mask."""
    out, per_group, kh, kw = signs.shape
    starts, width = _group_words(in_channels, groups)
    per_out = out // groups
    bits = torch.zeros(out, kh * kw, width * 64, dtype=torch.bool)
    mask = torch.zeros(groups, width * 64, dtype=torch.bool)
    taps = signs.permute(0, 2, 3, 1).reshape(out, kh * kw, per_group)
    for g in range(groups):
        offset = g * per_group - starts[g] * 64
        bits[g * per_out:(g + 1) * per_out, :, offset:offset + per_group] = taps[g * per_out:(g + 1) * per_out]
        mask[g, offset:offset + per_group] = True
    words = words_from_bits(bits)  # (out, taps, width)
    if _paired_taps(in_channels, groups, kh * kw):
        words = _pair_taps(words)
    blocks = math.ceil(out / LANES)
    words = torch.nn.functional.pad(words, (0, 0, 0, 0, 0, blocks * LANES - out))
    words = words.view(blocks, LANES, words.shape[1], width).permute(0, 2, 3, 1).contiguous()
    return words, torch.tensor(starts, dtype=torch.int64), words_from_bits(mask).contiguous()


def _unpack_weight(layer: PackedConv2d) -> torch.Tensor:
    out, groups = layer.out_channels, layer.groups
    per_group, per_out = layer.in_channels // groups, out // groups
    kh, kw = layer.kernel_size
    blocks, terms, width, _ = layer.weight_words.shape
    words = layer.weight_words.permute(0, 3, 1, 2).reshape(blocks * LANES, terms, width)[:out]
    if _paired_taps(layer.in_channels, groups, kh * kw):
        words = _unpair_taps(words, kh * kw)
    bits = bits_from_words(words, width * 64)  # (out, taps, width·64)
    pieces = []
    for g in range(groups):
        offset = g * per_group - int(layer.word_start[g]) * 64
        pieces.append(bits[g * per_out:(g + 1) * per_out, :, offset:offset + per_group])
    signs = torch.cat(pieces).reshape(out, kh, kw, per_group).permute(0, 3, 1, 2)
    return signs.to(torch.float32) * 2 - 1
