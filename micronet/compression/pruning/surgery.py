"""Surgery: replace modules by genuinely smaller ones holding the kept weights.

One small handler per module type builds a fresh module with the new sizes and every other constructor
argument of the original (kernel, stride, padding, dilation, bias, padding_mode, eps, momentum, affine …),
on the original's device and dtype. :func:`resize_module` (fresh, uninitialised sizes only) is shared with
:func:`~micronet.compression.pruning.record.apply_channel_record`; :func:`shrink_module` also copies the
kept slices of weights, biases and BatchNorm statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from micronet.errors import PruningError

__all__ = ["module_sizes", "replace_module", "resize_module", "shrink_module"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def module_sizes(m: nn.Module) -> dict[str, int] | None:
    """The size arguments of a resizable module (None for other modules)."""
    if isinstance(m, _CONVS):
        return {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
    if isinstance(m, _BATCH_NORMS):
        return {"num_features": m.num_features}
    if isinstance(m, nn.Linear):
        return {"in_features": m.in_features, "out_features": m.out_features}
    return None


def resize_module(m: nn.Module, sizes: Mapping[str, int]) -> nn.Module:
    """A fresh module of ``type(m)`` with ``sizes`` and ``m``'s other constructor arguments."""
    p = next(m.parameters(), None)
    if p is None:
        p = next(m.buffers(), None)
    factory = {"device": p.device, "dtype": p.dtype} if p is not None and p.is_floating_point() else {}
    if isinstance(m, _CONVS):
        new = type(m)(sizes["in_channels"], sizes["out_channels"], m.kernel_size, m.stride, m.padding, m.dilation,
                      sizes["groups"], m.bias is not None, m.padding_mode, **factory)
    elif isinstance(m, _BATCH_NORMS):
        new = type(m)(sizes["num_features"], m.eps, m.momentum, m.affine, m.track_running_stats, **factory)
    elif isinstance(m, nn.Linear):
        new = type(m)(sizes["in_features"], sizes["out_features"], m.bias is not None, **factory)
    else:
        raise PruningError(f"cannot resize a {type(m).__name__}: only Conv1d/2d/3d, BatchNorm1d/2d/3d and Linear")
    new.train(m.training)
    return new


def _index(t: torch.Tensor, dim: int, keep: Sequence[int]) -> torch.Tensor:
    return t.detach().index_select(dim, torch.as_tensor(list(keep), dtype=torch.long, device=t.device))


def _copy(dst: torch.Tensor | None, src: torch.Tensor | None) -> None:
    if dst is not None and src is not None:
        dst.data.copy_(src)


def _conv_weight(m: nn.Module, keep_in: list[int], keep_out: list[int], depthwise: bool) -> tuple[torch.Tensor, int]:
    w = m.weight.detach()
    if depthwise:
        return _index(w, 0, keep_out), len(keep_out)
    g = m.groups
    w = _index(w, 0, keep_out)
    if g == 1:
        return _index(w, 1, keep_in), 1
    ipg, opg = m.in_channels // g, m.out_channels // g
    new_opg = len(keep_out) // g
    rows = []
    for b in range(g):
        cols = [p - b * ipg for p in keep_in if p // ipg == b]
        block = w[b * new_opg:(b + 1) * new_opg]
        if len(cols) * g != len(keep_in) or new_opg * g != len(keep_out) or \
                any(o // opg != b for o in keep_out[b * new_opg:(b + 1) * new_opg]):
            raise PruningError(f"grouped conv would lose equal group sizes (groups={g}): this is a bug in channel "
                               "selection, please report it with the model")
        rows.append(_index(block, 1, cols))
    return torch.cat(rows, 0), g


def shrink_module(m: nn.Module, keep_in: list[int], keep_out: list[int], kind: str) -> nn.Module:
    """A smaller copy of ``m`` keeping input positions ``keep_in`` and output positions ``keep_out``."""
    with torch.no_grad():
        if kind in ("conv", "depthwise"):
            weight, groups = _conv_weight(m, keep_in, keep_out, kind == "depthwise")
            new = resize_module(m, {"in_channels": len(keep_in), "out_channels": len(keep_out), "groups": groups})
            _copy(new.weight, weight)
            if m.bias is not None:
                _copy(new.bias, _index(m.bias, 0, keep_out))
        elif kind == "linear":
            new = resize_module(m, {"in_features": len(keep_in), "out_features": len(keep_out)})
            _copy(new.weight, _index(_index(m.weight, 0, keep_out), 1, keep_in))
            if m.bias is not None:
                _copy(new.bias, _index(m.bias, 0, keep_out))
        elif kind == "bn":
            new = resize_module(m, {"num_features": len(keep_out)})
            for name in ("weight", "bias"):
                if getattr(m, name) is not None:
                    _copy(getattr(new, name), _index(getattr(m, name), 0, keep_out))
            for name in ("running_mean", "running_var"):
                if getattr(m, name) is not None:
                    _copy(getattr(new, name), _index(getattr(m, name), 0, keep_out))
            if m.num_batches_tracked is not None:
                _copy(new.num_batches_tracked, m.num_batches_tracked)
        else:
            raise PruningError(f"unknown layer kind {kind!r}")
    for name, p in m.named_parameters(recurse=False):
        getattr(new, name).requires_grad_(p.requires_grad)
    return new


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (dotted) inside ``root``: torch's ``root.set_submodule(path, new)``, kept for
    callers of this name."""
    root.set_submodule(path, new)
