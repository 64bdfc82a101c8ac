"""What a resumed run continues with: every option it was started with.

A run records its options (the data options, the model, the training options, the method's own flags) in
its resumable checkpoint. Resuming restores them all; an option given again must have the value the run was
started with, except the few that only say how far or where to run (:data:`FREE_ON_RESUME`). Anything else
would silently mix two experiments in one run: a run started on 6,000 images must not continue on 54,000
with another validation split, and ``--lr`` given on resume must not be ignored without a word.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

from micronet.errors import ConfigError

#: Options a resumed run may change: how many epochs in total, the progress bar, the devices it runs on, and
#: where it writes (a run folder that was moved is resumed from its new place).
FREE_ON_RESUME = frozenset({"epochs", "progress", "cpu", "gpu_id", "resume", "out", "overwrite"})
#: Options holding paths: recorded absolute, so a run resumed from another folder compares them right.
PATH_OPTIONS = frozenset({"data_root", "out", "checkpoint", "init", "prune_refine", "distill", "weights"})
#: Training options a run started before options were recorded still holds (in its TrainConfig).
_CONFIG_OPTIONS = ("batch_size", "eval_batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule",
                   "milestones", "step_size", "gamma", "warmup_epochs", "label_smoothing", "amp", "compile",
                   "channels_last", "seed", "deterministic")


def _json_value(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_json_value(v) for v in value)


def recordable_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options to record with a run: JSON values only, paths made absolute, resume itself left out."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name == "resume" or not _json_value(value):
            continue
        if name in PATH_OPTIONS and isinstance(value, str):
            value = os.path.abspath(os.path.expanduser(value))
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def options_from_config(config: Mapping[str, Any], model_name: str | None) -> dict[str, Any]:
    """What can still be checked of a run recorded before its options were: its TrainConfig and its model."""
    known = {name: config[name] for name in _CONFIG_OPTIONS if name in config}
    if model_name is not None:
        known["model"] = model_name
    return known


def _normal(name: str, value: Any) -> Any:
    """Equal settings compare equal however they were spelled: ``64,48`` and ``64 48``, ``0.1`` and ``1e-1``."""
    if name in PATH_OPTIONS and isinstance(value, str):
        return os.path.abspath(os.path.expanduser(value))
    if isinstance(value, (list, tuple)):
        return tuple(token for v in value for token in re.split(r"[,\s]+", str(v)) if token)
    if isinstance(value, str) and name == "model":
        return value.strip().lower()
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return value


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "(none)"
    return str(value)


def check_resumed_options(source: str, recorded: Mapping[str, Any], given: Mapping[str, Any],
                          flags: Mapping[str, str]) -> list[str]:
    """Refuse an option given on resume whose value differs from the one ``source`` was started with.

    ``given``: the values of the options the user gave (by destination name); ``flags``: how each is spelt
    (``{"lr": "--lr"}``). Returns the flags that ``recorded`` cannot check (a run recorded by an older
    version), which the caller reports as unchecked.
    """
    unchecked: list[str] = []
    for name, value in given.items():
        if name in FREE_ON_RESUME:
            continue
        flag = flags.get(name, f"--{name.replace('_', '-')}")
        if name not in recorded:
            unchecked.append(flag)
            continue
        held = recorded[name]
        if _normal(name, value) == _normal(name, held):
            continue
        fix = f"drop {flag}, or start a new run with another --out"
        if held is None or held is False or held == []:
            raise ConfigError(f"{source} was not started with {flag}: a resumed run continues with the options it was "
                              f"started with ({fix})")
        shown = "" if held is True else f" {_shown(held)}"
        raise ConfigError(f"{source} was started with {flag}{shown}, not {_shown(value)}: a resumed run continues with "
                          f"the options it was started with ({fix})")
    return unchecked


def restored_options(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded options a resumed run takes back (all but those it may change)."""
    return {name: value for name, value in recorded.items() if name not in FREE_ON_RESUME}


def resume_options(source: str, training: Mapping[str, Any], model_name: str | None, given: Mapping[str, Any],
                   flags: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """(options to restore, flags that could not be checked) for resuming the run ``source``, whose resumable
    checkpoint holds ``training`` and the model ``model_name``; refuses a changed option (see
    :func:`check_resumed_options`). A run recorded before options were checks what its TrainConfig and model
    still tell."""
    recorded = training.get("options")
    if not isinstance(recorded, dict):
        recorded = options_from_config(training.get("config") or {}, model_name)
    unchecked = check_resumed_options(source, recorded, given, flags)
    return restored_options(recorded), unchecked
