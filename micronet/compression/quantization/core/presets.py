"""What the presets share beyond the scheme: quantized edges for the low-bit presets, the original's quantized
layer classes, which take preset keyword arguments (``QuantConv2d(..., w_bits=4)``), and the original's
``quant_inference`` switch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from torch import nn

from micronet.compression.quantization.core.scheme import QuantizerSpec, QuantScheme
from micronet.compression.quantization.core.workflow import set_fake_quant


def use_stored_weights(model: nn.Module) -> nn.Module:
    """Switch every weight quantizer off: layers use their weights as stored, e.g. weights that were
    already quantized for inference (the original's ``quant_inference=True``). Saved with the model."""
    names = [name for name, module in model.named_modules() if hasattr(module, "weight_quantizer")]
    if names:
        set_fake_quant(model, False, [f"{name}.weight_quantizer" if name else "weight_quantizer" for name in names])
    return model


def preset_class(core_class: type, make_scheme: Callable[..., QuantScheme], keywords: dict[str, Any],
                 module: str) -> type:
    """A subclass of ``core_class`` whose constructor takes the preset's keyword arguments (``keywords``
    with their defaults, passed to ``make_scheme``) and ``quant_inference``."""

    def __init__(self, *args: Any, quant_inference: bool = False, **kwargs: Any) -> None:
        options = {key: kwargs.pop(key, default) for key, default in keywords.items()}
        core_class.__init__(self, *args, scheme=make_scheme(**options), **kwargs)
        if quant_inference:
            use_stored_weights(self)

    doc = f"{core_class.__name__} taking {', '.join(keywords)} and quant_inference keyword arguments."
    return type(core_class.__name__, (core_class,), {"__init__": __init__, "__module__": module, "__doc__": doc})


def with_quantized_edges(scheme: QuantScheme, bits: int | None) -> QuantScheme:
    """``scheme`` with its float edges (the first and last weighted layers a low-bit preset keeps in float)
    quantized as integer-arithmetic-only layers: ``bits``-bit inputs (observed, as IAO's), weights at
    ``bits`` capped by the scheme's target (7 for ``portable``: exact on every x86 CPU), per channel.
    ``bits=None`` returns ``scheme`` unchanged. The edges then run on integer kernels like the rest."""
    if bits is None:
        return scheme
    from micronet.deploy.targets import get_target
    from micronet.errors import QuantizationError

    if not 2 <= int(bits) <= 8:
        raise QuantizationError(f"edge bits must be 2 to 8 (got {bits}): 8 keeps the image and the class scores "
                                "at int8 precision")
    weight = QuantizerSpec(family="affine", bits=min(int(bits), get_target(scheme.target).weight_bits), symmetric=True,
                           per_channel=True, narrow_range=True, signed=True, observer="minmax",
                           observer_options={"running": False})
    activation = QuantizerSpec(family="affine", bits=int(bits), symmetric=True, observer="moving_average")
    return replace(scheme, name=f"{scheme.name}-edges{int(bits)}", edge_weight=weight, edge_activation=activation,
                   quantize_pools=True)
