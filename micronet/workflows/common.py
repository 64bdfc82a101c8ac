"""Small pieces several verbs share: reading the data, claiming an output, the one-row summary table."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from micronet.errors import ConfigError

Log = Callable[[str], None]


def say(line: str) -> None:
    """The default log of a workflow: a line on standard output, at once (progress of a long run)."""
    print(line, flush=True)


_handed_over: list[tuple[tuple, Any]] = []  # splits read early (to size a user's model), for the next load_data


def _data_key(options: Any, name: str) -> tuple:
    return (name, options.data_root, options.val_fraction, options.data_seed, options.train_subset, options.test_subset)


def load_data(options: Any, name: str, *, keep: bool = False):
    """The splits of dataset ``name`` as ``options`` (a :class:`~micronet.workflows.options.DataOptions`) cut it.
    ``keep``: hand them to the next call with the same options instead of reading the dataset twice."""
    from micronet.data import load_dataset

    key = _data_key(options, name)
    if _handed_over and _handed_over[0][0] == key:
        return _handed_over.pop()[1]
    _handed_over.clear()
    splits = load_dataset(name, options.data_root, val_fraction=options.val_fraction, seed=options.data_seed,
                          train_subset=options.train_subset, test_subset=options.test_subset)
    if keep:
        _handed_over.append((key, splits))
    return splits


def dataset_name(options: Any, checkpoint: Any) -> str | None:
    """The dataset a command runs on: ``--data``, else the one ``checkpoint`` records, else None."""
    held = checkpoint.data_info
    return options.data or (held.name if held else None)


def check_data_fits(checkpoint: Any, info: Any) -> None:
    """Refuse a dataset whose channels or classes differ from what ``checkpoint``'s model takes."""
    arch = checkpoint.arch
    if (info.in_channels, info.num_classes) != (arch.in_channels, arch.num_classes):
        raise ConfigError(f"{checkpoint.path} expects {arch.in_channels}-channel inputs and {arch.num_classes} classes, "
                          f"but {info.name} has {info.in_channels} and {info.num_classes}: use the dataset it was trained on")


def claim(path: str | os.PathLike, kind: Any, overwrite: bool, flag: str = "--out"):
    """Claim the output path before any work (see micronet.outputs): one-line error if it may not be written."""
    from micronet.outputs import claim_output

    return claim_output(path, kind, overwrite=overwrite, flag=flag)


def load_source(path: str):
    """The checkpoint at ``path`` (a checkpoint folder or a run folder, whose best/ it reads)."""
    from micronet.engine import load_checkpoint
    from micronet.engine.checkpoint import resolve_checkpoint

    return load_checkpoint(resolve_checkpoint(path))


def device_context(options: Any):
    """The single device a one-process command runs on (the first of ``--gpu-id``)."""
    from micronet.engine import setup
    from micronet.engine.distributed import parse_gpu_ids

    return setup(cpu=options.cpu, gpu_ids=parse_gpu_ids(options.gpu_id)[:1])


def summary_table(model: Any, input_shape: tuple[int, ...], extra: dict[str, Any] | None = None) -> str:
    """One table row: parameters, MACs, GFLOPs and size of ``model`` at ``input_shape`` (after ``extra``)."""
    from micronet.analysis import format_table, summarize

    s = summarize(model, input_shape)
    row = dict(extra or {})
    row.update({"params (M)": f"{s.params / 1e6:.4f}", "MACs (M)": f"{s.macs / 1e6:.2f}",
                "GFLOPs": f"{s.flops / 1e9:.4f}", "size (MB)": f"{s.size_bytes / 1e6:.3f}"})
    return format_table([row])


def parse_shape(text: str) -> tuple[int, ...]:
    """``--input-shape`` C,H,W as three positive integers."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape takes C,H,W such as 3,32,32 (got {text})")
    return shape


def int_list(text: str, option: str) -> list[int]:
    """A comma- or space-separated list of positive integers (``--batch-sizes 1,64``)."""
    try:
        values = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{option} takes positive integers such as 1,64 (got {text})")
    return values


def cfg_list(values: list[str] | None) -> list[int] | None:
    """``--cfg`` words (``64,48,32`` or ``64 48 32``) as channel counts; None when not given."""
    if not values:
        return None
    try:
        return [int(part) for value in values for part in str(value).replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--cfg takes channel counts such as 64,48,32 (got {' '.join(map(str, values))})") from None


def record_test_accuracy(model: Any, checkpoint: Any, splits: Any, device: Any, batch_size: int,
                    **extra_metrics: float) -> float:
    """Test accuracy of ``model``, written into ``checkpoint``'s metrics (reporting only, never selection)."""
    from micronet.data import BatchLoader
    from micronet.engine import evaluate, save_checkpoint

    stats = evaluate(model.to(device), BatchLoader(splits.test, batch_size), device)
    metrics = {**checkpoint.metrics, **extra_metrics, "test_loss": stats["loss"], "test_acc": stats["acc"]}
    save_checkpoint(checkpoint.path, model, data_info=splits.info, metrics=metrics, training=checkpoint.training,
                    extra={k: v for k, v in (checkpoint.meta.get("extra") or {}).items() if k != "quantization"})
    return stats["acc"]

