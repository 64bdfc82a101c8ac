"""Checkpoints as directories of safetensors + JSON; loading never unpickles.

Layout of a checkpoint directory::

    model.safetensors      the model's state_dict (parameters and buffers)
    train_state.safetensors optimizer tensors and RNG states (only in resumable checkpoints)
    micronet.json          architecture (name, classes, input channels, channel cfg), dataset info,
                           how the structure changed (extra.pruning, extra.quantization, extra.fusion),
                           metrics, training progress, optimizer scalars, versions, and the size and
                           SHA-256 of every tensor file, so a truncated or mixed-up file is caught.

The directory is written to a staging folder and swapped into place as a whole. This module stores and
verifies; rebuilding a model whose structure compression changed is :mod:`micronet.compression.restore`'s job
(``Checkpoint.build_model`` hands over to it).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from micronet.errors import CheckpointError, MicronetError
from micronet.io import atomic_directory, read_description, resolve_directory
from micronet.models.registry import find_arch
from micronet.outputs import OutputKind, described_as

FORMAT = "micronet-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.safetensors"
META_FILE = "micronet.json"

CHECKPOINT_OUTPUT = OutputKind("checkpoint", described_as(META_FILE, FORMAT),
                               frozenset({MODEL_FILE, TRAIN_STATE_FILE, META_FILE}))

_PICKLE_MAGICS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns: tensors plus the parsed JSON, nothing executed."""

    path: Path
    meta: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    train_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def arch(self):
        from micronet.models import ModelArch

        arch = self.meta.get("arch")
        if arch is None:
            return None
        try:
            return ModelArch.from_json(arch)
        except MicronetError as exc:
            raise CheckpointError(f"{self.path / META_FILE} has an invalid architecture entry: {exc}") from exc

    @property
    def data_info(self):
        from micronet.data import DatasetInfo

        info = self.meta.get("data")
        return None if info is None else DatasetInfo.from_json(info)

    @property
    def training(self) -> dict[str, Any] | None:
        return self.meta.get("training")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta.get("metrics", {})

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    def build_model(self) -> nn.Module:
        """Rebuild the model: architecture, then its pruning, fusion and quantization replayed, then the weights
        (see :func:`micronet.compression.restore.restore_model`, where the replay lives)."""
        from micronet.compression.restore import restore_model

        return restore_model(self)

    @property
    def pruning_record(self) -> dict[str, Any] | None:
        """The channel record of a pruned model (``extra.pruning``, see :mod:`micronet.compression.pruning`), or None."""
        return (self.meta.get("extra") or {}).get("pruning") or None

    @property
    def fusion_record(self) -> dict[str, Any] | None:
        """What :func:`micronet.compression.fusion.fuse` changed in the model's structure, or None."""
        return (self.meta.get("extra") or {}).get("fusion") or None

    @property
    def quant_scheme(self):
        """The quantization scheme the model was prepared with, or None for a float model."""
        from micronet.compression.restore import quant_scheme

        return quant_scheme(self)

    def load_into(self, model: nn.Module) -> nn.Module:
        """Copy the weights into ``model`` after checking every name and shape."""
        expected = model.state_dict()
        missing = sorted(set(expected) - set(self.state_dict))
        unexpected = sorted(set(self.state_dict) - set(expected))
        wrong_shape = sorted(
            k for k in set(expected) & set(self.state_dict) if expected[k].shape != self.state_dict[k].shape
        )
        if missing or unexpected or wrong_shape:
            held = self.meta.get("arch") or {}
            described = f"{held.get('name', 'an unknown model')} with cfg {held.get('cfg')}"
            model_arch = find_arch(model)
            target = f"{model_arch.name} with cfg {list(model_arch.cfg)}" if model_arch else type(model).__name__
            details = "; ".join(
                part
                for part in (
                    f"missing {_preview(missing)}" if missing else "",
                    f"unexpected {_preview(unexpected)}" if unexpected else "",
                    f"shape differs for {_preview(wrong_shape)}" if wrong_shape else "",
                )
                if part
            )
            raise CheckpointError(
                f"checkpoint {self.path} holds {described}, which does not fit {target} ({details}): "
                "build the model the checkpoint was saved from"
            )
        try:
            model.load_state_dict(self.state_dict)
        except MicronetError as exc:  # e.g. a quantizer refusing other bit widths
            raise CheckpointError(f"checkpoint {self.path} does not fit the model: {exc}") from exc
        return model


