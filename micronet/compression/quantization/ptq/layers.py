"""What the post-training recipes share: the quantized layers in call order, what each one outputs (its
own output, or that of the BatchNorm the export folds into it), and running a model only as far as a layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from micronet.compression.quantization.core.integer_bias import IntegerBiasBatchNorm2d
from micronet.compression.quantization.core.modules import QuantConv1d, QuantConv2d, QuantLinear
from micronet.compression.quantization.core.quantizers import AffineQuantizer
from micronet.compression.quantization.core.workflow import _call_order

RECONSTRUCTED = (QuantConv1d, QuantConv2d, QuantLinear)


@dataclass(frozen=True)
class LayerUnit:
    """A quantized conv/linear layer and the BatchNorm after it that the export folds into it (or None)."""

    name: str
    layer: nn.Module
    bn_name: str | None
    bn: nn.Module | None

    @property
    def output_name(self) -> str:
        """The module whose output is the unit's: the BatchNorm when there is one."""
        return self.bn_name or self.name


def layer_units(model: nn.Module) -> list[LayerUnit]:
    """Affine-quantized conv/linear layers with an enabled weight quantizer, in the order ``forward`` calls them."""
    modules = dict(model.named_modules())
    bn_of = {id(m._conv): name for name, m in modules.items() if isinstance(m, IntegerBiasBatchNorm2d) and m._conv is not None}
    units = []
    for name in dict.fromkeys(_call_order(model)):
        layer = modules.get(name)
        if type(layer) not in RECONSTRUCTED:
            continue
        quantizer = layer.weight_quantizer
        if not (isinstance(quantizer, AffineQuantizer) and quantizer.enabled.item()):
            continue
        bn_name = bn_of.get(id(layer))
        units.append(LayerUnit(name, layer, bn_name, modules[bn_name] if bn_name else None))
    return units


class _Reached(Exception):
    """Raised by a hook once the module of interest has run: the rest of the forward is not needed."""


def batches(data: Iterable[Any], num_batches: int | None) -> Iterator[torch.Tensor]:
    """Input tensors of the first ``num_batches`` items of ``data`` (tensors or (input, target) pairs)."""
    for index, item in enumerate(data):
        if num_batches is not None and index >= num_batches:
            return
        yield item[0] if isinstance(item, (tuple, list)) else item


@torch.no_grad()
def run_to(model: nn.Module, module: nn.Module, x: torch.Tensor, *, want: str = "output") -> torch.Tensor:
    """``module``'s input (``want="input"``) or output when ``model`` runs on ``x``, stopping there."""
    seen: list[torch.Tensor] = []

    def hook(_module, inputs, output=None):
        seen.append((inputs[0] if want == "input" else output).detach())
        raise _Reached

    handle = module.register_forward_pre_hook(hook) if want == "input" else module.register_forward_hook(hook)
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(module).__name__} was not called by the model's forward")
    return seen[0]


def channel_mean_sum(t: torch.Tensor) -> torch.Tensor:
    """Per-channel (axis 1) sums in float64 (divide by ``t.numel() // t.shape[1]`` for means)."""
    return t.double().transpose(0, 1).reshape(t.shape[1], -1).sum(1)
