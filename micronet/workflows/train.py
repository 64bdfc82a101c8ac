"""train: fit a float model (from scratch, from ``init`` weights, or a pruned checkpoint), or resume a run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from micronet.errors import ConfigError
from micronet.workflows.common import Log, cfg_list, check_data_fits, load_data, load_source, say
from micronet.workflows.options import DataOptions, DeviceOptions, DistillOptions, Overwrite, TrainingOptions, option
from micronet.workflows.runs import (
    RunResult,
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
from micronet.workflows.source import is_user_model


# bases in reverse: a dataclass lists the fields of its last base first
@dataclass(kw_only=True)
class TrainOptions(Overwrite, DistillOptions, DeviceOptions, TrainingOptions, DataOptions):
    model: str | None = option(None, "--model", help="registry model name (micronet info --list shows them; default "
                                                      "nin), or your own model as MODULE:CALLABLE: a module (or .py "
                                                      "file) and the function or class in it that builds the network")
    weights: str | None = option(None, "--weights", metavar="FILE",
                                 help="--model MODULE:CALLABLE: start from this state dict (.safetensors, or .pt/.pth "
                                      "of tensors only), as --init does for a checkpoint")
    cfg: list[str] | None = option(None, "--cfg", nargs="+",
                                   help="channel config (e.g. of a pruned model): 64,48,32 or 64 48 32")
    out: str | None = option(None, "--out", help="run directory (default runs/<model>)")
    init: str | None = option(None, "--init", "--refine", help="start from the weights of this checkpoint (fine-tuning)")
    sr: bool = option(False, "--sr", "-sr", action="store_true",
                      help="sparse training for network slimming: L1 penalty s*|gamma| on every BatchNorm scale")
    s: float = option(1e-4, "--s", type=float,
                      help="sparsity strength for --sr (1e-4; with SGD the push is lr*s per step)")
    sr_ramp: int = option(0, "--sr-ramp", type=int, help="--sr: grow s linearly over this many first epochs (0: constant)")
    sr_all_bn: bool = option(False, "--sr-all-bn", action="store_true",
                             help="--sr: penalise every BatchNorm, also those over channels pruning cannot remove "
                                  "(the logits BN; as the original did)")
    prune_refine: str | None = option(None, "--prune-refine", metavar="DIR",
                                      help="fine-tune a pruned checkpoint (written by micronet prune): its "
                                           "architecture, channels and weights")
    gc_prune_refine: list[str] | None = option(None, "--gc-prune-refine", nargs="+", metavar="C",
                                               help="train nin_gc with this (pruned) cfg from a fresh initialisation; "
                                                    "same as --model nin_gc --cfg C ...")


def train(options: TrainOptions, *, given: Iterable[str] | None = None, log: Log = say) -> RunResult | None:
    """Train (or resume) the run ``options`` describe; returns its best checkpoint and test accuracy (None on
    the non-main ranks of a distributed run)."""
    given = given_options(options, given)
    return with_devices(options, lambda ctx: _train(options, given, ctx, log))


def _train(options: TrainOptions, given: set[str], ctx, log: Log) -> RunResult | None:
    import torch

    from micronet.models import build_model, model_arch

    _check_user_model(options)
    last, config = resume_state(options, given)
    pruned = _pruned_source(options) if last is None else None
    init = None
    if last is not None:
        arch, data_name = last.arch, (last.data_info.name if last.data_info else options.data)
        model_name, cfg = arch.name, list(arch.cfg)
    elif pruned is not None:
        config, model_name, cfg, data_name = train_config(options), pruned.arch.name, list(pruned.arch.cfg), options.data
    else:
        config, data_name = train_config(options), options.data
        init = load_source(options.init) if options.init else None
        model_name = options.model or (init.arch.name if init else "nin")
        # fine-tuning without --model/--cfg continues the architecture of the --init checkpoint
        same_model = init is not None and model_name == init.arch.name
        cfg = cfg_list(options.cfg) if options.cfg else (list(init.arch.cfg) if same_model else None)
    run_dir = Path(options.out or options.resume or f"runs/{model_name.rpartition(':')[2]}")
    output = claim_run(options, run_dir)
    splits = load_data(options, data_name)
    torch.manual_seed(config.seed)
    if pruned is not None or (last is not None and last.pruning_record):
        # a pruned network's channels come from its record (the cfg alone may not express them)
        source = pruned or last
        check_data_fits(source, splits.info)
        model = source.build_model()
    else:
        model = build_model(model_name, num_classes=splits.info.num_classes, in_channels=splits.info.in_channels, cfg=cfg)
    if init is not None:
        init.load_into(model)
    if options.weights and last is None:
        from micronet.models import load_weights_file

        load_weights_file(model, options.weights)
    hooks = _sparsity_hooks(options, last)
    label = f"model {model_name} cfg {list(model_arch(model).cfg)}" + "".join(
        f" | sparse training s={hook.s:g}" for hook in hooks)
    distillation = distillation_hooks(options, last, splits.info)
    hooks += distillation
    label += distillation_label(distillation)
    if pruned is not None:
        label += f" | fine-tuning the pruned {pruned.path}"
    return train_and_report(options, ctx, model, config, splits, run_dir, label, hooks, output, log)


def _check_user_model(options: TrainOptions) -> None:
    """Write a ``--model MODULE:CALLABLE`` file path absolute (as checkpoints record it, so a resumed run compares
    equal), and refuse ``--weights`` without such a model or beside ``--init``."""
    from micronet.models.external import parse_model_spec

    if is_user_model(options.model):
        options.model = parse_model_spec(options.model).spec
    if options.weights and not is_user_model(options.model):
        raise ConfigError("--weights FILE starts your own model (--model MODULE:CALLABLE) from a state dict: pass "
                          "--model too, or --init DIR for a micronet checkpoint")
    if options.weights and (options.init or options.prune_refine):
        raise ConfigError("pass either --weights FILE or --init / --prune-refine DIR (where the weights come from), "
                          "not both")


def _sparsity_hooks(options: TrainOptions, last) -> list:
    """Network slimming's L1 on BatchNorm scales: of ``--sr``, or of the resumed run ``last`` started with it."""
    from micronet.compression.pruning import BatchNormL1

    if last is None:
        return [BatchNormL1(options.s, ramp_epochs=options.sr_ramp, prunable_only=not options.sr_all_bn)] if options.sr else []
    hooks = [BatchNormL1.from_state(state) for state in saved_hook_states(last, "batchnorm_l1")]
    if options.sr and not hooks:
        raise ConfigError(f"{options.resume} was not started with --sr: sparse training cannot be added on resume")
    return hooks


