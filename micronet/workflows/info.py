"""info: parameters, MACs, GFLOPs and size of a registry model, a checkpoint or a packed artifact (with the
bytes each quantized layer takes on disk), or the list of registry models and datasets."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from micronet.errors import ConfigError
from micronet.workflows.common import Log, cfg_list, load_source, parse_shape, say, summary_table
from micronet.workflows.options import option
from micronet.workflows.source import UserModel, check_source_options, is_user_model


@dataclass(kw_only=True)
class InfoOptions:
    checkpoint: str | None = option(None, "--checkpoint", exclusive="source", help="checkpoint or run directory")
    model: str | None = option(None, "--model", exclusive="source",
                               help="registry model name, or your own model as MODULE:CALLABLE (see --weights)")
    weights: str | None = option(None, "--weights", metavar="FILE",
                                 help="--model MODULE:CALLABLE: its trained state dict (.safetensors, or .pt/.pth of "
                                      "tensors only)")
    list: bool = option(False, "--list", exclusive="source", action="store_true",
                        help="list registry models and datasets")
    cfg: list[str] | None = option(None, "--cfg", nargs="+", help="channel config for --model")
    num_classes: int = option(10, "--num-classes", type=int)
    input_shape: str | None = option(None, "--input-shape", help="C,H,W (default: the checkpoint's dataset, else 1,28,28)")


@dataclass
class InfoResult:
    """What was described (``header``), at which input shape, and the bytes per quantized layer when known."""

    header: str
    input_shape: tuple[int, ...] | None
    model: Any = None
    layer_sizes: list[dict[str, Any]] = field(default_factory=list)


def info(options: InfoOptions, *, log: Log = say) -> InfoResult:
    """Describe what ``options`` name; logs the header line and the tables."""
    from micronet.analysis import format_table
    from micronet.data import list_datasets
    from micronet.models import default_cfg, list_models, model_arch

    if sum(bool(x) for x in (options.checkpoint, options.model, options.list)) != 1:
        raise ConfigError("pass one of --checkpoint DIR, --model NAME or --list")
    if options.list:
        lines = [f"model    {name:12s} default cfg {default_cfg(name)}" for name in list_models()]
        lines += [f"dataset  {name}" for name in list_datasets()]
        for line in lines:
            log(line)
        return InfoResult(header="\n".join(lines), input_shape=None)
    shape = parse_shape(options.input_shape) if options.input_shape else None
    model, header, held, sizes = _describe(options, shape)
    in_channels = model_arch(model).in_channels
    if shape is None:
        shape = (held.in_channels, *held.image_size) if held else (in_channels, 28, 28)
    if shape[0] != in_channels:
        raise ConfigError(f"--input-shape has {shape[0]} channels but the model takes {in_channels}")
    log(header)
    log(summary_table(model, shape, {"input": "x".join(map(str, shape))}))
    if sizes:
        log("quantized layers (on disk: bytes in the tensor file, from its header):")
        log(format_table(sizes))
    return InfoResult(header=header, input_shape=shape, model=model, layer_sizes=sizes or [])


def _describe(options: InfoOptions, shape: tuple[int, ...] | None):
    """(model, header line, dataset info or None, size rows or None) of what ``options`` name."""
    from micronet.compression.packing import is_packed_artifact, layer_size_rows
    from micronet.engine.checkpoint import MODEL_FILE
    from micronet.models import build_model, model_arch

    if is_user_model(options.model) or options.weights:
        check_source_options(options, weights_required=False)
        sizing = SimpleNamespace(num_classes=options.num_classes, in_channels=shape[0] if shape else 1)
        model = UserModel(options.model, options.weights, sizing).build_model()
        header = f"{options.model}" + (f" with {options.weights}" if options.weights else " (initial weights)")
        return model, header, None, None
    if options.checkpoint and is_packed_artifact(options.checkpoint):
        return _packed_info(options.checkpoint)
    if options.checkpoint:
        checkpoint = load_source(options.checkpoint)
        model = checkpoint.build_model()
        arch = model_arch(model)
        header = f"{checkpoint.path}: {arch.name} cfg {list(arch.cfg)}"
        if checkpoint.pruning_record:
            origin = checkpoint.metrics.get("pruned_from")
            header += " (pruned" + (f" from {origin})" if origin else ")")
        metrics = {k: v for k, v in checkpoint.metrics.items() if k.endswith("acc")}
        if metrics:
            header += " | " + ", ".join(f"{k} {v * 100:.2f}%" for k, v in metrics.items())
        return model, header, checkpoint.data_info, layer_size_rows(model, checkpoint.path / MODEL_FILE)
    in_channels = shape[0] if shape else 1
    model = build_model(options.model, num_classes=options.num_classes, in_channels=in_channels,
                        cfg=cfg_list(options.cfg))
    return model, f"{options.model} cfg {list(model_arch(model).cfg)}", None, None  # default input: 1x28x28


def _packed_info(path: str):
    """(model, header line, dataset info, size rows) of a packed artifact."""
    from micronet.compression.packing import TENSOR_FILE, layer_size_rows, load_packed, read_packed_meta
    from micronet.data import DatasetInfo
    from micronet.io import resolve_directory
    from micronet.models import model_arch

    directory = resolve_directory(path)
    meta = read_packed_meta(directory)
    model = load_packed(directory)
    held = DatasetInfo.from_json(meta["data"]) if meta.get("data") else None
    packed = sum(1 for layer in meta.get("layers", []) if layer.get("stored") == "packed")
    arch = model_arch(model)
    header = f"{directory}: packed {arch.name} cfg {list(arch.cfg)} | {packed} packed layers, " \
             f"{meta['files'][TENSOR_FILE]['bytes']} bytes"
    return model, header, held, layer_size_rows(model, directory / TENSOR_FILE)
