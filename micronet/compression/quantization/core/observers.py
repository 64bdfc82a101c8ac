"""Observers: streaming range statistics for quantizers, with bounded memory.

An observer only collects statistics; the quantizer that owns it turns them into a scale and zero point.
All statistics are buffers, so checkpoints, resumed runs and DDP broadcasts carry them. Under
``torch.distributed`` each update first reduces the batch statistics across ranks, so every rank ends
with identical observer state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from micronet.compression.quantization.core.affine import NonFiniteInputError, affine_qparams
from micronet.compression.quantization.core.native import activation_kernels, native_ready
from micronet.errors import QuantizationError


def in_distributed_run() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    if in_distributed_run():
        reduce_op = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op]
        dist.all_reduce(tensor, op=reduce_op)
    return tensor


def check_finite(lo: torch.Tensor, hi: torch.Tensor, data: torch.Tensor) -> None:
    """Raise :class:`NonFiniteInputError` unless the batch extremes are finite.

    Extremes are NaN when the data holds a NaN and ±inf when it holds an infinity, so checking the two
    reductions costs nothing next to scanning the data again; ``data`` is only read to name the problem.
    """
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise NonFiniteInputError("NaN" if bool(torch.isnan(data).any()) else "infinite")


class Observer(nn.Module):
    """Base class: per-tensor (``ch_axis=None``) or per-channel statistics of what it is shown."""

    per_channel_supported = True

    def __init__(self, ch_axis: int | None = None, num_channels: int | None = None) -> None:
        super().__init__()
        if ch_axis is not None and not self.per_channel_supported:
            raise QuantizationError(f"{type(self).__name__} is per-tensor only: use minmax or moving_average per channel")
        if (ch_axis is None) != (num_channels is None):
            raise QuantizationError("a per-channel observer needs both ch_axis and num_channels")
        self.ch_axis = ch_axis
        shape = () if num_channels is None else (num_channels,)
        self.register_buffer("min_val", torch.full(shape, math.inf))
        self.register_buffer("max_val", torch.full(shape, -math.inf))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))

    @property
    def is_initialized(self) -> bool:
        return bool(self.initialized.item())

    def _local_min_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach()
        if self.ch_axis is None:
            lo, hi = torch.aminmax(x.float())
        else:
            flat = x.float().transpose(0, self.ch_axis).reshape(x.shape[self.ch_axis], -1)
            if flat.shape[0] != self.min_val.shape[0]:
                raise QuantizationError(
                    f"observer expects {self.min_val.shape[0]} channels on axis {self.ch_axis}, got {flat.shape[0]}"
                )
            lo, hi = torch.aminmax(flat, dim=1)
        check_finite(lo, hi, x)
        return lo, hi

    def batch_min_max(self, x: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Extremes of ``x`` (or of several tensors together), reduced across DDP ranks."""
        if isinstance(x, torch.Tensor):
            lo, hi = self._local_min_max(x)
        else:
            extremes = [self._local_min_max(t) for t in x]
            lo = torch.stack([e[0] for e in extremes]).amin(0)
            hi = torch.stack([e[1] for e in extremes]).amax(0)
        return _all_reduce(lo.clone(), "min"), _all_reduce(hi.clone(), "max")

    #: Whether :meth:`update` accepts a sequence of tensors (observed as one); others get them concatenated.
    accepts_many = True

    @property
    def keeps_latest_only(self) -> bool:
        """True when the statistics are those of the latest tensor alone (so observing it again is idempotent)."""
        return False

    @torch.no_grad()
    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Observe ``x``; a sequence of tensors (e.g. the inputs of an add) is observed as one tensor."""
        if not isinstance(x, torch.Tensor):
            if sum(t.numel() for t in x) == 0:
                return
            if not self.accepts_many:
                x = torch.cat([t.detach().flatten() for t in x])
        elif x.numel() == 0:
            return
        self.update(x)
        self.initialized.fill_(1)

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    #: Whether the class implements :meth:`update_extremes` (per-tensor statistics that are a function of the
    #: batch extremes alone).
    updates_from_extremes = False

    @torch.no_grad()
    def observe_extremes(self, x: torch.Tensor | Sequence[torch.Tensor]) -> tuple[float, float] | None:
        """Observe ``x`` like :meth:`forward` through one C++ min/max pass per tensor and float scalar updates,
        and return the new (min, max); ``None`` (nothing done) where that path does not apply: per-channel or
        other statistics, DDP, no kernels, tensors the kernels do not read, nothing to observe. A training step
        observes dozens of activations, and the tensor path's small operations cost more than the data."""
        if not self.updates_from_extremes or self.ch_axis is not None or in_distributed_run():
            return None
        tensors = [x] if isinstance(x, torch.Tensor) else list(x)
        kernels = activation_kernels()
        if kernels is None or not tensors or not all(t.numel() for t in tensors) or not native_ready(*tensors):
            return None
        lo, hi = math.inf, -math.inf
        for t in tensors:
            t_lo, t_hi, finite = kernels.min_max(t.detach())
            if not finite:
                raise NonFiniteInputError("NaN" if bool(torch.isnan(t).any()) else "infinite")
            lo, hi = min(lo, t_lo), max(hi, t_hi)
        lo, hi = self.update_extremes(lo, hi)
        self.initialized.fill_(1)
        return lo, hi

    def update_extremes(self, lo: float, hi: float) -> tuple[float, float]:
        """Update from the batch extremes (float32 values); return the new (min, max)."""
        raise NotImplementedError

    def _store(self, lo: float, hi: float) -> tuple[float, float]:
        self.min_val.fill_(lo)
        self.max_val.fill_(hi)
        return float(lo), float(hi)

    def range(self, quant_min: int, quant_max: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) float range to map onto [quant_min, quant_max]."""
        return self.min_val, self.max_val

    def extra_repr(self) -> str:
        return "per-tensor" if self.ch_axis is None else f"per-channel (axis {self.ch_axis})"


class MinMaxObserver(Observer):
    """Extremes of the data. ``running=False`` keeps only the latest batch: right for weights, which change
    every step; ``running=True`` keeps the extremes of everything seen (calibration of activations)."""

    def __init__(self, ch_axis: int | None = None, num_channels: int | None = None, running: bool = True) -> None:
        super().__init__(ch_axis, num_channels)
        self.running = running

    @property
    def keeps_latest_only(self) -> bool:
        return not self.running

    @torch.no_grad()
    def set_range_from(self, x: torch.Tensor) -> None:
        """The extremes of ``x`` on this process alone (weights are identical on every DDP rank, and this runs
        where only one rank may be, e.g. in rank 0's evaluation)."""
        lo, hi = self._local_min_max(x)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.initialized.fill_(1)

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self.batch_min_max(x)
        if self.running and self.is_initialized:
            lo, hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)

    updates_from_extremes = True

    def update_extremes(self, lo: float, hi: float) -> tuple[float, float]:
        if self.running and self.is_initialized:
            lo, hi = min(self.min_val.item(), lo), max(self.max_val.item(), hi)
        return self._store(lo, hi)


