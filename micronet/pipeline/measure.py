"""Measure one model of the results table: size, complexity, accuracy in PyTorch and ONNX Runtime, latency.

Every number comes from the artifact itself: parameters and FLOPs from a traced forward, the theoretical
size from each weight's bit width, the file sizes from the bytes on disk, ONNX Runtime accuracy from running
the exported file on the test split, latency from timed runs of that file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from micronet.errors import MicronetError

ONNX_FILE = "model.onnx"
PACKED_DIR = "packed"


def _weight_bits(model: nn.Module) -> float:
    """The most common bit width of the quantized weights (32 for a float model)."""
    from micronet.analysis.complexity import parameter_bits

    widths = Counter(bits for name, bits in parameter_bits(model).items() if name.endswith("weight") and bits < 32)
    return widths.most_common(1)[0][0] if widths else 32


def _activation_bits(model: nn.Module) -> float:
    """Bits of the activations the scheme quantizes (sign activations: 1; none quantized: 32)."""
    scheme = getattr(model, "quant_scheme", None)
    if scheme is None:
        return 32
    if scheme.activation_replacement is not None:
        return scheme.activation_replacement.bits
    spec = scheme.activation
    return 32 if spec is None or spec.family == "float" else spec.bits


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _test_accuracy(model: nn.Module, checkpoint: Any, splits: Any) -> float:
    acc = checkpoint.metrics.get("test_acc")
    if acc is not None:
        return float(acc)
    from micronet.data import BatchLoader
    from micronet.engine import evaluate

    return float(evaluate(model, BatchLoader(splits.test, 512), torch.device("cpu"))["acc"])


def measure_model(step_dir: Path, row: dict[str, Any], splits: Any, measure: dict[str, Any]) -> dict[str, Any]:
    """One row of the results table for the checkpoint in ``step_dir`` (see ``report.json``'s schema)."""
    from micronet.analysis import summarize
    from micronet.compression.quantization.core.workflow import is_prepared
    from micronet.engine import load_checkpoint
    from micronet.engine.checkpoint import resolve_checkpoint

    checkpoint = load_checkpoint(resolve_checkpoint(step_dir))
    model = checkpoint.build_model().cpu().eval()
    info = splits.info
    shape = (info.in_channels, *info.image_size)
    summary = summarize(model, shape)
    w_bits = row.get("w_bits", _weight_bits(model))
    result: dict[str, Any] = {
        "type": row["type"], "model": checkpoint.arch.name, "w_bits": w_bits,
        "a_bits": row.get("a_bits", _activation_bits(model)),
        "acc_torch": _test_accuracy(model, checkpoint, splits) * 100, "acc_ort": None,
        "gflops": summary.flops / 1e9, "params_m": summary.params / 1e6, "size_mb": summary.size_bytes / 1e6,
        "file_mb": None, "packed_mb": None, "latency_ms_b1": None, "latency_ms_b64": None,
        "int8_onnx": False, "quantized": is_prepared(model), "test_images": len(splits.test), "errors": [],
    }
    if row.get("pack", is_prepared(model) and w_bits < 8):
        result["packed_mb"] = _packed_megabytes(model, checkpoint, step_dir / PACKED_DIR, result["errors"])
    if measure.get("onnx", True):
        _measure_onnx(model, step_dir / ONNX_FILE, shape, splits, measure, result)
    if row.get("packed_runtime", is_prepared(model) and w_bits == 1 and result["a_bits"] == 1):
        _measure_packed_runtime(model, shape, measure, result)
    return result


def _measure_packed_runtime(model: nn.Module, shape: tuple[int, ...], measure: dict[str, Any],
                            result: dict[str, Any]) -> None:
    """Latency on the bit-packed binary runtime, at the thread count and batch sizes ONNX Runtime gets."""
    from micronet.deploy.packed import compile_packed
    from micronet.deploy.packed.benchmark import benchmark_packed

    try:
        packed = compile_packed(model, float_layout="channels_last")  # the fast form (top-1 equal, not bit-exact)
    except MicronetError as error:
        result["errors"].append(f"packed runtime: {error}")
        return
    batches = [int(b) for b in measure.get("batch_sizes", [1, 64])]
    for timing in benchmark_packed(packed, shape, batches, [int(measure.get("threads", 1))],
                                   warmup=int(measure.get("warmup", 3)), repeats=int(measure.get("repeats", 20))):
        result[f"packed_latency_ms_b{timing['batch']}"] = timing["median (ms)"]


def _packed_megabytes(model: nn.Module, checkpoint: Any, out: Path, errors: list[str]) -> float | None:
    from micronet.compression.packing import fold_for_packing, save_packed

    try:
        packable, _ = fold_for_packing(model)  # as `micronet pack`: BN-folding convs fused, so their codes pack
        save_packed(packable, out, data_info=checkpoint.data_info, metrics=checkpoint.metrics)
    except MicronetError as error:
        errors.append(f"packing: {error}")
        return None
    return _directory_bytes(out) / 1e6


def _measure_onnx(model: nn.Module, path: Path, shape: tuple[int, ...], splits: Any, measure: dict[str, Any],
                  result: dict[str, Any]) -> None:
    """Export, evaluate on the test split and time in ONNX Runtime; a model that cannot be exported keeps
    its row, with the reason in ``errors`` (the report shows it) instead of stopping the pipeline."""
    from micronet.deploy.onnx import export
    from micronet.deploy.onnxruntime import benchmark, evaluate

    try:
        report = export(model, path, torch.zeros(1, *shape), exporter=measure.get("exporter", "dynamo"),
                        metadata={"micronet.dataset": splits.info.name})
    except MicronetError as error:
        result["errors"].append(f"ONNX export: {error}")
        return
    result["file_mb"] = report.file_bytes / 1e6
    result["int8_onnx"] = report.quantized
    threads = int(measure.get("threads", 1))
    result["acc_ort"] = evaluate(report.path, splits.test, threads=threads)["acc"] * 100
    batches = [int(b) for b in measure.get("batch_sizes", [1, 64])]
    timings = benchmark(report.path, batch_sizes=batches, threads=[threads], warmup=int(measure.get("warmup", 3)),
                        repeats=int(measure.get("repeats", 20)))
    for timing in timings:
        result[f"latency_ms_b{timing.batch}"] = timing.median_ms
    from micronet.deploy.openvino import openvino_version

    if openvino_version() is not None and measure.get("openvino", True):  # the second CPU runtime, when installed
        try:
            result["acc_openvino"] = evaluate(report.path, splits.test, threads=threads, runtime="openvino")["acc"] * 100
            for timing in benchmark(report.path, batch_sizes=batches, threads=[threads], runtime="openvino",
                                    warmup=int(measure.get("warmup", 3)), repeats=int(measure.get("repeats", 20))):
                result[f"openvino_ms_b{timing.batch}"] = timing.median_ms
        except MicronetError as error:
            result["errors"].append(f"OpenVINO: {error}")
