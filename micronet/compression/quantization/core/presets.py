"""What the presets share beyond the scheme: the original's quantized layer classes, which take preset
keyword arguments (``QuantConv2d(..., w_bits=4)``), and the original's ``quant_inference`` switch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from micronet.compression.quantization.core.scheme import QuantScheme
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