def _pruned_source(options: TrainOptions):
    """The pruned checkpoint to fine-tune (``--prune_refine``, or ``--init`` naming a pruned checkpoint), else
    None. A pruned network is rebuilt from its checkpoint (architecture + channel record), so ``--model`` /
    ``--cfg`` must agree with it or be left out. ``--gc_prune_refine`` only selects nin_gc with that cfg."""
    if options.gc_prune_refine:
        if options.model not in (None, "nin_gc") or options.cfg or options.init or options.prune_refine:
            raise ConfigError("--gc_prune_refine C0 ... C7 trains nin_gc with that cfg from a fresh initialisation: "
                              "drop --model, --cfg, --init and --prune_refine")
        options.model, options.cfg = "nin_gc", options.gc_prune_refine
        return None
    if options.init and options.prune_refine:
        raise ConfigError("pass either --init or --prune_refine, not both (--prune_refine is --init for pruned checkpoints)")
    path = options.prune_refine or options.init
    if path is None:
        return None
    checkpoint = load_source(path)
    if checkpoint.pruning_record is None:
        if options.prune_refine:
            raise ConfigError(f"{checkpoint.path} is not a pruned checkpoint (no pruning record): fine-tune it with "
                              "--init, or prune it first with `micronet prune`")
        return None  # plain fine-tuning: the weights go into --model / --cfg
    if checkpoint.quant_scheme is not None:
        raise ConfigError(f"{checkpoint.path} is pruned and quantized: fine-tune it with "
                          "`micronet quantize iao --qaft --checkpoint ...` instead")
    arch = checkpoint.arch
    if (options.model is not None and options.model.strip().lower() != arch.name) or \
            (options.cfg and cfg_list(options.cfg) != list(arch.cfg)):
        raise ConfigError(f"{checkpoint.path} holds a pruned {arch.name} with cfg {list(arch.cfg)}: drop --model and "
                          "--cfg, fine-tuning rebuilds the pruned architecture from the checkpoint")
    return checkpoint
