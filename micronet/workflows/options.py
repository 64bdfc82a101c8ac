"""Options of the workflows: one dataclass per verb, one field per option, described once.

A field carries what both front ends need: its command-line spellings (the first is the one error messages
name), its help and how a value is read (``type``, ``choices``, ``nargs``, ``action`` as argparse spells
them). The command line builds its parsers from these fields (micronet.cli_parsers) and the pipeline checks
a step's ``args`` against them (:func:`options_from_mapping`), so an option exists, is spelled and typed the
same way in both, and a new option is added in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from micronet.errors import ConfigError

Options = TypeVar("Options")


def option(default: Any, *flags: str, help: str = "", **read: Any) -> Any:  # noqa: A002 - argparse's word
    """A dataclass field for an option spelled ``flags`` (none: a positional argument). ``read`` holds how a
    value is read, as argparse spells it: ``type``, ``choices``, ``nargs``, ``action`` (store_true, or
    store_false for a ``--no-...`` flag), ``metavar``."""
    metadata = {"flags": flags, "help": help, "read": read}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are options (every field made with :func:`option`)."""
    return [f for f in dataclasses.fields(cls) if "flags" in f.metadata]


def flag_of(f: dataclasses.Field) -> str:
    """How error messages spell an option: its first flag, or its name for a positional argument."""
    return f.metadata["flags"][0] if f.metadata["flags"] else f.name


def option_flags(cls: type) -> dict[str, str]:
    """Every option of ``cls`` (field name) with the flag messages name it by."""
    return {f.name: flag_of(f) for f in option_fields(cls)}


def key_name(key: object) -> str:
    """``--data-root``, ``data-root`` and ``data_root`` name the same option."""
    return str(key).lstrip("-").replace("-", "_")


def spellings(cls: type) -> dict[str, dataclasses.Field]:
    """Each way a config may name an option of ``cls`` (as :func:`key_name` writes it) -> its field."""
    out: dict[str, dataclasses.Field] = {}
    for f in option_fields(cls):
        for flag in f.metadata["flags"] or (f.name,):
            out[key_name(flag)] = f
    return out


def _read_scalar(f: dataclasses.Field, value: Any) -> Any:
    read = f.metadata["read"]
    convert = read.get("type", str)
    try:
        converted = convert(str(value))
    except (TypeError, ValueError):
        raise ConfigError(f"argument {flag_of(f)}: invalid {getattr(convert, '__name__', 'value')} value: "
                          f"{str(value)!r}") from None
    choices = read.get("choices")
    if choices is not None and converted not in choices:
        shown = ", ".join(repr(choice) for choice in choices)
        raise ConfigError(f"argument {flag_of(f)}: invalid choice: {converted!r} (choose from {shown})")
    return converted


def read_value(f: dataclasses.Field, value: Any) -> Any:
    """The value of option ``f`` that a config's ``value`` stands for, checked as the command line checks
    the same words; None when the value leaves the option at its default (``false`` for a switch)."""
    read = f.metadata["read"]
    action = read.get("action")
    if action in ("store_true", "store_false"):
        if not isinstance(value, bool):
            raise ConfigError(f"argument {flag_of(f)}: a switch takes true or false (got {value!r})")
        return (action == "store_true") if value else None
    if value is None or value is False:
        return None
    if read.get("nargs") in ("+", "*"):
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values and read["nargs"] == "+":
            raise ConfigError(f"argument {flag_of(f)}: expected at least one argument")
        return [_read_scalar(f, v) for v in values]
    if value is True or isinstance(value, (list, tuple, dict)):
        raise ConfigError(f"argument {flag_of(f)}: expected one argument (got {value!r})")
    return _read_scalar(f, value)


def options_from_mapping(cls: type[Options], values: Mapping[str, Any], *, command: str,
                         ignore: Iterable[str] = ()) -> tuple[Options, set[str]]:
    """(``cls`` built from ``values`` (keys spelled as on the command line, with or without dashes), the
    names of the options they set). A key that is no option of ``cls`` or a value the command line would
    refuse raises ConfigError; keys in ``ignore`` (as :func:`key_name` writes them) are skipped."""
    known = spellings(cls)
    skipped = {key_name(key) for key in ignore}
    chosen: dict[str, Any] = {}
    for key, value in values.items():
        name = key_name(key)
        if name in skipped:
            continue
        if name not in known:
            raise ConfigError(f"`micronet {command}` has no option --{key}")
        f = known[name]
        try:
            converted = read_value(f, value)
        except ConfigError as error:  # worded as the command line words the same mistake
            raise ConfigError(f"micronet {command}: error: {error}") from None
        if converted is not None:
            chosen[f.name] = converted
    return cls(**chosen), set(chosen)


