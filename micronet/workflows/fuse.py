"""fuse: fold every BatchNorm of a trained checkpoint into the conv before it, with the test accuracy before
and after."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micronet.workflows.common import Log, claim, dataset_name, device_context, load_data, say
from micronet.workflows.options import DataFromCheckpoint, DeviceOptions, Overwrite, option
from micronet.workflows.source import UserModelOptions, open_source


# bases in reverse: a dataclass lists the fields of its last base first
@dataclass(kw_only=True)
class FuseOptions(DeviceOptions, DataFromCheckpoint, UserModelOptions, Overwrite):
    checkpoint: str | None = option(None, "--checkpoint", help="checkpoint or run directory")
    out: str = option("", "--out", required=True, help="directory for the fused checkpoint")
    batch_size: int = option(512, "--batch-size", type=int, help="evaluation batch size")
    evaluate: bool = option(True, "--no-eval", action="store_false", help="skip the accuracy comparison")


@dataclass
class FuseResult:
    checkpoint: Path
    folded: int
    metrics: dict[str, Any]


def fuse(options: FuseOptions, *, log: Log = say) -> FuseResult:
    """Fold the BatchNorms of ``options.checkpoint`` and write the fused checkpoint to ``options.out``."""
    from micronet.analysis import format_table
    from micronet.compression.fusion import fuse as fuse_model
    from micronet.data import BatchLoader
    from micronet.engine import evaluate, save_checkpoint
    from micronet.engine.checkpoint import CHECKPOINT_OUTPUT

    claim(options.out, CHECKPOINT_OUTPUT, options.overwrite)
    ctx = device_context(options)
    checkpoint = open_source(options)
    model = checkpoint.build_model().eval()
    fused, report = fuse_model(model)
    log(f"{checkpoint.path}: {report.summary()}")
    if report.layers:
        log(format_table(report.rows()))
    metrics = dict(checkpoint.metrics)
    name = dataset_name(options, checkpoint)
    if options.evaluate and name is None:
        log("no dataset recorded in the checkpoint: pass --data to compare accuracy before and after")
    elif options.evaluate:
        splits = load_data(options, name)
        loader = BatchLoader(splits.test, options.batch_size)
        before = evaluate(model.to(ctx.device), loader, ctx.device)
        after = evaluate(fused.to(ctx.device), loader, ctx.device)
        log(f"{splits.info.name} test ({before['samples']} images): accuracy {before['acc'] * 100:.2f}% before, "
            f"{after['acc'] * 100:.2f}% after fusion (loss {before['loss']:.4f} / {after['loss']:.4f})")
        metrics.update(unfused_test_acc=before["acc"], fused_test_acc=after["acc"], fused_test_images=after["samples"])
    out = save_checkpoint(options.out, fused.cpu(), data_info=checkpoint.data_info, metrics=metrics,
                          extra=checkpoint.meta.get("extra"))
    log(f"fused checkpoint: {out}")
    return FuseResult(checkpoint=Path(out), folded=len(report.layers), metrics=metrics)
