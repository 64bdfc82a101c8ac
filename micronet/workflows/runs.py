"""A training run as train and quantize (QAT, QAFT) share it: claim the folder, resume, fit, test the best.

A run records every option it was started with; ``--resume`` restores them and refuses one given again with
another value (micronet.engine.resume). Which options were *given* matters for that check: the command line
knows it from its argv, the pipeline from a step's keys; a Python caller that does not say counts the options
that differ from their defaults.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from micronet.errors import ConfigError
from micronet.workflows.common import Log, claim, record_test_accuracy, say, summary_table
from micronet.workflows.options import option_fields, option_flags


def given_options(options: Any, given: Iterable[str] | None) -> set[str]:
    """The options the caller set: ``given``, or (None) those whose value differs from the default."""
    if given is not None:
        return set(given)
    defaults = type(options)()
    return {f.name for f in option_fields(type(options)) if getattr(options, f.name) != getattr(defaults, f.name)}


def train_config(options: Any):
    """The engine's TrainConfig that ``options`` (a TrainingOptions) describe."""
    from micronet.engine import TrainConfig

    return TrainConfig(
        epochs=options.total_epochs, batch_size=options.batch_size, eval_batch_size=options.eval_batch_size,
        optimizer=options.optimizer, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay,
        schedule=options.schedule, milestones=list(options.milestones), step_size=options.step_size,
        gamma=options.gamma, warmup_epochs=options.warmup_epochs, label_smoothing=options.label_smoothing,
        amp=options.amp, compile=options.compile, channels_last=options.channels_last, seed=options.seed,
        deterministic=options.deterministic, progress=options.progress,
    )


def recorded_options(options: Any, **resolved: Any) -> dict[str, Any]:
    """The options to record with a new run: every option, with ``resolved`` values (the model and dataset a
    default stood for) in place of what was given."""
    from micronet.engine.resume import recordable_options

    names = option_flags(type(options))
    values = {name: getattr(options, name) for name in names}
    values.update({name: value for name, value in resolved.items() if name in names})
    return recordable_options(values)


def resume_state(options: Any, given: set[str]):
    """(checkpoint of OUT/last, saved TrainConfig) when ``options.resume`` is set, else (None, None). The options
    the run was started with are restored into ``options``; one given again with another value is refused."""
    from micronet.engine import TrainConfig, load_checkpoint
    from micronet.engine.resume import resume_options
    from micronet.errors import CheckpointError

    if not options.resume:
        return None, None
    run = Path(options.resume)
    last = load_checkpoint(run / "last" if (run / "last").exists() else run)
    saved = (last.training or {}).get("config")
    if not saved:
        raise CheckpointError(f"{last.path} holds no training state: resume from the run directory `micronet train --out` wrote")
    flags = option_flags(type(options))
    restored, unchecked = resume_options(str(run), last.training, last.arch.name,
                                         {name: getattr(options, name) for name in given if name in flags}, flags)
    for name, value in restored.items():
        if name in flags:
            setattr(options, name, value)
    if unchecked:
        print(f"note: {run} was started before runs recorded their options: {', '.join(unchecked)} could not be "
              "checked against it and are used as given", file=sys.stderr)
    config = TrainConfig.from_json(saved)  # continue exactly as started; only --epochs may grow
    if options.epochs is not None:
        config.epochs = options.epochs
    config.progress = options.progress
    return last, config


def claim_run(options: Any, run_dir: Path):
    """Claim the run folder a command writes; None for a resumed run, which continues in its own folder."""
    from micronet.engine.trainer import RUN_OUTPUT
    from micronet.outputs import same_path

    if getattr(options, "resume", None) and same_path(run_dir, options.resume):
        return None
    return claim(run_dir, RUN_OUTPUT, options.overwrite)


def saved_hook_states(last: Any, kind: str) -> list[dict]:
    """The saved states of the hooks of ``kind`` that the resumed run ``last`` was trained with."""
    if last is None:
        return []
    return [state for state in (last.training or {}).get("hooks", []) if isinstance(state, dict) and state.get("kind") == kind]