def options_from_namespace(cls: type[Options], namespace: Any) -> Options:
    """``cls`` from parsed command-line arguments (an argparse namespace holding every option)."""
    return cls(**{f.name: getattr(namespace, f.name) for f in option_fields(cls)})


@dataclass(kw_only=True)
class DataOptions:
    """Which dataset, and which part of it."""

    data: str | None = option("fashion-mnist", "--data", help="dataset: fashion-mnist, cifar10, imagefolder, synthetic")
    data_root: str | None = option(None, "--data-root",
                                   help="dataset folder (cifar10: the extracted cifar-10-batches-py)")
    val_fraction: float = option(0.1, "--val-fraction", type=float,
                                 help="share of the training set held out for model selection")
    train_subset: int | None = option(None, "--train-subset", type=int,
                                      help="use only this many training images (smoke runs)")
    test_subset: int | None = option(None, "--test-subset", type=int, help="use only this many test images")
    data_seed: int = option(0, "--data-seed", type=int, help="seed of the train/val split and subsets")


@dataclass(kw_only=True)
class DataFromCheckpoint(DataOptions):
    """Data options of a command that reads a checkpoint: the dataset defaults to the one it records."""

    data: str | None = option(None, "--data", help="dataset: fashion-mnist, cifar10, imagefolder, synthetic")


@dataclass(kw_only=True)
class DeviceOptions:
    cpu: bool = option(False, "--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
    gpu_id: str | None = option(None, "--gpu-id",
                                help="GPUs to use, e.g. 0 or 0,1 (several GPUs start one DDP process each)")


@dataclass(kw_only=True)
class Overwrite:
    overwrite: bool = option(False, "--overwrite", action="store_true",
                             help="replace what micronet wrote at the output path (never a folder or file it did "
                                  "not write)")


@dataclass(kw_only=True)
class TrainingOptions:
    """How a model is trained (train, and the QAT/QAFT of quantize). ``epochs`` None: the verb's default."""

    default_epochs = 10  # not an option: what epochs=None stands for

    epochs: int | None = option(None, "--epochs", type=int, help="number of epochs (default 10)")
    batch_size: int = option(128, "--batch-size", "--train-batch-size", type=int, help="training batch size")
    eval_batch_size: int = option(512, "--eval-batch-size", type=int, help="evaluation batch size")
    optimizer: str = option("sgd", "--optimizer", choices=["sgd", "adam", "adamw"])
    lr: float = option(0.05, "--lr", type=float, help="base learning rate")
    momentum: float = option(0.9, "--momentum", type=float)
    weight_decay: float = option(5e-4, "--weight-decay", "--wd", type=float)
    schedule: str = option("cosine", "--schedule", choices=["cosine", "step", "multistep", "constant"])
    milestones: list[int] = option([], "--milestones", type=int, nargs="*",
                                   help="epochs where multistep multiplies the lr by --gamma")
    step_size: int = option(30, "--step-size", type=int, help="epochs between decays of the step schedule")
    gamma: float = option(0.1, "--gamma", type=float)
    warmup_epochs: float = option(0.0, "--warmup-epochs", type=float)
    label_smoothing: float = option(0.0, "--label-smoothing", type=float)
    amp: bool = option(False, "--amp", action="store_true",
                       help="mixed precision on CUDA (bf16, or fp16 with loss scaling)")
    compile: bool = option(False, "--compile", action="store_true", help="torch.compile the training forward")
    channels_last: bool = option(True, "--no-channels-last", action="store_false", help="keep NCHW memory layout")
    seed: int = option(0, "--seed", type=int)
    deterministic: bool = option(False, "--deterministic", action="store_true", help="deterministic kernels (slower)")
    resume: str | None = option(None, "--resume", help="continue the run in this directory (its last/ checkpoint)")
    progress: bool | None = option(None, "--no-progress", action="store_false", help="no progress bar")

    @property
    def total_epochs(self) -> int:
        return self.epochs if self.epochs is not None else self.default_epochs


@dataclass(kw_only=True)
class DistillOptions:
    distill: str | None = option(None, "--distill", metavar="CHECKPOINT",
                                 help="knowledge distillation: add the KL divergence to this trained (float) model's "
                                      "softened outputs to the loss; helps binary and low-bit networks most")
    distill_weight: float = option(1.0, "--distill-weight", type=float,
                                   help="--distill: weight of the distillation term")
    distill_temperature: float = option(4.0, "--distill-temperature", type=float,
                                        help="--distill: softmax temperature T")
