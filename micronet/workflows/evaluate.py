"""evaluate: accuracy of a checkpoint (PyTorch, or the packed binary runtime) or of an ONNX file (ONNX Runtime,
OpenVINO) on a dataset split."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from micronet.errors import ConfigError
from micronet.workflows.common import Log, dataset_name, device_context, load_data, say
from micronet.workflows.options import DataFromCheckpoint, DeviceOptions, option
from micronet.workflows.source import UserModelOptions, open_source

RUNTIMES = ["torch", "packed", "onnxruntime", "openvino"]
RUNTIME_HELP = ("--checkpoint: torch (default), or packed = binary layers on the bit-packed XNOR-popcount kernels "
                "(wbwtab W=2 A=2 models; MICRONET_PACKED_ISA picks the kernels); --onnx: onnxruntime (default) or "
                "openvino (pip install openvino)")


# bases in reverse: a dataclass lists the fields of its last base first
@dataclass(kw_only=True)
class EvaluateOptions(DeviceOptions, DataFromCheckpoint, UserModelOptions):
    checkpoint: str | None = option(None, "--checkpoint", help="checkpoint directory, or a run directory (uses its best/)")
    onnx: str | None = option(None, "--onnx", metavar="FILE",
                              help="evaluate this ONNX file in ONNX Runtime (CPU) instead of a checkpoint")
    split: str = option("test", "--split", choices=["test", "val", "train"])
    batch_size: int = option(512, "--batch-size", type=int)
    threads: int = option(1, "--threads", type=int, help="--onnx: runtime threads; --runtime packed: kernel threads")
    runtime: str | None = option(None, "--runtime", choices=RUNTIMES, help=RUNTIME_HELP)


@dataclass
class Accuracy:
    """Accuracy and mean loss of a model on ``samples`` images of ``dataset``'s ``split``."""

    acc: float
    loss: float
    samples: int
    dataset: str
    split: str


def onnx_runtime(runtime: str | None) -> str:
    """The runtime that runs an ONNX file (ONNX Runtime unless --runtime openvino)."""
    if runtime in ("torch", "packed"):
        raise ConfigError(f"--runtime {runtime} runs a checkpoint, not an ONNX file: pass --checkpoint DIR instead "
                          "of --onnx, or --runtime onnxruntime|openvino")
    return runtime or "onnxruntime"


def evaluate(options: EvaluateOptions, *, log: Log = say) -> Accuracy:
    """Accuracy of ``options.checkpoint`` or ``options.onnx`` on the chosen split; logs the result line."""
    if (options.checkpoint or options.model) and options.onnx:
        raise ConfigError("pass either --checkpoint DIR (or --model MODULE:CALLABLE --weights FILE) or --onnx FILE, not both")
    if options.onnx and options.runtime == "packed":
        raise ConfigError("--runtime packed runs a checkpoint, not an ONNX file: pass --checkpoint DIR instead of --onnx")
    if (options.checkpoint or options.model) and options.runtime in ("onnxruntime", "openvino"):
        raise ConfigError(f"--runtime {options.runtime} runs an ONNX file: pass --onnx FILE (micronet export writes one)")
    if options.onnx:
        return _evaluate_onnx(options, log)
    if not options.checkpoint and not options.model:
        raise ConfigError("pass --checkpoint DIR or --onnx FILE (or your own model: --model MODULE:CALLABLE --weights FILE)")
    return _evaluate_checkpoint(options, log)


def _evaluate_onnx(options: EvaluateOptions, log: Log) -> Accuracy:
    from micronet.deploy.onnx import read_metadata
    from micronet.deploy.onnxruntime import build_session, runtime_label
    from micronet.deploy.onnxruntime import evaluate as evaluate_session

    name = options.data or read_metadata(options.onnx).get("micronet.dataset")
    if not name:
        raise ConfigError(f"{options.onnx} does not record its dataset: pass --data (e.g. --data fashion-mnist)")
    runtime = onnx_runtime(options.runtime)
    session = build_session(options.onnx, threads=options.threads, runtime=runtime)
    splits = load_data(options, name)
    stats = evaluate_session(session, getattr(splits, options.split), batch_size=options.batch_size)
    log(f"{options.onnx} on {splits.info.name} {options.split}: accuracy {stats['acc'] * 100:.2f}%, "
        f"loss {stats['loss']:.4f}, {stats['samples']} images ({runtime_label(options.threads, runtime)})")
    return Accuracy(stats["acc"], stats["loss"], stats["samples"], splits.info.name, options.split)


def _evaluate_checkpoint(options: EvaluateOptions, log: Log) -> Accuracy:
    from micronet.compression.packing import is_packed_artifact, load_packed, read_packed_meta
    from micronet.data import BatchLoader
    from micronet.engine import evaluate as evaluate_model
    from micronet.engine.checkpoint import Checkpoint
    from micronet.io import resolve_directory

    ctx = device_context(options)
    if options.checkpoint and is_packed_artifact(options.checkpoint):  # `micronet pack` output: weights unpacked
        path = resolve_directory(options.checkpoint)
        checkpoint = Checkpoint(path, read_packed_meta(path), {})
        model = load_packed(path).to(ctx.device)
    else:
        checkpoint = open_source(options)
        model = checkpoint.build_model().to(ctx.device)
    name = dataset_name(options, checkpoint)
    if name is None:
        raise ConfigError(f"{checkpoint.path} does not record its dataset: pass --data")
    splits = load_data(options, name)
    info, arch = splits.info, checkpoint.arch
    if (info.in_channels, info.num_classes) != (arch.in_channels, arch.num_classes):
        raise ConfigError(f"{checkpoint.path} expects {arch.in_channels}-channel inputs and {arch.num_classes} classes, "
                          f"but {info.name} has {info.in_channels} and {info.num_classes}: evaluate on the dataset it was trained on")
    runtime = ""
    if options.runtime == "packed":
        model = packed_model(model, log=log)
        runtime = f" (packed runtime, {options.threads} thread(s))"
    with intra_op_threads(options.threads if options.runtime == "packed" else None):
        stats = evaluate_model(model, BatchLoader(getattr(splits, options.split), options.batch_size), ctx.device)
    log(f"{arch.name} ({checkpoint.path}) on {info.name} {options.split}: accuracy {stats['acc'] * 100:.2f}%, "
        f"loss {stats['loss']:.4f}, {stats['samples']} images{runtime}")
    return Accuracy(stats["acc"], stats["loss"], stats["samples"], info.name, options.split)


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` (None: unchanged) inside, restored after: a library
    call never changes the caller's setting."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def packed_model(model: Any, float_layout: str = "model", *, log: Log = say) -> Any:
    """``model`` compiled for the packed runtime; logs what runs where."""
    from micronet.deploy.packed import compile_packed

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed = compile_packed(model.cpu(), float_layout=float_layout)
    for warning in caught:
        log(f"warning: {warning.message}")
    log(f"packed runtime: {packed.report.summary()}")
    return packed