def distillation_hooks(options: Any, last: Any, info: Any) -> list:
    """The distillation hook of ``--distill``, or of the resumed run ``last`` that was started with it."""
    from micronet.compression.fusion import fold_for_inference
    from micronet.engine.distillation import Distillation, load_teacher

    if last is not None:
        saved = saved_hook_states(last, "distillation")
        if options.distill and not saved:
            raise ConfigError(f"{options.resume} was not started with --distill: distillation cannot be added on resume")
        return [Distillation.from_state(state, info.num_classes, info.name, prepare_teacher=fold_for_inference)
                for state in saved]
    if not options.distill:
        return []
    teacher = fold_for_inference(load_teacher(options.distill, info.num_classes, info.name))
    return [Distillation(teacher, weight=options.distill_weight, temperature=options.distill_temperature,
                         source=options.distill)]


def distillation_label(hooks: list) -> str:
    return "".join(f" | distilling from {hook.source} (T={hook.temperature:g}, weight {hook.weight:g})" for hook in hooks)


@dataclasses.dataclass
class RunResult:
    """A finished training run: its folder, its best checkpoint and that checkpoint's test accuracy."""

    run_dir: Path
    best: Path
    best_epoch: int | None
    test_acc: float
    test_images: int


def train_and_report(options: Any, ctx: Any, model: Any, config: Any, splits: Any, run_dir: Path, label: str,
                     hooks: list = (), output: Any = None, log: Log = say) -> RunResult | None:
    """Fit ``model`` with the shared engine, then test the best checkpoint once and log the summary; None on
    the other ranks of a distributed run."""
    from micronet.data import BatchLoader, default_augment
    from micronet.engine import Trainer, load_checkpoint
    from micronet.engine.checkpoint import resolve_checkpoint
    from micronet.models import model_arch

    info = splits.info
    if len(splits.train) == 0:
        raise ConfigError("the training split is empty: lower --val-fraction or raise --train-subset")
    train_loader = BatchLoader(splits.train, config.batch_size, shuffle=True, augment=default_augment(info.name),
                               seed=config.seed, drop_last=True, rank=ctx.rank, world_size=ctx.world_size,
                               channels_last=config.channels_last)
    if len(train_loader) == 0:
        raise ConfigError(f"batch size {config.batch_size} is larger than the {len(splits.train)} training images: lower --batch-size")
    val_loader = BatchLoader(splits.val, config.eval_batch_size, channels_last=config.channels_last) if len(splits.val) else None
    if ctx.is_main:
        log(f"{label} | data {info.name}: {len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test "
            f"| device {ctx.device} x{ctx.world_size}")
    if output is not None and ctx.is_main:
        output.prepare()
    recorded = None if options.resume else recorded_options(options, data=info.name, model=model_arch(model).name,
                                                            cfg=list(model_arch(model).cfg))
    result = Trainer(model, config, train_loader, val_loader, hooks=hooks, ctx=ctx, out_dir=run_dir,
                     data_info=info, options=recorded).fit(resume=options.resume)
    if not ctx.is_main:
        return None
    best = load_checkpoint(resolve_checkpoint(run_dir))
    best_model = best.build_model()
    test = record_test_accuracy(best_model, best, splits, ctx.device, config.eval_batch_size)
    epoch = (result.best or {}).get("epoch")
    log(f"best epoch {epoch} ({best.path}): test accuracy {test * 100:.2f}% on {len(splits.test)} images")
    log(summary_table(best_model.cpu(), (info.in_channels, *info.image_size),
                      {"model": best.arch.name, "test acc (%)": f"{test * 100:.2f}"}))
    return RunResult(run_dir=run_dir, best=best.path, best_epoch=epoch, test_acc=test, test_images=len(splits.test))


def with_devices(options: Any, work):
    """Run ``work(ctx)`` on the devices ``options`` choose, the process group joined under torchrun, and always
    torn down (the command line starts one process per GPU before it gets here)."""
    from micronet.engine import setup, teardown
    from micronet.engine.distributed import parse_gpu_ids

    ctx = setup(cpu=options.cpu, gpu_ids=parse_gpu_ids(options.gpu_id))
    try:
        return work(ctx)
    finally:
        teardown()

