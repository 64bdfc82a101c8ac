"""sensitivity: rank a float model's layers by the accuracy their quantization costs, and write a skip list."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from micronet.errors import ConfigError
from micronet.workflows.common import Log, check_data_fits, claim, dataset_name, device_context, load_data, say
from micronet.workflows.options import DataFromCheckpoint, DeviceOptions, Overwrite, option
from micronet.workflows.scheme import SchemeOptions, build_scheme, lowbit_scheme
from micronet.workflows.source import UserModelOptions, open_source


# bases in reverse: a dataclass lists the fields of its last base first
@dataclass(kw_only=True)
class SensitivityOptions(DeviceOptions, DataFromCheckpoint, UserModelOptions, Overwrite, SchemeOptions):
    checkpoint: str | None = option(None, "--checkpoint", help="float checkpoint or run directory")
    out: str = option("", "--out", required=True, help="directory for sensitivity.json and skip.txt")
    images: int = option(2000, "--images", type=int, help="validation images to evaluate on (class-balanced subset)")
    calibration_batches: int = option(20, "--calibration-batches", type=int,
                                      help="calibration batches of --batch-size training images")
    top: int | None = option(None, "--top", type=int, metavar="K", help="keep the K most sensitive layers in float")
    max_drop: float | None = option(None, "--max-drop", type=float, metavar="PT",
                                    help="or keep in float every layer whose accuracy drop alone exceeds PT percentage "
                                         "points (0.2 without --top)")
    batch_size: int = option(128, "--batch-size", type=int, help="calibration batch size")
    eval_batch_size: int = option(512, "--eval-batch-size", type=int, help="evaluation batch size")


@dataclass
class SensitivityResult:
    report_file: Path
    skip_file: Path
    skip: list[str]
    float_acc: float
    all_quantized_acc: float


def sensitivity(options: SensitivityOptions, *, log: Log = say) -> SensitivityResult:
    """Calibrate the scheme once, measure each layer quantized alone and all but it, write OUT/sensitivity.json
    and OUT/skip.txt."""
    from micronet.analysis import format_table
    from micronet.analysis.sensitivity import SENSITIVITY_OUTPUT, choose_skip, layer_sensitivity
    from micronet.compression.quantization.core import is_prepared
    from micronet.data import BatchLoader
    from micronet.data.dataset import balanced_subset
    from micronet.io import atomic_write_text

    if options.top is not None and options.max_drop is not None:
        raise ConfigError("pass either --top K or --max-drop PT (the rule that picks the layers to keep in float), not both")
    if options.images < 1 or (options.top or 0) < 0:
        raise ConfigError(f"--images must be at least 1 and --top at least 0 (got {options.images} and {options.top})")
    scheme = build_scheme(options, lowbit_scheme(options), ptq=True)
    rule = dict(top=options.top) if options.top is not None else \
        dict(max_drop=0.2 if options.max_drop is None else options.max_drop)
    claim(options.out, SENSITIVITY_OUTPUT, options.overwrite)
    checkpoint = open_source(options)
    model = checkpoint.build_model()
    if is_prepared(model):
        raise ConfigError(f"{checkpoint.path} is already quantized ({model.quant_scheme.name}): measure the float "
                          "checkpoint it was quantized from")
    name = dataset_name(options, checkpoint)
    if name is None:
        raise ConfigError(f"{checkpoint.path} does not record its dataset: pass --data")
    splits = load_data(options, name)
    check_data_fits(checkpoint, splits.info)
    if len(splits.val) == 0:
        raise ConfigError("the validation split is empty: raise --val-fraction (the skip list is a model-selection "
                          "decision, made on validation images, never on test images)")
    ctx = device_context(options)
    val = balanced_subset(splits.val, options.images, options.data_seed, "sensitivity")
    log(f"{checkpoint.path}: {scheme.name}, {options.calibration_batches} calibration batches of {options.batch_size} "
        f"training images, {len(val)} {splits.info.name} validation images | device {ctx.device}")
    report = layer_sensitivity(model, scheme, BatchLoader(splits.train, options.batch_size, shuffle=True, seed=0),
                               BatchLoader(val, options.eval_batch_size), calibration_batches=options.calibration_batches,
                               device=ctx.device, log=lambda line: print(line, file=sys.stderr, flush=True))
    report.checkpoint = str(checkpoint.path)
    report.skip = choose_skip(report, **rule)
    out = Path(options.out)
    atomic_write_text(out / "sensitivity.json", json.dumps(report.to_json(), indent=2) + "\n")
    how = f"the {options.top} most sensitive" if options.top is not None else f"drop alone > {rule['max_drop']:g} pt"
    atomic_write_text(out / "skip.txt", f"# layers to keep in float ({how}): micronet sensitivity {scheme.name} on "
                                        f"{checkpoint.path}\n" + "".join(f"{layer}\n" for layer in report.skip))
    log(format_table(report.rows(), floatfmt=".2f"))
    log(f"validation accuracy: float {report.float_acc:.2f}%, all {len(report.layers)} layers quantized "
        f"{report.all_quantized_acc:.2f}% | keep in float ({how}): {', '.join(report.skip) or 'none'}")
    log(f"wrote {out / 'sensitivity.json'} and {out / 'skip.txt'} (use: micronet quantize {options.method} ... "
        f"--skip {out / 'skip.txt'})")
    return SensitivityResult(report_file=out / "sensitivity.json", skip_file=out / "skip.txt", skip=list(report.skip),
                             float_acc=report.float_acc, all_quantized_acc=report.all_quantized_acc)
