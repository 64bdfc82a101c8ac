"""Rebuild a saved model: its architecture, then the structural changes compression made, then its weights.

A checkpoint (:mod:`micronet.engine.checkpoint`) stores tensors and JSON only. Its ``micronet.json`` says how
the structure changed (``extra.pruning``: the channel record; ``extra.fusion``: folded BatchNorms;
``extra.quantization``: the scheme ``prepare`` used). :func:`restore_model` replays those changes in the
workflow's order — prune, then fold BatchNorms before quantizing, then ``prepare``, then fold what was folded
after quantizing — so the weights load without pickling a model object and without re-running pruning.

This lives with compression rather than in the training engine: the engine stores what it is given, the
code that changes a model's structure knows how to change it back. ``micronet.engine.load_model(path)`` and
``Checkpoint.build_model()`` hand over to :func:`restore_model`; this module imports nothing of the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from micronet.errors import CheckpointError, MicronetError, ModelConfigError

if TYPE_CHECKING:
    from micronet.compression.quantization.core import QuantScheme
    from micronet.engine.checkpoint import Checkpoint

__all__ = ["quant_scheme", "restore_model", "restore_structure"]


def quant_scheme(checkpoint: Checkpoint) -> QuantScheme | None:
    """The quantization scheme a checkpoint's model was prepared with, or None for a float model."""
    held = (checkpoint.meta.get("extra") or {}).get("quantization")
    if not held:
        return None
    from micronet.compression.quantization.core import QuantScheme

    try:
        return QuantScheme.from_json(held["scheme"])
    except (KeyError, TypeError, MicronetError) as exc:
        raise CheckpointError(f"{checkpoint.meta_path} has an invalid quantization entry: {exc}") from exc


def _rebuild_architecture(checkpoint: Checkpoint) -> nn.Module:
    arch = checkpoint.arch
    if arch is None:
        raise CheckpointError(f"{checkpoint.path} was saved from a model outside micronet's registry: build the model "
                              "yourself and call load_weights(model, checkpoint)")
    try:
        return arch.build()
    except ModelConfigError as exc:  # the user's MODULE:CALLABLE no longer imports, or a registry cfg is refused
        raise CheckpointError(f"checkpoint {checkpoint.path} cannot rebuild its model {arch.name}: {exc}") from exc


def _replay_pruning(model: nn.Module, checkpoint: Checkpoint, record: dict[str, Any]) -> nn.Module:
    from micronet.compression.pruning import apply_channel_record

    try:
        model = apply_channel_record(model, record)
    except MicronetError as exc:
        arch = checkpoint.arch
        raise CheckpointError(f"{checkpoint.meta_path} has a pruning record that does not fit {arch.name} with cfg "
                              f"{list(arch.cfg)}: {exc}") from exc
    model.channel_record = record
    return model


def restore_structure(checkpoint: Checkpoint) -> nn.Module:
    """A freshly initialised model with the checkpoint's structure (pruned channels, folded BatchNorms,
    quantizers), ready for :meth:`Checkpoint.load_into`."""
    model = _rebuild_architecture(checkpoint)
    if checkpoint.pruning_record is not None:  # channels removed first: the workflow prunes, quantizes, fuses
        model = _replay_pruning(model, checkpoint, checkpoint.pruning_record)
    fusion = checkpoint.fusion_record
    if fusion is not None:  # BatchNorms folded before quantizing
        from micronet.compression.fusion import apply_fusion_record

        apply_fusion_record(model, fusion, "float")
    scheme = quant_scheme(checkpoint)
    if scheme is not None:  # re-create the quantized structure; its statistics load with the weights
        from micronet.compression.quantization.core import prepare

        model = prepare(model, scheme, inplace=True)
    if fusion is not None:  # BatchNorms folded after quantizing (QAT folding convs, sign folds)
        from micronet.compression.fusion import apply_fusion_record

        apply_fusion_record(model, fusion, "quantized")
        model.fusion_record = fusion
    return model


def restore_model(checkpoint: Checkpoint) -> nn.Module:
    """The checkpoint's model: its structure rebuilt (see :func:`restore_structure`) and its weights loaded."""
    return checkpoint.load_into(restore_structure(checkpoint))

