"""benchmark: latency of an ONNX file (ONNX Runtime, OpenVINO) and its int8 coverage, or of a binary model on
the packed runtime."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from micronet.errors import ConfigError
from micronet.workflows.common import Log, claim, int_list, say
from micronet.workflows.evaluate import RUNTIME_HELP, RUNTIMES, onnx_runtime, packed_model
from micronet.workflows.options import Overwrite, option


@dataclass(kw_only=True)
class BenchmarkOptions(Overwrite):
    onnx: str | None = option(None, "--onnx", metavar="FILE", help="ONNX file (input N×C×H×W with static C, H, W)")
    checkpoint: str | None = option(None, "--checkpoint",
                                    help="with --runtime packed: a binary checkpoint or packed artifact")
    runtime: str | None = option(None, "--runtime", choices=RUNTIMES, help=RUNTIME_HELP)
    batch_sizes: str = option("1,64", "--batch-sizes",
                              help="comma-separated batch sizes (the file needs a dynamic batch for more than one)")
    threads: str = option("1,2", "--threads", help="comma-separated ONNX Runtime intra-op thread counts")
    warmup: int = option(5, "--warmup", type=int, help="untimed runs before each measurement")
    repeats: int = option(30, "--repeats", type=int, help="timed runs per batch size and thread count")
    optimization: str = option("all", "--optimization", choices=["disable", "basic", "extended", "all"],
                               help="ONNX Runtime graph optimization level")
    coverage: bool = option(False, "--coverage", action="store_true",
                            help="also print which ops ONNX Runtime runs in int8 and which stay float")
    json: str | None = option(None, "--json", metavar="PATH", help="also write the results (and coverage) as JSON")


@dataclass
class BenchmarkResult:
    """One row per batch size and thread count (as the printed table), and the int8 coverage when asked for."""

    rows: list[dict[str, Any]]
    coverage: Any = None


def benchmark(options: BenchmarkOptions, *, log: Log = say) -> BenchmarkResult:
    """Time the ONNX file (or the packed runtime) as ``options`` say; logs the table."""
    from micronet.analysis import format_table
    from micronet.deploy.onnxruntime import benchmark as time_onnx
    from micronet.deploy.onnxruntime import int8_coverage, machine_header, runtime_label
    from micronet.deploy.onnxruntime.benchmark import BENCHMARK_JSON_OUTPUT
    from micronet.io import atomic_write_text

    batch_sizes, threads = int_list(options.batch_sizes, "--batch-sizes"), int_list(options.threads, "--threads")
    if options.json:
        claim(options.json, BENCHMARK_JSON_OUTPUT, options.overwrite, flag="--json")
    if options.runtime == "packed" or options.checkpoint:
        return _benchmark_packed(options, batch_sizes, threads, log)
    if not options.onnx:
        raise ConfigError("pass --onnx FILE, or --checkpoint DIR --runtime packed")
    runtime = onnx_runtime(options.runtime)
    results = time_onnx(options.onnx, batch_sizes=batch_sizes, threads=threads, warmup=options.warmup,
                        repeats=options.repeats, optimization=options.optimization, runtime=runtime)
    where = f"optimization {options.optimization}" if runtime == "onnxruntime" else runtime_label(threads[0], runtime)
    log(f"{options.onnx}: input {'x'.join(map(str, results[0].input_shape))}, {where}, "
        f"{options.warmup} warm-up + {options.repeats} timed runs each")
    log(machine_header(results[0].machine))
    rows = [r.row() for r in results]
    log(format_table(rows))
    shared = [r for r in results if r.others_cores is not None and r.others_cores >= 0.25]
    if shared:
        log(f"!! other processes used {max(r.others_cores for r in shared):.2f} cores during {len(shared)} of "
            f"{len(results)} measurements: the machine was shared, rerun for comparable numbers")
    report = int8_coverage(options.onnx, optimization=options.optimization) if options.coverage else None
    if report is not None:
        log(report.to_text())
    if options.json:
        payload = {"machine": results[0].machine, "results": [{k: v for k, v in r.to_json().items() if k != "machine"}
                                                              for r in results],
                   "coverage": report.to_json() if report else None}
        atomic_write_text(options.json, json.dumps(payload, indent=1) + "\n")
        log(f"wrote {options.json}")
    return BenchmarkResult(rows, report)


def _benchmark_packed(options: BenchmarkOptions, batch_sizes: list[int], threads: list[int], log: Log) -> BenchmarkResult:
    from micronet.analysis import format_table
    from micronet.compression.packing import is_packed_artifact, load_packed, read_packed_meta
    from micronet.deploy.packed.benchmark import benchmark_packed
    from micronet.machine import cpu_flags, cpu_model
    from micronet.workflows.common import load_source

    if options.onnx or not options.checkpoint or options.runtime != "packed":
        raise ConfigError("the packed runtime times a checkpoint: pass --checkpoint DIR --runtime packed (without --onnx)")
    if is_packed_artifact(options.checkpoint):
        meta, model = read_packed_meta(options.checkpoint), load_packed(options.checkpoint)
        info = meta.get("data") or {}
    else:
        checkpoint = load_source(options.checkpoint)
        model, info = checkpoint.build_model(), (checkpoint.data_info.to_json() if checkpoint.data_info else {})
    if not info.get("image_size"):
        raise ConfigError(f"{options.checkpoint} does not record its input size: train it with micronet")
    packed = packed_model(model, "channels_last", log=log)  # timed in its fast form
    shape = (int(info["in_channels"]), *map(int, info["image_size"]))
    rows = benchmark_packed(packed, shape, batch_sizes, threads, options.warmup, options.repeats)
    log(f"{options.checkpoint}: input {'x'.join(map(str, shape))}, {options.warmup} warm-up + {options.repeats} timed runs each")
    log(f"{cpu_model()} | flags: {cpu_flags()} | load avg {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    log(format_table(rows))
    return BenchmarkResult(rows)
