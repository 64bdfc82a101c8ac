"""Parameter counts, FLOPs/MACs and bit-aware model size.

Conventions
-----------
* **FLOPs = 2 × MACs.** FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts
  one multiply-accumulate as 2 FLOPs for convolutions, linear layers and matrix products (mm, addmm,
  bmm, matmul, attention). Element-wise ops, BatchNorm, activations, pooling and bias additions are
  not counted. MACs are ``flops // 2``.
* The original micronet's README column "GFLOPs" was really GMACs (e.g. its NIN_GC row, 0.15, is the MAC count);
  compare the original micronet's numbers with :attr:`FlopCount.macs`.
* **Size counts parameters only** (no buffers such as BN running statistics or quantizer state), each
  at its storage width: 32 bits, or the ``bits`` of the owning module's ``weight_quantizer`` for that
  module's ``weight``. It is a theoretical packed size, not a file size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from numbers import Integral

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "FlopCount",
    "ModelSummary",
    "count_flops",
    "count_parameters",
    "model_size_bytes",
    "parameter_bits",
    "summarize",
]


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not; a shared parameter is counted once). Buffers are excluded."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class FlopCount:
    """FLOPs (= 2 × MACs) of one forward pass; ``by_module`` maps leaf-module names to their FLOPs."""

    flops: int
    macs: int
    by_module: dict[str, int] = field(default_factory=dict)


def _input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or not all(isinstance(s, Integral) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W) with positive sizes (got {input_shape!r}): "
                         "pass e.g. (3, 32, 32)")
    return tuple(int(s) for s in shape)


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> FlopCount:
    """FLOPs and MACs of one forward pass on a zero input of ``input_shape``.

    ``(C, H, W)`` is counted for batch 1; ``(N, C, H, W)`` is counted as given (FLOPs scale with N).
    The model runs in eval mode under ``torch.no_grad()``; afterwards every submodule's train/eval flag
    and every buffer (BN running statistics, observer state) is restored, so counting has no side effects.
    The input is created on the device and with the floating dtype of the model's first parameter.
    """
    shape = _input_shape(input_shape)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(shape, device=device, dtype=dtype)

    modes = [(m, m.training) for m in model.modules()]
    saved_buffers = [(m, name, b, b.detach().clone()) for m in model.modules()
                     for name, b in m._buffers.items() if b is not None]
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for m, name, original, copy in saved_buffers:
                if m._buffers.get(name) is original and original.shape == copy.shape:
                    original.copy_(copy)
                else:
                    original.data = copy
                    m._buffers[name] = original
    flops = int(counter.get_total_flops())

    by_module: dict[str, int] = {}
    counts = counter.get_flop_counts()
    root = type(model).__name__
    for name, module in model.named_modules():
        if name and next(module.children(), None) is None:
            ops = counts.get(f"{root}.{name}")
            if ops:
                by_module[name] = int(sum(ops.values()))
    return FlopCount(flops=flops, macs=flops // 2, by_module=by_module)


def _bits_value(bits: object, owner: str) -> int | None:
    if bits is None:
        return None
    if isinstance(bits, torch.Tensor):
        if bits.numel() != 1 or bits.is_floating_point() and not float(bits.item()).is_integer():
            raise ValueError(f"weight_quantizer.bits of {owner or 'the model'} must hold one whole number "
                             f"(got {bits.tolist()}): store an int bit width")
        bits = int(bits.item())
    elif isinstance(bits, float) and bits.is_integer():
        bits = int(bits)
    if not isinstance(bits, Integral) or isinstance(bits, bool) or bits < 1:
        raise ValueError(f"weight_quantizer.bits of {owner or 'the model'} must be a positive integer "
                         f"(got {bits!r}): store an int bit width")
    return int(bits)


def parameter_bits(model: nn.Module) -> dict[str, int]:
    """Storage width in bits of every parameter, keyed like ``model.named_parameters()``.

    32 for every parameter, except a module's own ``weight`` when that module has a
    ``weight_quantizer`` attribute whose ``bits`` is an int (or a one-element tensor buffer holding
    one): then ``weight`` gets that width. ``bits = None`` means "not fixed" and keeps 32.
    """
    out: dict[str, int] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        qbits = _bits_value(getattr(quantizer, "bits", None), mod_name) if quantizer is not None else None
        for p_name, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            out[full] = qbits if (p_name == "weight" and qbits is not None) else 32
    return out


def model_size_bytes(model: nn.Module) -> float:
    """Theoretical parameter size in bytes: Σ numel × bits / 8 (see :func:`parameter_bits`)."""
    bits = parameter_bits(model)
    params = dict(model.named_parameters())
    return sum(params[name].numel() * b for name, b in bits.items()) / 8


@dataclass
class ModelSummary:
    """Parameters, MACs, FLOPs (= 2 × MACs) and bit-aware parameter size of a model at one input shape."""

    params: int
    macs: int
    flops: int
    size_bytes: float

    def as_row(self) -> dict[str, int | float]:
        """Human-scaled columns for :func:`micronet.analysis.format_table`: params (M), MMACs, MFLOPs, size (MB, 10^6 bytes)."""
        return {
            "params (M)": round(self.params / 1e6, 4),
            "MMACs": round(self.macs / 1e6, 3),
            "MFLOPs": round(self.flops / 1e6, 3),
            "size (MB)": round(self.size_bytes / 1e6, 4),
        }

    def to_json(self) -> dict[str, int | float]:
        """Exact values: ``{"params", "macs", "flops", "size_bytes"}``."""
        return asdict(self)


def summarize(model: nn.Module, input_shape: Sequence[int]) -> ModelSummary:
    """:class:`ModelSummary` of ``model`` for one forward pass at ``input_shape`` (see :func:`count_flops`)."""
    fc = count_flops(model, input_shape)
    return ModelSummary(params=count_parameters(model), macs=fc.macs, flops=fc.flops,
                        size_bytes=model_size_bytes(model))
