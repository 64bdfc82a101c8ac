"""Latency of a packed model, end to end and per layer, measured the way the ONNX Runtime benchmark is."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from micronet.deploy.packed.compiler import PackedModel
from micronet.errors import ConfigError
from micronet.machine import percentile

__all__ = ["benchmark_packed", "layer_times"]


def _timed(fn: Any, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def benchmark_packed(model: PackedModel, input_shape: tuple[int, int, int], batch_sizes: Sequence[int] = (1, 64),
                     threads: Sequence[int] = (1, 2), warmup: int = 5, repeats: int = 30,
                     seed: int = 0) -> list[dict[str, Any]]:
    """Median and p90 ms per forward for every (threads, batch): torch's intra-op threads are set to each
    count (the kernels split output rows over them) and restored afterwards."""
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"warmup {warmup} / repeats {repeats} are invalid: use warmup >= 0 and repeats >= 1")
    generator = torch.Generator().manual_seed(seed)
    previous = torch.get_num_threads()
    rows = []
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for batch in batch_sizes:
                x = torch.randn((batch, *input_shape), generator=generator)
                times = _timed(lambda: model(x), warmup, repeats)
                median = percentile(times, 0.5)
                rows.append({"runtime": f"packed ({model.isa})", "threads": n_threads, "batch": batch,
                             "median (ms)": round(median * 1e3, 3), "p90 (ms)": round(percentile(times, 0.9) * 1e3, 3),
                             "images/s": round(batch / median, 1), "load avg": round(os.getloadavg()[0], 2)})
    finally:
        torch.set_num_threads(previous)
    return rows


def layer_times(model: nn.Module, x: torch.Tensor, repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median ms per leaf module over ``repeats`` forwards (forward hooks around each call)."""
    samples: dict[str, list[float]] = defaultdict(list)
    started: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if not name or next(module.children(), None) is not None:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, i, n=name: started.__setitem__(n, time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, i, o, n=name: samples[n].append(time.perf_counter() - started[n])))
    try:
        with torch.no_grad():
            for _ in range(warmup):
                model(x)
            samples.clear()
            for _ in range(repeats):
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: percentile(values, 0.5) * 1e3 * len(values) / repeats for name, values in samples.items()}
