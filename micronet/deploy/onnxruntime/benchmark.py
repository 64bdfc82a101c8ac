"""Latency of an ONNX file in ONNX Runtime per batch size and thread count, with the machine it ran on.

A latency is the median (and p90) wall time of one ``session.run`` call after warm-up, on fixed random
inputs. The machine is usually shared, so every result also records the load average and how many cores
*other* processes used while it was timed: compare numbers only from the same call, and rerun when
``others_cores`` is a quarter of a core or more. Never assert speed ratios in tests.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from micronet.deploy.onnxruntime.session import ModelSource, build_session, check_batch, check_image_shape, image_shape
from micronet.errors import ConfigError
from micronet.machine import busy_ticks, cpu_flags, cpu_model, others_cores, percentile
from micronet.outputs import OutputKind, read_json_dict

BENCHMARK_JSON_OUTPUT = OutputKind("benchmark result",
                                   lambda path: {"machine", "results"} <= set(read_json_dict(path) or {}),
                                   directory=False)

MIN_WALL_S = 0.5  # /proc/stat counts 10 ms ticks: shorter intervals give meaningless "other cores"


@dataclass(frozen=True)
class BenchmarkResult:
    """One (batch, threads) measurement; ``machine`` is shared by all results of one :func:`benchmark` call."""

    batch: int
    threads: int
    input_shape: tuple[int, int, int]
    median_ms: float
    p90_ms: float
    images_per_s: float
    repeats: int
    optimization: str
    loadavg: tuple[float, float, float]
    others_cores: float | None  # None: timed too briefly (< MIN_WALL_S) to tell from the CPUs' clock ticks
    machine: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def row(self) -> dict[str, Any]:
        """A table row (see :func:`micronet.analysis.format_table`)."""
        return {"batch": self.batch, "threads": self.threads, "median ms": round(self.median_ms, 3),
                "p90 ms": round(self.p90_ms, 3), "images/s": round(self.images_per_s, 1),
                "other cores": None if self.others_cores is None else round(self.others_cores, 2),
                "load avg": round(self.loadavg[0], 2)}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def machine_info() -> dict[str, Any]:
    """CPU model, vector extensions, torch's CPU capability and the ORT version: what decides the kernels."""
    import torch

    from micronet.deploy.openvino import openvino_version

    return {"onnxruntime": ort.__version__, "openvino": openvino_version(), "python": platform.python_version(), "cpu": cpu_model(),
            "cpu_flags": cpu_flags(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "os_cpu_count": os.cpu_count(), "loadavg_at_start": os.getloadavg()}


def machine_header(machine: dict[str, Any]) -> str:
    """One line describing :func:`machine_info`'s result."""
    load = machine["loadavg_at_start"]
    return (f"ONNX Runtime {machine['onnxruntime']} | {machine['cpu']} | cpu capability {machine['cpu_capability']} | "
            f"flags: {machine['cpu_flags']} | {machine['os_cpu_count']} CPUs | load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def _positive(name: str, values: Sequence[int]) -> list[int]:
    values = list(values)
    if not values or any(not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"{name} must be positive integers (got {values}): e.g. 1,64")
    return values


def _time_runs(session: ort.InferenceSession, x: np.ndarray, warmup: int, repeats: int) -> list[float]:
    feed = {session.get_inputs()[0].name: x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return times


def benchmark(path: ModelSource, input_shape: tuple[int, int, int] | None = None, batch_sizes: Sequence[int] = (1, 64),
              threads: Sequence[int] = (1, 2), warmup: int = 5, repeats: int = 30,
              optimization: str = "all", seed: int = 0, runtime: str = "onnxruntime") -> list[BenchmarkResult]:
    """Time ``path`` for every (threads, batch) pair; ``input_shape`` (C,H,W) defaults to the model's own.
    ``runtime``: "onnxruntime" or "openvino" (the same file; ``optimization`` is ORT's only).

    A model exported with a fixed batch raises :class:`~micronet.errors.DeployError` for any other batch.
    """
    batch_sizes, threads = _positive("batch sizes", batch_sizes), _positive("thread counts", threads)
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"warmup {warmup} / repeats {repeats} are invalid: use warmup >= 0 and repeats >= 1")
    machine = machine_info()
    results = []
    rng = np.random.default_rng(seed)
    for n_threads in threads:
        session = build_session(path, threads=n_threads, optimization=optimization, runtime=runtime)
        if input_shape is None:
            input_shape = image_shape(session)
        else:
            check_image_shape(session, tuple(input_shape), "the requested input shape",
                              "pass the C,H,W the model was exported with")
        for batch in batch_sizes:
            check_batch(session, batch)
            x = rng.standard_normal((batch, *input_shape), dtype=np.float32)
            before, start = busy_ticks(), time.perf_counter()
            times = _time_runs(session, x, warmup, repeats)
            wall = time.perf_counter() - start
            median = percentile(times, 0.5)
            others = others_cores(before, busy_ticks(), wall) if wall >= MIN_WALL_S else None
            results.append(BenchmarkResult(
                batch=batch, threads=n_threads, input_shape=tuple(input_shape), median_ms=median * 1e3, p90_ms=percentile(times, 0.9) * 1e3,
                images_per_s=batch / median, repeats=repeats,
                optimization=optimization if runtime == "onnxruntime" else runtime, loadavg=os.getloadavg(),
                others_cores=others, machine=machine))
    return results
