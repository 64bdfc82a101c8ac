"""Tensor operations wrapped as :class:`torch.nn.Module` objects.

A functional ``a + b`` or ``torch.cat`` inside ``forward`` is invisible to module swapping: a quantizer
cannot put an observer on it and a pruning dependency graph built from modules cannot see that two
branches are joined. Models in :mod:`micronet.models` therefore route every residual addition through
:class:`Add` and every concatenation through :class:`Concat`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Add", "Concat"]


class Add(nn.Module):
    """Element-wise sum of two tensors: ``forward(a, b) = a + b`` (a new tensor, inputs untouched)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Concat(nn.Module):
    """Concatenation along ``dim`` (default 1, the channel axis of NCHW).

    Call it with the tensors as separate arguments, ``cat(x, y, z)``, or with one list or tuple of
    tensors, ``cat([x, y, z])``. The output holds the inputs in call order.
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *tensors: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
            tensors = tuple(tensors[0])
        if not tensors:
            raise ValueError("Concat needs at least one tensor: pass the tensors to join as arguments or as one list")
        return torch.cat(tensors, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
