"""The DoReFa preset (Zhou et al. 2016), with the original micronet's API.

``prepare(model, a_bits=8, w_bits=8)`` returns a model prepared by the shared mechanism
(:mod:`micronet.compression.quantization.core`) with the ``dorefa`` weight and ``dorefa_activation``
quantizer families (:mod:`~micronet.compression.quantization.core.lowbit`):

* weights: t = tanh(W), normalised by the layer's max|t| onto [0, 1], rounded to k bits and mapped back to
  [−1, 1] (levels {−1, −1/3, 1/3, 1} for k = 2); k = 1 gives sign(W)·E|W| (the original refused 1 bit);
* activations: the input of every quantized conv / linear layer is clamped to [0, 1] after multiplying by
  ``pre_scale`` and rounded to k bits;
* 32 bits keeps that tensor in float;
* like the original, the first weighted layer stays float and every other one is quantized, the last
  (classifier) included; pools, activations and residual adds are left alone.

Differences from the original, on purpose: rounding is half-to-even (``rounding="half_away"`` gives the
original's), ``pre_scale`` defaults to 1.0 (the original multiplied by 0.1 — a clip at 10 — and never
scaled back, so every layer after it saw activations 10× smaller: ``pre_scale=0.1`` reproduces that),
ConvTranspose2d works (the original crashed), and ``quant_inference=True`` switches the weight quantizers
off so stored, already-quantized weights are used as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from micronet.compression.quantization.core import modules as _core
from micronet.compression.quantization.core.presets import preset_class, use_stored_weights, with_quantized_edges
from micronet.compression.quantization.core.scheme import QuantizerSpec, QuantScheme
from micronet.compression.quantization.core.workflow import prepare as _prepare
from micronet.errors import QuantizationError

FLOAT_BITS = 32


def _bits(name: str, bits: int) -> int:
    if not (1 <= int(bits) <= 16 or int(bits) == FLOAT_BITS):
        raise QuantizationError(f"DoReFa {name} must be 1 to 16, or 32 for float (got {bits})")
    return int(bits)


def dorefa_scheme(
    a_bits: int = 8,
    w_bits: int = 8,
    *,
    pre_scale: float = 1.0,
    rounding: str = "half_even",
    per_channel: bool = False,
    keep_first_float: bool = True,
    keep_last_float: bool = False,
    edge_bits: int | None = None,
) -> QuantScheme:
    """The :class:`QuantScheme` of DoReFa with ``w_bits``-bit weights and ``a_bits``-bit layer inputs.

    ``per_channel`` normalises the weights by each output channel's max|tanh W| instead of the layer's.
    ``edge_bits`` (e.g. 8) quantizes the first layer, which reads the image, and the average pools as
    integer-arithmetic-only layers at that width instead of keeping them float, so that every conv runs on
    integer kernels (:func:`~micronet.compression.quantization.core.presets.with_quantized_edges`).
    """
    a_bits, w_bits = _bits("a_bits", a_bits), _bits("w_bits", w_bits)
    if w_bits == FLOAT_BITS:
        weight = QuantizerSpec("float", FLOAT_BITS, observer="none")
    else:
        weight = QuantizerSpec("dorefa", w_bits, per_channel=per_channel, observer="none", options={"rounding": rounding})
    if a_bits == FLOAT_BITS:
        activation = QuantizerSpec("float", FLOAT_BITS, observer="none")
    else:
        activation = QuantizerSpec("dorefa_activation", a_bits, observer="none",
                                   options={"pre_scale": float(pre_scale), "rounding": rounding})
    name = f"dorefa-w{w_bits}a{a_bits}" + (f"-prescale{pre_scale:g}" if pre_scale != 1.0 else "")
    scheme = QuantScheme(
        name=name,
        weight=weight,
        activation=activation,
        quantize_pools=False,
        quantize_activations=(),
        quantize_joins=False,
        keep_first_float=keep_first_float,
        keep_last_float=keep_last_float,
    )
    scheme.weight.build(0, 1), scheme.activation.build()  # refuse impossible options now, not at prepare
    return with_quantized_edges(scheme, edge_bits)


def prepare(
    model: nn.Module,
    inplace: bool = False,
    a_bits: int = 8,
    w_bits: int = 8,
    quant_inference: bool = False,
    *,
    pre_scale: float = 1.0,
    rounding: str = "half_even",
    edge_bits: int | None = None,
    skip: Iterable[str] = (),
) -> nn.Module:
    """Prepare ``model`` with the DoReFa preset (the original's signature, plus the scheme's options)."""
    scheme = dorefa_scheme(a_bits, w_bits, pre_scale=pre_scale, rounding=rounding, edge_bits=edge_bits)
    prepared = _prepare(model, scheme, inplace=inplace, skip=skip)
    return use_stored_weights(prepared) if quant_inference else prepared


def _dorefa_class(core_class: type) -> type:
    return preset_class(core_class, dorefa_scheme, {"a_bits": 8, "w_bits": 8}, __name__)


QuantConv2d = _dorefa_class(_core.QuantConv2d)
QuantConvTranspose2d = _dorefa_class(_core.QuantConvTranspose2d)
QuantLinear = _dorefa_class(_core.QuantLinear)

__all__ = ["QuantConv2d", "QuantConvTranspose2d", "QuantLinear", "dorefa_scheme", "prepare"]
