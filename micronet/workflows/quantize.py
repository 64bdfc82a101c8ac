"""quantize: a float checkpoint by calibration (PTQ, with optional recipes) or training (QAT); a quantized one
by fine-tuning with frozen scales (QAFT); or resume an interrupted QAT/QAFT run."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micronet.errors import ConfigError
from micronet.workflows.common import Log, load_data, record_test_accuracy, say, summary_table
from micronet.workflows.options import (
    DataFromCheckpoint,
    DeviceOptions,
    DistillOptions,
    Overwrite,
    TrainingOptions,
    option,
)
from micronet.workflows.runs import (
    claim_run,
    distillation_hooks,
    distillation_label,
    given_options,
    resume_state,
    saved_hook_states,
    train_and_report,
    train_config,
    with_devices,
)
from micronet.workflows.scheme import SchemeOptions, build_scheme, iao_options, lowbit_scheme
from micronet.workflows.source import UserModelOptions, open_source


# bases in reverse: a dataclass lists the fields of its last base first
@dataclass(kw_only=True)
class QuantizeOptions(DistillOptions, DeviceOptions, TrainingOptions, DataFromCheckpoint, UserModelOptions, SchemeOptions,
                      Overwrite):
    default_epochs = 2

    checkpoint: str | None = option(None, "--checkpoint", help="trained checkpoint or run directory to start from")
    out: str | None = option(None, "--out", help="run directory for the quantized model (default <checkpoint>_<method>)")
    freeze_bn_after: int | None = option(None, "--freeze-bn-after", type=int,
                                         help="with --bn_fuse: train with running BN statistics from this epoch on (0-based)")
    pretrained_model: bool = option(False, "--pretrained-model", action="store_true",
                                    help="accepted for compatibility: BN statistics always start from the checkpoint")
    ptq: bool = option(False, "--ptq", action="store_true", help="post-training quantization: calibrate, no training")
    ptq_batch: int = option(200, "--ptq-batch", "--calibration-batches", type=int, help="calibration batches for --ptq")
    qaft: bool = option(False, "--qaft", action="store_true",
                        help="fine-tune a quantized checkpoint with frozen scales and zero points")
    clamp_weights: bool = option(False, "--clamp-weights", action="store_true",
                                 help="wbwtab binary weights: clamp the latent float weights to [-1, 1] after every "
                                      "optimizer step (the original's W_clip; beyond ±1 they get no gradient)")
    float_weight_epochs: int | None = option(None, "--float-weight-epochs", type=int,
                                             help="wbwtab --W 2/3: train the first N epochs with float weights (binary "
                                                  "activations only), then binarize the weights too (two-stage "
                                                  "training)")
    range_search: bool = option(False, "--range-search", action="store_true",
                                help="with --ptq: calibrate with each range setting --activation-observer and "
                                     "--weight-range leave open (percentile or histogram activations, min/max or "
                                     "MSE weights) and keep the one nearest the float model on the calibration data")
    equalize: bool = option(False, "--equalize", action="store_true",
                            help="with --ptq: fold BatchNorm, rescale layer pairs per channel (per-tensor weights: even "
                                 "weight ranges; per-channel: least rounding noise on the calibration data) and "
                                 "absorb high biases first")
    bias_correction: bool = option(False, "--bias-correction", action="store_true",
                                   help="with --ptq: remove the mean output shift quantization leaves in each layer "
                                        "(measured on the calibration data)")
    adaround: bool = option(False, "--adaround", action="store_true",
                            help="with --ptq: learn whether each weight rounds up or down (AdaRound), layer by layer")
    adaround_iters: int | None = option(None, "--adaround-iters", type=int,
                                        help="AdaRound iterations per layer or block (default 1000)")
    adaround_blocks: bool = option(False, "--adaround-blocks", action="store_true",
                                   help="with --adaround: learn the roundings of each residual block's layers together "
                                        "against the block's float output (BRECQ-style); other layers one by one")
    skip: list[str] = option([], "--skip", nargs="+", metavar="NAME|FILE",
                             help="modules to keep in float: names, and/or files listing them (a sensitivity.json or "
                                  "skip.txt of `micronet sensitivity`; an existing file, a path with / or .txt/.json, "
                                  "or @FILE)")
    epochs: int | None = option(None, "--epochs", type=int, help="number of epochs (default 2)")
    lr: float = option(0.002, "--lr", type=float, help="base learning rate")


@dataclass
class QuantizeResult:
    """Where the quantized model went and its test accuracy (``float_acc``: the source's, when recorded)."""

    run_dir: Path
    best: Path
    test_acc: float
    float_acc: float | None
    scheme: str


def quantize(options: QuantizeOptions, *, given: Iterable[str] | None = None, log: Log = say) -> QuantizeResult | None:
    """Quantize as ``options`` say; None on the non-main ranks of a distributed QAT run."""
    given = given_options(options, given)
    return with_devices(options, lambda ctx: _quantize(options, given, ctx, log))


def _quantize(options: QuantizeOptions, given: set[str], ctx, log: Log) -> QuantizeResult | None:
    from micronet.compression.quantization.core import freeze, is_prepared

    ptq_recipes(options)  # impossible recipe combinations fail before anything is loaded
    last, config = resume_state(options, given)
    if options.ptq and options.distill:
        raise ConfigError("--distill adds a loss term to training, and --ptq does not train: drop one of them")
    lowbit = lowbit_scheme(options) if last is None and not options.qaft else None  # bad flags fail before loading
    skip = skip_list(options.skip)
    if last is not None:  # an interrupted QAT/QAFT run: rebuild the quantized model it was training
        model, source = last.build_model(), last
    else:
        if not options.checkpoint and not options.model:
            raise ConfigError("pass --checkpoint (the trained model to quantize) or --resume (an interrupted run), or "
                              "your own model with --model MODULE:CALLABLE --weights FILE")
        source = open_source(options)
        model = source.build_model()
        config = train_config(options)
    held = source.data_info
    data_name = options.data or (held.name if held else None)
    if data_name is None:
        raise ConfigError(f"{source.path} does not record its dataset: pass --data")
    started_from = options.checkpoint or str(Path(options.weights or "").with_suffix(""))
    run_dir = Path(options.out or options.resume or f"{Path(started_from).as_posix().rstrip('/')}_{options.method}")
    output = claim_run(options, run_dir)
    splits = load_data(options, data_name)
    float_acc = source.metrics.get("test_acc")

    if last is None and options.qaft:
        if not is_prepared(model):
            raise ConfigError(f"--qaft fine-tunes a quantized model, but {source.path} is a float checkpoint: "
                              "quantize it first (micronet quantize iao --ptq or QAT)")
        freeze(model)
        label = f"QAFT of {source.path} ({model.quant_scheme.name})"
    elif last is None:
        if is_prepared(model):
            raise ConfigError(f"{source.path} is already quantized ({model.quant_scheme.name}): "
                              "use --qaft to fine-tune it, or start from the float checkpoint")
        if options.ptq:
            return _ptq_and_save(options, model, splits, ctx, run_dir, output, float_acc, log)
        from micronet.compression.quantization.core import prepare

        scheme = build_scheme(options, lowbit, ptq=False)
        model = prepare(model, scheme, skip=skip)
        if ctx.is_main:
            log(model.quantization_report.summary())
        label = f"QAT {scheme.name}"
    else:
        label = f"resumed {model.quant_scheme.name if is_prepared(model) else 'float'} run"
    hooks = _training_hooks(options, last)
    if last is None and options.float_weight_epochs is not None:
        label += f" | float weights for {options.float_weight_epochs} epoch(s), then binarized"
    if hooks:
        from micronet.compression.quantization.core.schedule import ClampBinaryWeights

        if any(isinstance(hook, ClampBinaryWeights) for hook in hooks):
            label += " | binary latent weights clamped to [-1, 1] after each step"
    distillation = distillation_hooks(options, last, splits.info)
    hooks += distillation
    label += distillation_label(distillation)
    run = train_and_report(options, ctx, model, config, splits, run_dir, label, hooks, output, log)
    if run is None:
        return None
    scheme_name = model.quant_scheme.name if is_prepared(model) else "float"
    return QuantizeResult(run_dir=run.run_dir, best=run.best, test_acc=run.test_acc, float_acc=float_acc,
                          scheme=scheme_name)


def ptq_model(options: QuantizeOptions, model, splits, device, *, log: Log = say):
    """Post-training quantization in memory: ``model`` prepared with the scheme ``options`` describe and
    calibrated on ``options.ptq_batch`` shuffled training batches (through the recipes when any are asked for)."""
    from micronet.compression.quantization.core import calibrate, prepare
    from micronet.data import BatchLoader

    recipes = ptq_recipes(options)
    scheme = build_scheme(options, lowbit_scheme(options), ptq=True)
    calibration = BatchLoader(splits.train, options.batch_size, shuffle=True, seed=options.seed)
    if not recipes:
        model = prepare(model, scheme, skip=skip_list(options.skip))
        log(model.quantization_report.summary())
        calibrate(model.to(device), calibration, num_batches=options.ptq_batch)
        return model
    from micronet.compression.quantization.ptq import describe, post_training_quantize

    model = post_training_quantize(model.to(device), calibration, w_bits=options.w_bits, a_bits=options.a_bits,
                                   num_batches=options.ptq_batch, range_search=options.range_search,
                                   equalize=options.equalize,
                                   bias_correction=options.bias_correction, adaround=options.adaround,
                                   adaround_iterations=options.adaround_iters,
                                   adaround_blocks=options.adaround_blocks, skip=skip_list(options.skip),
                                   progress=options.progress, **iao_options(options))
    log(model.quantization_report.summary() + "\n" + describe(model))
    return model


def _ptq_and_save(options: QuantizeOptions, model, splits, ctx, run_dir: Path, output, float_acc: float | None,
                  log: Log) -> QuantizeResult:
    """PTQ: quantize, save OUT/best, test it and log the result line and the summary table."""
    from micronet.engine import load_checkpoint, save_checkpoint
    from micronet.models import model_arch

    model = ptq_model(options, model, splits, ctx.device, log=log if ctx.is_main else _silent)
    scheme = build_scheme(options, lowbit_scheme(options), ptq=True)
    recipe = getattr(model, "ptq_recipe", None)
    output.prepare()
    save_checkpoint(run_dir / "best", model, data_info=splits.info, metrics={"calibration_batches": model.calibrated_batches},
                    extra={"ptq": recipe} if recipe else None)
    best = load_checkpoint(run_dir / "best")
    extra = {"float_test_acc": float_acc} if float_acc is not None else {}
    acc = record_test_accuracy(model, best, splits, ctx.device, options.eval_batch_size, **extra)
    recipes = ptq_recipes(options)
    recipes += ["--adaround-blocks"] if options.adaround_blocks else []
    with_recipes = " with " + ", ".join(flag.lstrip("-") for flag in recipes) if recipes else ""
    line = f"PTQ {scheme.name}{with_recipes}: {model.calibrated_batches} calibration batches of {options.batch_size}, " \
           f"test accuracy {acc * 100:.2f}%"
    if float_acc is not None:
        line += f" (float {float_acc * 100:.2f}%, loss {(float_acc - acc) * 100:.2f} pt)"
    log(line)
    log(summary_table(model.cpu(), (splits.info.in_channels, *splits.info.image_size),
                      {"model": model_arch(model).name, "test acc (%)": f"{acc * 100:.2f}"}))
    return QuantizeResult(run_dir=run_dir, best=best.path, test_acc=acc, float_acc=float_acc, scheme=scheme.name)


def _silent(line: str) -> None:
    pass


def _training_hooks(options: QuantizeOptions, last) -> list[Any]:
    """BN-statistics freezing, binary-weight clamping and float-weights-first training: as given, or as the
    resumed run ``last`` had them."""
    from micronet.compression.quantization.core.schedule import (
        ClampBinaryWeights,
        FloatWeightsFirst,
        FreezeBNStatistics,
    )

    saved = [FreezeBNStatistics.from_state(state) for state in saved_hook_states(last, "freeze_bn_statistics")]
    freeze_after = options.freeze_bn_after
    if saved and freeze_after is not None and freeze_after != saved[0].after_epochs:
        raise ConfigError(f"{options.resume} was started with --freeze-bn-after {saved[0].after_epochs}: "
                          "a resumed run keeps it (drop the flag)")
    hooks: list[Any] = saved or ([FreezeBNStatistics(freeze_after)] if freeze_after is not None else [])
    if last is not None:  # a resumed run keeps clamping if it was started so
        hooks += [ClampBinaryWeights() for _ in saved_hook_states(last, "clamp_binary_weights")]
    elif options.clamp_weights:
        hooks.append(ClampBinaryWeights())
    if last is not None:  # a resumed run keeps its two stages
        hooks += [FloatWeightsFirst.from_state(state) for state in saved_hook_states(last, "float_weights_first")]
    elif options.float_weight_epochs is not None:
        hooks.append(FloatWeightsFirst(options.float_weight_epochs))
    return hooks


def ptq_recipes(options: QuantizeOptions) -> list[str]:
    """The post-training recipe flags given, after refusing the combinations that cannot work."""
    recipes = [flag for flag, on in (("--range-search", options.range_search), ("--equalize", options.equalize),
                                     ("--bias-correction", options.bias_correction), ("--adaround", options.adaround))
               if on]
    if options.adaround_iters is not None and not options.adaround:
        raise ConfigError("--adaround-iters sets AdaRound's iterations: add --adaround or drop it")
    if options.adaround_blocks and not options.adaround:
        raise ConfigError("--adaround-blocks reconstructs blocks with AdaRound: add --adaround or drop it")
    if not recipes:
        return recipes
    named = f"post-training recipes ({', '.join(recipes)})"
    if options.method != "iao":
        raise ConfigError(f"{named} work on IAO's integer weights, not {options.method}: use `micronet quantize iao --ptq`")
    if options.qaft or options.resume:
        raise ConfigError(f"{named} start from a float checkpoint: drop {'--qaft' if options.qaft else '--resume'} "
                          "and pass the float checkpoint with --ptq")
    if not options.ptq:
        raise ConfigError(f"{named} calibrate instead of training: add --ptq")
    if options.lsq and options.adaround:
        raise ConfigError("--adaround learns the rounding of fixed-scale weights and --lsq learns scales by training: drop one")
    if options.adaround_iters is not None and options.adaround_iters < 1:
        raise ConfigError(f"--adaround-iters must be at least 1 (got {options.adaround_iters})")
    return recipes


def skip_list(values: list[str]) -> list[str]:
    """``--skip`` values: module names, and files read with read_skip_list (an existing file, a path with / or
    ending in .txt/.json, or @FILE)."""
    from micronet.analysis.sensitivity import read_skip_list

    names: list[str] = []
    for value in values:
        if value.startswith("@") or os.path.isfile(value) or "/" in value or value.endswith((".txt", ".json")):
            names += read_skip_list(value[1:] if value.startswith("@") else value)
        else:
            names.append(value)
    return list(dict.fromkeys(names))
