"""prune: remove the least important channels of a trained float checkpoint and write OUT/best (for
``train --prune-refine OUT``), with parameters, GFLOPs and test accuracy before and after."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micronet.errors import ConfigError, DatasetError
from micronet.workflows.common import Log, check_data_fits, claim, device_context, load_data, parse_shape, say
from micronet.workflows.options import DataFromCheckpoint, DeviceOptions, Overwrite, option
from micronet.workflows.source import UserModelOptions, open_source


# bases in reverse: a dataclass lists the fields of its last base first
@dataclass(kw_only=True)
class PruneOptions(DeviceOptions, DataFromCheckpoint, UserModelOptions, Overwrite):
    checkpoint: str | None = option(None, "--checkpoint",
                                    help="float checkpoint or run directory (prune before quantizing)")
    out: str = option("", "--out", required=True,
                      help="run directory for the pruned model (its checkpoint goes to OUT/best)")
    percent: float = option(0.5, "--percent", type=float, help="share of the prunable channels to remove, in [0, 1)")
    normal_regular: int | None = option(None, "--normal-regular", type=int, metavar="N",
                                        help="round each layer's kept channels to a multiple of N (hardware-friendly "
                                             "widths; 1 = plain)")
    importance: str = option("bn_gamma", "--importance", choices=["bn_gamma", "l1"],
                             help="channel importance: |gamma| of the BatchNorm after the conv, or the L1 norm of the "
                                  "conv's filters")
    ignore: list[str] = option([], "--ignore", nargs="+", metavar="NAME", help="module names whose output channels stay")
    min_channels: int = option(1, "--min-channels", type=int, help="keep at least this many channels in every layer")
    input_shape: str | None = option(None, "--input-shape",
                                     help="C,H,W of the example input (default: the checkpoint's dataset)")
    batch_size: int = option(512, "--batch-size", type=int, help="evaluation batch size")
    evaluate: bool = option(True, "--no-eval", action="store_false", help="skip the accuracy before and after pruning")


@dataclass
class PruneResult:
    """The pruned checkpoint (OUT/best), its channel config and the measurements recorded in its metrics."""

    best: Path
    cfg: list[int]
    metrics: dict[str, Any]


def prune(options: PruneOptions, *, log: Log = say) -> PruneResult:
    """Prune ``options.checkpoint`` as ``options`` say and write the run folder ``options.out``."""
    import torch

    from micronet.compression.pruning import prune as prune_model
    from micronet.engine import save_checkpoint
    from micronet.engine.trainer import PRUNE_REPORT_FILE, RUN_OUTPUT
    from micronet.io import atomic_write_text
    from micronet.models import model_arch

    _check(options)
    output = claim(Path(options.out), RUN_OUTPUT, options.overwrite)
    checkpoint = open_source(options)
    if checkpoint.quant_scheme is not None:
        raise ConfigError(f"{checkpoint.path} is quantized ({checkpoint.quant_scheme.name}): prune first, then quantize "
                          "- prune the float checkpoint it was quantized from")
    if checkpoint.fusion_record is not None:
        raise ConfigError(f"{checkpoint.path} has its BatchNorms folded: prune first, then fuse - prune the checkpoint "
                          "that `micronet fuse` started from")
    ctx = device_context(options)
    model = checkpoint.build_model().eval()
    shape = _example_shape(options, checkpoint, log)
    with warnings.catch_warnings(record=True) as caught:  # layers left whole are listed in the table below
        warnings.simplefilter("always")
        pruned = prune_model(model, torch.randn(1, *shape), percent=options.percent,
                             normal_regular=options.normal_regular, ignored_layers=options.ignore or None,
                             importance=options.importance, min_channels=options.min_channels).eval()
    report = pruned.pruning_report
    log(f"{checkpoint.path}: {checkpoint.arch.name} cfg {list(checkpoint.arch.cfg)} -> cfg {list(model_arch(pruned).cfg)} "
        f"({options.percent:g} of the channels by {options.importance}"
        + (f", multiples of {options.normal_regular}" if options.normal_regular else "") + ")")
    log(report.table())
    for warning in caught:
        if not str(warning.message).startswith("channel pruning left"):
            log(f"warning: {warning.message}")
    before, after = report.flops_before, report.flops_after
    if before and after is not None:
        log(f"GFLOPs: {before / 1e9:.4f} -> {after / 1e9:.4f} at {'x'.join(map(str, shape))} "
            f"({after / before:.1%} kept)")
    metrics: dict[str, Any] = {"pruned_from": str(checkpoint.path), "percent": options.percent,
                               "normal_regular": options.normal_regular, "importance": options.importance,
                               "params_before": report.params_before, "params_after": report.params_after,
                               "flops_before": before, "flops_after": after}
    splits = _accuracy_before_and_after(options, checkpoint, model, pruned, ctx.device, metrics, log)
    output.prepare()
    held = checkpoint.data_info
    out = save_checkpoint(Path(options.out) / "best", pruned.cpu(), data_info=held or (splits.info if splits else None),
                          metrics=metrics, extra=checkpoint.meta.get("extra"))
    atomic_write_text(Path(options.out) / PRUNE_REPORT_FILE, json.dumps(report.to_json(), indent=2) + "\n")
    log(f"pruned checkpoint: {out} (fine-tune: micronet train --prune_refine {options.out})")
    return PruneResult(best=Path(out), cfg=list(model_arch(pruned).cfg), metrics=metrics)


def _check(options: PruneOptions) -> None:
    if not 0 <= options.percent < 1:
        raise ConfigError(f"--percent is the share of channels to remove, in [0, 1) (got {options.percent:g}): "
                          "e.g. --percent 0.5")
    if options.normal_regular is not None and options.normal_regular < 1:
        raise ConfigError(f"--normal_regular N rounds each layer to a multiple of N and must be at least 1 "
                          f"(got {options.normal_regular})")
    if options.min_channels < 1:
        raise ConfigError(f"--min_channels must be at least 1 (got {options.min_channels}): a layer cannot lose "
                          "every channel")


def _example_shape(options: PruneOptions, checkpoint: Any, log: Log) -> tuple[int, ...]:
    """C,H,W of the example input pruning traces: ``--input-shape``, else the recorded dataset's."""
    arch, held = checkpoint.arch, checkpoint.data_info
    if options.input_shape:
        shape = parse_shape(options.input_shape)
    elif held is not None:
        shape = (held.in_channels, *held.image_size)
    else:
        shape = (arch.in_channels, 28, 28)
        log(f"{checkpoint.path} does not record its dataset: GFLOPs at {'x'.join(map(str, shape))} (pass --input-shape)")
    if shape[0] != arch.in_channels:
        raise ConfigError(f"--input-shape has {shape[0]} channels but {arch.name} takes {arch.in_channels}")
    return shape


