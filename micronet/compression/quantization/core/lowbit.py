"""Low-bit quantizer families (sign activations; binary, ternary and DoReFa weights and activations).

They are configurations of the same :class:`~micronet.compression.quantization.core.quantizers.Quantizer`
mechanism as the affine integer quantizers: each is registered with
:func:`~micronet.compression.quantization.core.scheme.register_quantizer_family` and placed by ``prepare``.
"""

from __future__ import annotations

import torch
from torch import nn


class _SignSTE(torch.autograd.Function):
    """sign(x) with sign(0) = +1; gradient passed where |x| < 1 and zeroed outside (hardtanh STE)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() < 1).to(grad.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Binary activation: values exactly {−1, +1} (0 → +1), hardtanh straight-through gradient."""
    return _SignSTE.apply(x)


class SignActivation(nn.Module):
    """A binary activation layer (replaces the ReLU in front of a binarized layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sign_ste(x)
