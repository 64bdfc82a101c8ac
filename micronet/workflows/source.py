"""The model a command starts from: a micronet checkpoint (``--checkpoint``), or the user's own network
(``--model MODULE:CALLABLE --weights FILE``) read through the same interface.

A user's model is built by :func:`micronet.models.build_model` (which records the import, so the checkpoints
written from it rebuild it) for the dataset's classes and input channels, and its state dict is loaded by
:func:`micronet.models.load_weights_file` (tensors only; every name and shape checked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from micronet.errors import ConfigError
from micronet.workflows.options import option

MODEL_HELP = ("your own model in place of --checkpoint: MODULE:CALLABLE, a module (or .py file) and the function or "
              "class in it that builds the network (called with num_classes= / in_channels= when it takes them)")
WEIGHTS_HELP = "--model's trained state dict: .safetensors, or .pt/.pth holding tensors only"


@dataclass(kw_only=True)
class UserModelOptions:
    """``--model MODULE:CALLABLE --weights FILE``: the user's own network, in place of ``--checkpoint``."""

    model: str | None = option(None, "--model", metavar="MODULE:CALLABLE", help=MODEL_HELP)
    weights: str | None = option(None, "--weights", metavar="FILE", help=WEIGHTS_HELP)


@dataclass
class UserModel:
    """The user's network and weights file, with the read interface of a checkpoint (no metrics, no records)."""

    spec: str
    weights: str | None
    data_info: Any  # the DatasetInfo its classes and input channels come from
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    training: None = None
    quant_scheme: None = None
    fusion_record: None = None
    pruning_record: None = None
    _arch: Any = None

    @property
    def path(self) -> Path:
        return Path(self.weights) if self.weights else Path(self.spec)

    @property
    def arch(self):
        from micronet.models import model_arch
        if self._arch is None:
            self._arch = model_arch(self.build_model())
        return self._arch

    def build_model(self):
        """The network built for the dataset, with the weights file loaded (when one is given)."""
        from micronet.models import build_model, load_weights_file, model_arch

        model = build_model(self.spec, self.data_info.num_classes, self.data_info.in_channels)
        if self.weights:
            load_weights_file(model, self.weights)
        self._arch = model_arch(model)
        return model

    def load_into(self, model):
        """Load the weights file into ``model`` (``train --model ... --weights``: fine-tuning)."""
        from micronet.models import load_weights_file

        return load_weights_file(model, self.weights)


def is_user_model(name: str | None) -> bool:
    from micronet.models import is_model_spec

    return name is not None and is_model_spec(name)


def check_source_options(options: Any, *, weights_required: bool = True) -> None:
    """Refuse ``--checkpoint`` with ``--model``, ``--weights`` without a user's model, and (when
    ``weights_required``) a user's model without ``--weights``."""
    checkpoint, model, weights = getattr(options, "checkpoint", None), options.model, options.weights
    if checkpoint and model:
        raise ConfigError(f"pass either --checkpoint DIR or --model MODULE:CALLABLE --weights FILE, not both (got "
                          f"--checkpoint {checkpoint} and --model {model})")
    if weights and not is_user_model(model):
        raise ConfigError("--weights FILE goes with --model MODULE:CALLABLE (your own model): pass both, or "
                          "--checkpoint DIR for a micronet checkpoint")
    if model and not is_user_model(model):
        raise ConfigError(f"--model {model} is not MODULE:CALLABLE: pass e.g. --model my_nets.py:build --weights "
                          "weights.pt, or a micronet checkpoint with --checkpoint DIR")
    if weights_required and model and not weights:
        raise ConfigError(f"--model {model} needs --weights FILE (its trained state dict): this command reads a "
                          "trained model")


def open_source(options: Any, data_info: Any = None):
    """The checkpoint (``--checkpoint``) or the user's model (``--model --weights``, built for ``data_info``, by
    default the dataset ``--data`` names) that ``options`` name."""
    from micronet.workflows.common import load_source

    check_source_options(options)
    if not options.model:
        if not options.checkpoint:
            raise ConfigError("pass --checkpoint DIR, or your own model with --model MODULE:CALLABLE --weights FILE")
        return load_source(options.checkpoint)
    if data_info is None:
        if not options.data:
            raise ConfigError(f"--model {options.model} does not say which dataset it takes: pass --data (the dataset "
                              "it was trained on)")
        from micronet.workflows.common import load_data

        data_info = load_data(options, options.data, keep=True).info
    return UserModel(options.model, options.weights, data_info)