def _preview(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (what a description records for each tensor file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions_record() -> dict[str, str]:
    """The ``versions`` entry of a description: micronet, torch and Python versions that wrote it."""
    import micronet

    return {"micronet": micronet.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous views; clone keeps tied weights correct.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def structure_meta(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"arch", "extra"}`` entries that rebuild ``model``'s structure: architecture, pruned channels
    (``extra.pruning``), quantization scheme (``extra.quantization``) and BatchNorm fusion
    (``extra.fusion``), all read from the model itself; other ``extra`` entries are kept."""
    arch = find_arch(model)
    extra = {k: v for k, v in (extra or {}).items() if k not in ("pruning", "quantization", "fusion")}
    pruning = getattr(model, "channel_record", None)
    if isinstance(pruning, dict) and pruning:
        extra["pruning"] = pruning
    scheme = getattr(model, "quant_scheme", None)
    if scheme is not None:
        extra["quantization"] = {"scheme": scheme.to_json()}
    fusion = getattr(model, "fusion_record", None)
    if fusion:
        extra["fusion"] = fusion
    return {"arch": arch.to_json() if arch is not None else None, "extra": extra}


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    data_info: Any = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    train_tensors: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and optionally the training state) as a checkpoint directory, atomically."""
    structure = structure_meta(model, extra)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": structure["arch"],
        "data": data_info.to_json() if data_info is not None else None,
        "metrics": metrics or {},
        "training": training,
        "extra": structure["extra"],
        "versions": versions_record(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_directory(path, CHECKPOINT_OUTPUT) as staging:
        files = {MODEL_FILE: _contiguous_cpu(model.state_dict())}
        if train_tensors:
            files[TRAIN_STATE_FILE] = _contiguous_cpu(train_tensors)
        meta["files"] = {}
        for name, tensors in files.items():
            save_file(tensors, str(staging / name))
            meta["files"][name] = {"bytes": (staging / name).stat().st_size, "sha256": file_sha256(staging / name)}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return Path(path)


def _describe_foreign_file(path: Path) -> str:
    head = path.read_bytes()[:4] if path.stat().st_size else b""
    if head.startswith(_PICKLE_MAGICS):
        return (
            f"{path} is a pickle (torch.save) file; micronet never unpickles files it is handed: save the "
            "weights with safetensors.torch.save_file(model.state_dict(), 'model.safetensors') instead"
        )
    return f"{path} is a file, not a micronet checkpoint directory (model.safetensors + micronet.json)"


def load_checkpoint(path: str | Path, *, with_train_state: bool = False) -> Checkpoint:
    """Read and verify a checkpoint directory; raises :class:`CheckpointError` in one sentence."""
    path = resolve_directory(path)
    if path.is_file():
        raise CheckpointError(_describe_foreign_file(path))
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist: pass the directory written by `micronet train --out`")
    meta = _read_meta(path)
    wanted = [MODEL_FILE] + ([TRAIN_STATE_FILE] if with_train_state and TRAIN_STATE_FILE in _file_records(meta) else [])
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for name in wanted:
        loaded[name] = load_tensor_file(path / name, _file_records(meta).get(name))
    return Checkpoint(path, meta, loaded[MODEL_FILE], loaded.get(TRAIN_STATE_FILE, {}))


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path} has no {META_FILE}: it is not a micronet checkpoint directory")
    return read_description(meta_path, fmt=FORMAT, version=FORMAT_VERSION, what="checkpoint")


def _file_records(meta: dict[str, Any]) -> dict[str, Any]:
    files = meta.get("files")
    return files if isinstance(files, dict) else {}


def verify_checkpoint(path: str | Path) -> Path:
    """Check every tensor file of a checkpoint against the size and SHA-256 its ``micronet.json`` records,
    without loading the tensors (what a cache must do before trusting an artifact); returns the folder."""
    path = resolve_directory(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    meta = _read_meta(path)
    for name in dict.fromkeys([MODEL_FILE, *_file_records(meta)]):
        check_tensor_file(path / name, _file_records(meta).get(name))
    return path


def check_tensor_file(file: Path, record: dict[str, Any] | None) -> None:
    """``file`` exists and has the size and SHA-256 its description recorded. A description without that
    record is refused rather than trusted: micronet always writes it, so it was edited or made by hand."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete, re-save it")
    if not isinstance(record, dict):
        if file.stat().st_size and file.read_bytes()[:4].startswith(_PICKLE_MAGICS):
            raise CheckpointError(_describe_foreign_file(file))
        raise CheckpointError(f"the description beside {file} records no size and SHA-256 for {file.name}, so its "
                              "integrity cannot be checked: re-save it with micronet (which always records them)")
    if file.stat().st_size != record.get("bytes"):
        raise CheckpointError(
            f"{file} has {file.stat().st_size} bytes but {record.get('bytes')} were written: "
            "the file is truncated or was replaced, re-save the checkpoint"
        )
    if file_sha256(file) != record.get("sha256"):
        raise CheckpointError(f"{file} does not match the checksum recorded in its description: the file is corrupted")


def load_tensor_file(file: Path, record: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors after checking its recorded size and SHA-256 (see :func:`check_tensor_file`)."""
    check_tensor_file(file, record)
    try:
        return load_file(str(file))
    except SafetensorError as exc:
        if file.read_bytes()[:4].startswith(_PICKLE_MAGICS):
            raise CheckpointError(_describe_foreign_file(file)) from exc
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc}): re-save the checkpoint") from exc


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a model from a checkpoint directory (or a training run directory); see
    :func:`micronet.compression.restore.load_model`."""
    return load_checkpoint(resolve_checkpoint(path)).build_model()


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint's weights into a model built by the caller."""
    return load_checkpoint(resolve_checkpoint(path)).load_into(model)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a training run directory (then its ``best/``, else ``last/``)."""
    path = resolve_directory(path)
    if (path / META_FILE).exists() or path.is_file():
        return path
    for child in ("best", "last"):
        candidate = resolve_directory(path / child)
        if (candidate / META_FILE).exists():
            return candidate
    return path
