"""Training state (optimizer, RNG) split into tensors for safetensors and scalars for JSON.

torch's own ``state_dict`` of an optimizer mixes tensors and Python numbers; pickling it would be the
easy way and is exactly what we refuse to do, so it is flattened here and rebuilt on resume.
"""

from __future__ import annotations

from typing import Any

import torch

_OPT = "optimizer.state"
_RNG_CPU = "rng.cpu"
_RNG_CUDA = "rng.cuda"


def optimizer_state_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (tensors, json) that :func:`optimizer_state_join` turns back into a state_dict."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPT}.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_state_join(tensors: dict[str, torch.Tensor], described: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(_OPT + "."):
            continue
        index, key = name[len(_OPT) + 1 :].split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entry in described.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": described["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    """The global RNG streams training draws from (dropout, random init of new layers)."""
    states = {_RNG_CPU: torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"{_RNG_CUDA}.{i}"] = s
    return states


def restore_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    if _RNG_CPU in tensors:
        torch.set_rng_state(tensors[_RNG_CPU])
    cuda = sorted((k for k in tensors if k.startswith(_RNG_CUDA + ".")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