def _accuracy_before_and_after(options: PruneOptions, checkpoint: Any, model: Any, pruned: Any, device: Any,
                               metrics: dict[str, Any], log: Log):
    """Test accuracy before and after pruning (into ``metrics``); returns the splits, or None when not measured."""
    from micronet.data import BatchLoader
    from micronet.engine import evaluate

    held = checkpoint.data_info
    name = options.data or (held.name if held else None)
    splits = None
    if options.evaluate and name is None:
        log("no dataset recorded in the checkpoint: pass --data to compare accuracy before and after")
    elif options.evaluate:
        try:
            splits = load_data(options, name)
        except DatasetError as exc:
            if options.data:
                raise
            log(f"test accuracy not measured ({exc})")
    if splits is None:
        return None
    check_data_fits(checkpoint, splits.info)
    loader = BatchLoader(splits.test, options.batch_size)
    was = evaluate(model.to(device), loader, device)
    now = evaluate(pruned.to(device), loader, device)
    log(f"{splits.info.name} test ({now['samples']} images): accuracy {was['acc'] * 100:.2f}% before, "
        f"{now['acc'] * 100:.2f}% after pruning, before fine-tuning (loss {was['loss']:.4f} / {now['loss']:.4f})")
    metrics.update(unpruned_test_acc=was["acc"], test_acc=now["acc"], test_loss=now["loss"], test_images=now["samples"])
    return splits
