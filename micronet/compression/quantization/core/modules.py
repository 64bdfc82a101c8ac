"""Quantized modules: each is its float class plus quantizers, so state_dict keys stay the float ones.

A quantized module quantizes what it consumes: its input activation (and, for weighted layers, its weight).
Weights are quantized on the fly in ``forward``; the float weights are never edited in place. ``Add``
quantizes each input with its own quantizer (integer adds rescale each input; schemes with
``shared_add_quantizer`` use one for both) and ``Concat`` all its inputs with one shared quantizer, so the
concatenated codes have one scale. Conversion from float (:meth:`QuantizedModule.from_float`) re-classes the module, which
keeps every constructor argument (dilation, ceil_mode, padding_mode, ...) exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from micronet.base_module.op import Add, Concat
from micronet.compression.quantization.core.integer_bias import integer_bias_grid, round_bias
from micronet.compression.quantization.core.quantizers import Quantizer
from micronet.compression.quantization.core.scheme import QuantizerSpec, QuantScheme


def default_scheme() -> QuantScheme:
    """8-bit weights (symmetric, per channel, −127..127) and 8-bit activations (moving-average range)."""
    return QuantScheme(
        name="int8",
        weight=QuantizerSpec(bits=8, symmetric=True, per_channel=True, narrow_range=True, observer="minmax",
                             observer_options={"running": False}),
        activation=QuantizerSpec(bits=8, symmetric=True, observer="moving_average"),
    )


class QuantizedModule:
    """Mixin placed before the float class: ``class QuantConv2d(QuantizedModule..., nn.Conv2d)``."""

    def __init__(self, *args: Any, scheme: QuantScheme | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attach_quantizers(scheme or default_scheme())

    @classmethod
    def from_float(cls, module: nn.Module, scheme: QuantScheme) -> nn.Module:
        """Turn ``module`` (an instance of the float class) into this quantized class, in place."""
        module.__class__ = cls
        module.attach_quantizers(scheme)
        return module

    def attach_quantizers(self, scheme: QuantScheme) -> None:
        raise NotImplementedError

    def quantizers(self) -> dict[str, Quantizer]:
        return {name: m for name, m in self.named_children() if isinstance(m, Quantizer)}


class WeightedQuantizedModule(QuantizedModule):
    """Conv / linear layers: input quantizer + weight quantizer (per output channel when the scheme says so)."""

    weight_axis = 0

    def attach_quantizers(self, scheme: QuantScheme) -> None:
        axis = self.weight_axis
        self.input_quantizer = scheme.activation.build()
        self.weight_quantizer = scheme.weight.build(
            ch_axis=axis, num_channels=None if axis is None else self.weight.shape[axis]
        )

    def deployed_weight(self) -> torch.Tensor:
        """The float weight that eval mode quantizes."""
        return self.weight

    @torch.no_grad()
    def refresh_weight_range(self) -> bool:
        """Re-observe the current weight (see :meth:`AffineQuantizer.reobserve`); whether the range changed hands."""
        quantizer = getattr(self, "weight_quantizer", None)
        reobserve = getattr(quantizer, "reobserve", None)
        return bool(reobserve(self.deployed_weight())) if reobserve is not None else False

    def train(self, mode: bool = True):
        """Leaving training re-observes the weight: the last optimizer step came after its last observation."""
        if self.training and not mode:
            self.refresh_weight_range()
        return super().train(mode)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def integer_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """In eval mode, ``bias`` as an integer runtime adds it: int32 codes on the grid s_x·s_w
        (:mod:`~micronet.compression.quantization.core.integer_bias`); in training, ``bias`` itself."""
        if bias is None or self.training:
            return bias
        return round_bias(bias, integer_bias_grid(self.input_quantizer, self.weight_quantizer, self.deployed_weight(),
                                                  self.weight_axis))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_weight(self.input_quantizer(x), self.quantized_weight())

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class QuantConv1d(WeightedQuantizedModule, nn.Conv1d):
    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.integer_bias(self.bias))


class QuantConv2d(WeightedQuantizedModule, nn.Conv2d):
    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.integer_bias(self.bias))


class QuantLinear(WeightedQuantizedModule, nn.Linear):
    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.integer_bias(self.bias))


class QuantConvTranspose2d(WeightedQuantizedModule, nn.ConvTranspose2d):
    """Weights are laid out (in, out/groups, kH, kW): per-channel scales run along axis 1 when
    ``groups == 1``; grouped transposed convs fall back to one scale per tensor."""

    @property
    def weight_axis(self) -> int | None:  # type: ignore[override]
        return 1 if self.groups == 1 else None

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        return F.conv_transpose2d(self.input_quantizer(x), self.quantized_weight(), self.integer_bias(self.bias), self.stride,
                                  self.padding, output_padding, self.groups, self.dilation)


class InputQuantizedModule(QuantizedModule):
    """Pools and activations: quantize the input, then run the float operation."""

    def attach_quantizers(self, scheme: QuantScheme) -> None:
        self.input_quantizer = scheme.activation.build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_quantizer(x))


class QuantMaxPool2d(InputQuantizedModule, nn.MaxPool2d):
    pass


class QuantAvgPool2d(InputQuantizedModule, nn.AvgPool2d):
    pass


class QuantAdaptiveAvgPool2d(InputQuantizedModule, nn.AdaptiveAvgPool2d):
    pass


class QuantReLU(InputQuantizedModule, nn.ReLU):
    pass


class QuantReLU6(InputQuantizedModule, nn.ReLU6):
    pass


class QuantLeakyReLU(InputQuantizedModule, nn.LeakyReLU):
    pass


class QuantSigmoid(InputQuantizedModule, nn.Sigmoid):
    pass


class QuantHardswish(InputQuantizedModule, nn.Hardswish):
    pass


class QuantAdd(QuantizedModule, Add):
    """``input_quantizer`` quantizes the first summand and ``second_input_quantizer`` the second, each with
    its own range (a signed conv output plus an unsigned ReLU'd shortcut, say). With
    ``scheme.shared_add_quantizer`` both share ``input_quantizer`` (one scale) and there is no second."""

    second_input_quantizer: Quantizer | None

    def attach_quantizers(self, scheme: QuantScheme) -> None:
        self.input_quantizer = scheme.activation.build()
        self.second_input_quantizer = None if scheme.shared_add_quantizer else scheme.activation.build()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.second_input_quantizer is None:
            qa, qb = self.input_quantizer.forward_shared(a, b)
            return qa + qb
        return self.input_quantizer(a) + self.second_input_quantizer(b)


class QuantConcat(QuantizedModule, Concat):
    """All inputs share one quantizer, so the concatenated codes have one scale."""

    def attach_quantizers(self, scheme: QuantScheme) -> None:
        self.input_quantizer = scheme.activation.build()

    def forward(self, *tensors: Any) -> torch.Tensor:
        if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
            tensors = tuple(tensors[0])
        return super().forward(*self.input_quantizer.forward_shared(*tensors))


WEIGHTED_MAPPING: dict[type[nn.Module], type[QuantizedModule]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: QuantLinear,
}
POOL_MAPPING: dict[type[nn.Module], type[QuantizedModule]] = {
    nn.MaxPool2d: QuantMaxPool2d,
    nn.AvgPool2d: QuantAvgPool2d,
    nn.AdaptiveAvgPool2d: QuantAdaptiveAvgPool2d,
}
ACTIVATION_MAPPING: dict[type[nn.Module], type[QuantizedModule]] = {
    nn.ReLU: QuantReLU,
    nn.ReLU6: QuantReLU6,
    nn.LeakyReLU: QuantLeakyReLU,
    nn.Sigmoid: QuantSigmoid,
    nn.Hardswish: QuantHardswish,
}
JOIN_MAPPING: dict[type[nn.Module], type[QuantizedModule]] = {Add: QuantAdd, Concat: QuantConcat}
