"""Read a user's weights file safely and load it into a model with a clear account of what does not fit.

A weights file is a plain PyTorch state dict: ``.safetensors``, or ``.pt``/``.pth`` read with
``torch.load(weights_only=True)``, which refuses (without running it) any pickle payload beyond tensors and
plain containers. Training scripts often save ``{"state_dict": ...}`` or ``{"model_state_dict": ...}``;
those wrappers are unwrapped. Keys saved from a ``DistributedDataParallel`` (``module.``) or
``torch.compile`` (``_orig_mod.``) wrapper get that prefix removed when that is what makes them match.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from micronet.errors import CheckpointError, MicronetError

__all__ = ["WEIGHT_SUFFIXES", "describe_mismatch", "load_state_dict_file", "load_weights_file"]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
_WRAPPER_KEYS = ("state_dict", "model_state_dict")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` / ``.pt`` / ``.pth`` state dict, unwrapped; never runs pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist: pass the file saved with model.state_dict()")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"weights file {path} has suffix {path.suffix or '(none)'!r}: pass a state dict saved as "
                              ".safetensors, .pt or .pth")
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded: object = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"weights file {path} is not a readable safetensors file ({exc}): re-save it with "
                                  "safetensors.torch.save_file(model.state_dict(), path)") from exc
    else:
        loaded = _torch_load_tensors_only(path)
    return _tensor_dict(_unwrap(loaded), path)


def _torch_load_tensors_only(path: Path) -> object:
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"weights file {path} holds Python objects beyond tensors, which micronet refuses to "
                              f"unpickle ({first}): save only the tensors, torch.save(model.state_dict(), path)") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"weights file {path} is not a readable torch.save file ({type(exc).__name__}): "
                              "save it with torch.save(model.state_dict(), path)") from exc


def _unwrap(loaded: object) -> object:
    for _ in range(2):  # e.g. {"model_state_dict": {"state_dict": ...}} written by nested trainers
        if isinstance(loaded, Mapping):
            inner = next((loaded[k] for k in _WRAPPER_KEYS if isinstance(loaded.get(k), Mapping)), None)
            if inner is not None:
                loaded = inner
    return loaded


def _tensor_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"weights file {path} holds a {type(loaded).__name__}, not a state dict: save "
                              "model.state_dict()")
    odd = [str(k) for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"weights file {path} holds entries that are not tensors ({_preview(odd)}): save "
                              "model.state_dict(), or a dict whose 'state_dict' entry is one")
    return dict(loaded)


def _strip_wrapper_prefix(tensors: dict[str, torch.Tensor], expected: Mapping[str, object]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors) and not any(k.startswith(prefix) for k in expected):
            return {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _preview(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def describe_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    """``None`` when ``given`` has exactly ``expected``'s names and shapes; otherwise one clause per problem,
    e.g. ``missing 2 keys (fc.weight, fc.bias); shape differs for conv.weight ([8, 1, 3, 3] here, [4, 1, 3, 3]
    in the model)``."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key{'s' * (len(missing) > 1)} ({_preview(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key{'s' * (len(unexpected) > 1)} ({_preview(unexpected)})")
    if wrong:
        first = wrong[0]
        parts.append(f"shape differs for {len(wrong)} key{'s' * (len(wrong) > 1)} ({_preview(wrong)}; {first} is "
                     f"{list(given[first].shape)} here, {list(expected[first].shape)} in the model)")
    return "; ".join(parts) or None


def load_weights_file(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a user's state dict file into ``model`` after checking every name and shape; returns the model."""
    expected = model.state_dict()
    tensors = _strip_wrapper_prefix(load_state_dict_file(path), expected)
    problem = describe_mismatch(expected, tensors)
    if problem:
        raise CheckpointError(f"weights file {path} does not fit {type(model).__name__} ({problem}): pass the "
                              "weights saved from this model")
    try:
        model.load_state_dict(tensors)
    except (RuntimeError, MicronetError) as exc:
        raise CheckpointError(f"weights file {path} does not fit {type(model).__name__}: {exc}") from exc
    return model