class MSEObserver(MinMaxObserver):
    """The range, shrunk from the latest tensor's extremes, whose quantization of that tensor has the least
    squared error: per channel when per-channel. Meant for weights after training (post-training
    quantization): with one scale for a whole layer, min/max spends the grid on a few outlier weights and
    rounds all others coarsely; clipping those few costs less than the rounding it saves. The search tries
    ``candidates`` ratios of the min/max range, in (0, 1], and keeps the latest tensor to search on."""

    def __init__(self, ch_axis: int | None = None, num_channels: int | None = None, candidates: int = 100) -> None:
        super().__init__(ch_axis, num_channels, running=False)
        if candidates < 1:
            raise QuantizationError(f"the MSE range search needs at least one candidate (got {candidates})")
        self.candidates = candidates
        self._latest: torch.Tensor | None = None
        self._searched: tuple[torch.Tensor, torch.Tensor] | None = None  # extremes of the tensor searched on

    updates_from_extremes = False  # the search needs the tensor, not only its extremes

    def _seen_before(self, lo: torch.Tensor, hi: torch.Tensor) -> bool:
        """Whether the stored range was searched on a tensor with these extremes: the same weights, seen
        again in the next calibration batch, keep their range without a second search."""
        return (self.is_initialized and self._searched is not None and torch.equal(self._searched[0], lo)
                and torch.equal(self._searched[1], hi))

    def set_range_from(self, x: torch.Tensor) -> None:
        lo, hi = self._local_min_max(x)
        if not self._seen_before(lo, hi):
            super().set_range_from(x)
            self._latest = x.detach()

    def update(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise QuantizationError("the MSE observer searches one tensor's range: use it for weights")
        lo, hi = self.batch_min_max(x)
        if not self._seen_before(lo, hi):
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self._latest = x.detach()

    @torch.no_grad()
    def range(self, quant_min: int, quant_max: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._latest
        if x is None or not self.is_initialized:  # e.g. loaded from a checkpoint: its stored range is the searched one
            return self.min_val, self.max_val
        flat = x.float().reshape(1, -1) if self.ch_axis is None else (
            x.float().transpose(0, self.ch_axis).reshape(x.shape[self.ch_axis], -1))
        lo, hi = self.min_val.reshape(-1), self.max_val.reshape(-1)
        if symmetric:
            bound = torch.maximum(lo.abs(), hi.abs())
            lo, hi = -bound, bound
        else:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        best_error = torch.full_like(lo, math.inf)
        best_lo, best_hi = lo.clone(), hi.clone()
        for ratio in torch.linspace(1.0, 1.0 / self.candidates, self.candidates).tolist():
            cand_lo, cand_hi = lo * ratio, hi * ratio
            scale, zero = affine_qparams(cand_lo, cand_hi, quant_min, quant_max, symmetric)
            scale, zero = scale[:, None], zero.float()[:, None]
            codes = torch.clamp(torch.round(flat / scale) + zero, quant_min, quant_max)
            error = ((codes - zero) * scale - flat).pow(2).sum(dim=1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_lo, best_hi = torch.where(better, cand_lo, best_lo), torch.where(better, cand_hi, best_hi)
        best_lo, best_hi = best_lo.reshape(self.min_val.shape), best_hi.reshape(self.max_val.shape)
        self._searched = (self.min_val.clone(), self.max_val.clone())
        self.min_val.copy_(best_lo)  # what a checkpoint stores, and what a reload without the tensor returns
        self.max_val.copy_(best_hi)
        self._latest = None
        return best_lo, best_hi


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of batch extremes (the first batch is copied)."""

    def __init__(self, ch_axis: int | None = None, num_channels: int | None = None, momentum: float = 0.1) -> None:
        super().__init__(ch_axis, num_channels)
        if not 0 < momentum <= 1:
            raise QuantizationError(f"moving-average momentum must be in (0, 1] (got {momentum})")
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self.batch_min_max(x)
        if self.is_initialized:
            lo = self.min_val + self.momentum * (lo - self.min_val)
            hi = self.max_val + self.momentum * (hi - self.max_val)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)

    updates_from_extremes = True

    def update_extremes(self, lo: float, hi: float) -> tuple[float, float]:
        if not self.is_initialized:
            return self._store(lo, hi)
        f32, momentum = np.float32, np.float32(self.momentum)  # torch casts the Python scalar to float32
        old_lo, old_hi = f32(self.min_val.item()), f32(self.max_val.item())
        with np.errstate(over="ignore"):
            return self._store(old_lo + momentum * (f32(lo) - old_lo), old_hi + momentum * (f32(hi) - old_hi))


class PercentileObserver(Observer):
    """Mean over batches of the ``percentile`` and ``1 − percentile`` quantiles of the data.

    Each batch costs one selection (``kthvalue``), memory stays that of one batch, and every batch weighs
    the same, so the result does not depend on the order of calibration batches.
    """

    per_channel_supported = False
    accepts_many = False

    def __init__(self, ch_axis: int | None = None, num_channels: int | None = None, percentile: float = 0.9999) -> None:
        super().__init__(ch_axis, num_channels)
        if not 0 < percentile <= 1:
            raise QuantizationError(f"percentile must be in (0, 1] (got {percentile})")
        self.percentile = percentile
        self.register_buffer("batches", torch.zeros((), dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().flatten()
        check_finite(*torch.aminmax(flat), flat)
        n = flat.numel()
        k_hi = min(max(int(math.ceil(self.percentile * n)), 1), n)
        k_lo = min(max(n + 1 - k_hi, 1), n)
        stats = torch.stack([flat.kthvalue(k_lo).values, flat.kthvalue(k_hi).values]).double()
        count = torch.ones((), dtype=torch.float64, device=stats.device)
        _all_reduce(stats, "sum"), _all_reduce(count, "sum")
        seen = self.batches if self.is_initialized else torch.zeros_like(self.batches)
        total = seen + count
        lo = (self.min_val.double() * seen + stats[0]) / total if self.is_initialized else stats[0] / count
        hi = (self.max_val.double() * seen + stats[1]) / total if self.is_initialized else stats[1] / count
        self.min_val.copy_(lo.float())
        self.max_val.copy_(hi.float())
        self.batches.copy_(total)


class HistogramObserver(Observer):
    """A fixed-size histogram of everything seen, and the clipping range with the least L2 error.

    Memory is ``bins`` counters whatever the batch size or number of batches. When new data falls outside
    the current range, the histogram is re-binned onto the wider range. :meth:`range` searches clipping
    ranges that shrink the observed one and keeps the one whose quantization (at the quantizer's bit
    width) has the smallest expected squared error over the histogram.
    """

    per_channel_supported = False
    accepts_many = False

    def __init__(self, ch_axis: int | None = None, num_channels: int | None = None, bins: int = 2048, candidates: int = 128) -> None:
        super().__init__(ch_axis, num_channels)
        if bins < 16:
            raise QuantizationError(f"a histogram needs at least 16 bins (got {bins})")
        self.candidates = candidates
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self.batch_min_max(x)
        if self.is_initialized:
            lo, hi = torch.minimum(lo, self.min_val), torch.maximum(hi, self.max_val)
            if lo < self.min_val or hi > self.max_val:
                self._rebin(lo, hi)
        else:
            self.histogram.zero_()
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        if hi <= lo:  # constant data: everything in the first bin
            counts = torch.zeros_like(self.histogram)
            counts[0] = x.numel()
        else:
            counts = torch.histc(x.detach().float(), bins=self.histogram.numel(), min=lo.item(), max=hi.item()).double()
        self.histogram.add_(_all_reduce(counts, "sum"))

    def _rebin(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        bins = self.histogram.numel()
        old_width = (self.max_val - self.min_val).double() / bins
        centers = self.min_val.double() + old_width * (torch.arange(bins, dtype=torch.float64, device=lo.device) + 0.5)
        new_width = (hi - lo).double() / bins
        index = ((centers - lo.double()) / new_width).floor().clamp_(0, bins - 1).long()
        rebinned = torch.zeros_like(self.histogram).index_add_(0, index, self.histogram)
        self.histogram.copy_(rebinned)

    def range(self, quant_min: int, quant_max: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.min_val.double(), self.max_val.double()
        if not self.is_initialized or hi <= lo:
            return self.min_val, self.max_val
        bins = self.histogram.numel()
        width = (hi - lo) / bins
        centers = lo + width * (torch.arange(bins, dtype=torch.float64, device=lo.device) + 0.5)
        ratios = torch.linspace(1.0 / self.candidates, 1.0, self.candidates, dtype=torch.float64, device=lo.device)
        if symmetric:
            bound = torch.maximum(lo.abs(), hi.abs())
            cand_lo, cand_hi = -bound * ratios, bound * ratios
        else:
            cand_lo, cand_hi = torch.clamp(lo, max=0) * ratios, torch.clamp(hi, min=0) * ratios
        scale, zero = affine_qparams(cand_lo.float(), cand_hi.float(), quant_min, quant_max, symmetric)
        scale, zero = scale.double()[:, None], zero.double()[:, None]
        q = torch.clamp(torch.round(centers[None, :] / scale) + zero, quant_min, quant_max)
        error = ((q - zero) * scale - centers[None, :]) ** 2
        best = torch.argmin((error * self.histogram[None, :]).sum(dim=1))
        return cand_lo[best].float(), cand_hi[best].float()


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "histogram": HistogramObserver,
    "mse": MSEObserver,
}


def build_observer(kind: str, ch_axis: int | None = None, num_channels: int | None = None, **options) -> Observer:
    try:
        cls = OBSERVERS[kind]
    except KeyError:
        raise QuantizationError(f"unknown observer {kind!r}: choose one of {', '.join(OBSERVERS)}") from None
    return cls(ch_axis, num_channels, **options)
