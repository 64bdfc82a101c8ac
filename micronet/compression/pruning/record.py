"""The channel record: a pruned model's per-layer sizes as JSON, and its replay onto a fresh model.

``channel_record(pruned)`` lists the size arguments of every Conv/BatchNorm/Linear module (the resized ones
and the rest: listing all makes the record self-describing and replay a no-op where nothing changed).
``apply_channel_record(fresh, record)`` swaps each listed module whose size differs for a fresh one of the
same type at the recorded size, keeping its other constructor arguments, so ``load_state_dict`` of the pruned
weights works without re-running pruning (and without pickling the model object).

For registry models (``model.arch``) the record also carries ``cfg``, the registry channel config that builds
the pruned network directly (``build_model(name, cfg=record["cfg"])``), when one exists; ``None`` otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from micronet.compression.pruning.surgery import module_sizes, resize_module
from micronet.errors import ModelConfigError, PruningError
from micronet.models.registry import attach_arch, find_arch

__all__ = ["RECORD_VERSION", "apply_channel_record", "channel_record", "derive_cfg"]

RECORD_VERSION = 1


def _out(m: nn.Module) -> int:
    return m.out_channels if hasattr(m, "out_channels") else m.out_features


def _nin(m: nn.Module) -> list[int]:
    convs = [b.conv for b in m.features if hasattr(b, "conv")]
    return [_out(c) for c in convs[:8]]


def _lenet(m: nn.Module) -> list[int]:
    return [m.conv1.out_channels, m.conv2.out_channels, m.fc1.out_features]


def _resnet(m: nn.Module) -> list[int]:
    stages = [m.layer1, m.layer2, m.layer3]
    return [m.conv1.out_channels, stages[1][0].conv2.out_channels, stages[2][0].conv2.out_channels] + \
        [b.conv1.out_channels for s in stages for b in s]


def _mobilenetv2(m: nn.Module) -> list[int]:
    blocks = list(m.features)[1:-1]
    stage_ends, count = [], 0
    from micronet.models.mobilenetv2 import SETTINGS
    for _, _, n, _ in SETTINGS:
        count += n
        stage_ends.append(blocks[count - 1].project.conv.out_channels)
    hidden = [b.depthwise.conv.out_channels for b in blocks]
    return [m.features[0].conv.out_channels, *stage_ends, *hidden, m.features[-1].conv.out_channels]


# Registry name → reader of the cfg from a (pruned) instance; the result is verified by rebuilding.
CFG_READERS: dict[str, Callable[[nn.Module], list[int]]] = {
    "nin": _nin, "nin_gc": _nin, "lenet": _lenet, "resnet20": _resnet, "resnet56": _resnet,
    "mobilenetv2": _mobilenetv2,
}


def derive_cfg(model: nn.Module) -> list[int] | None:
    """The registry cfg that rebuilds ``model``'s exact shapes, or None (no ``arch``, no reader, or no such cfg)."""
    from micronet.models import build_model

    arch = find_arch(model)
    reader = CFG_READERS.get(getattr(arch, "name", None))
    if reader is None:
        return None
    try:
        cfg = [int(c) for c in reader(model)]
        rebuilt = build_model(arch.name, arch.num_classes, arch.in_channels, cfg)
    except (AttributeError, IndexError, TypeError, ModelConfigError):
        return None
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    return cfg if ours == theirs else None


def channel_record(model: nn.Module) -> dict[str, Any]:
    """JSON-ready ``{"version": 1, "modules": {path: {"type", sizes…}}, "cfg": [ints] | None}``."""
    modules: dict[str, dict[str, Any]] = {}
    for path, m in model.named_modules():
        sizes = module_sizes(m)
        if sizes is not None and path:
            modules[path] = {"type": type(m).__name__, **sizes}
    return {"version": RECORD_VERSION, "modules": modules, "cfg": derive_cfg(model)}


def _check_record(record: Any) -> Mapping[str, Any]:
    if not isinstance(record, Mapping) or not isinstance(record.get("modules"), Mapping):
        raise PruningError("a channel record must be the dict channel_record() returns, with 'version' and 'modules'")
    if record.get("version") != RECORD_VERSION:
        raise PruningError(f"channel record version {record.get('version')!r} is not supported (this micronet "
                           f"writes version {RECORD_VERSION}): re-create it with channel_record()")
    return record


def apply_channel_record(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Resize ``model``'s modules (in place) to the record's sizes and return it; weights are fresh.

    Raises :class:`PruningError` when the record names a module the model lacks, of another type, or with
    sizes that are not positive integers. ``model.arch.cfg`` is updated when the record has a ``cfg``.
    """
    record = _check_record(record)
    for path, entry in record["modules"].items():
        try:
            m = model.get_submodule(path)
        except AttributeError:
            raise PruningError(f"the channel record names module '{path}', which the model does not have: build the "
                               "same architecture the record was made from") from None
        current = module_sizes(m)
        if current is None or not isinstance(entry, Mapping) or entry.get("type") != type(m).__name__:
            got = entry.get("type") if isinstance(entry, Mapping) else entry
            raise PruningError(f"the channel record says '{path}' is a {got}, but the model has a {type(m).__name__}: "
                               "build the same architecture the record was made from")
        sizes = {}
        for key in current:
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PruningError(f"the channel record gives '{path}' {key}={value!r}: it must be a positive integer")
            sizes[key] = value
        if sizes != current:
            model.set_submodule(path, resize_module(m, sizes))
    cfg = record.get("cfg")
    arch = find_arch(model)
    if cfg is not None and arch is not None:
        attach_arch(model, dataclasses.replace(arch, cfg=tuple(int(c) for c in cfg)))
    return model
