"""The model registry: build a model by name, with an optional (pruned) channel config.

Every model built here carries ``model.arch``, a :class:`ModelArch` holding the name, the number of
classes, the input channels and the resolved channel config. A checkpoint stores ``arch.to_json()``;
``ModelArch.from_json(d).build()`` rebuilds the same (possibly pruned) network.

``build_model`` also takes the user's own network as ``MODULE:CALLABLE`` (see :mod:`micronet.models.external`):
its ``arch`` then has no channel config and records the import in ``source``, so checkpoints rebuild it too;
a network that has an ``arch`` attribute of its own keeps it and gets the record as ``micronet_arch``
(read it with :func:`model_arch`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from micronet.errors import ModelConfigError
from micronet.models.external import ModelImport, build_from_spec, is_model_spec

__all__ = ["ModelArch", "attach_arch", "build_model", "default_cfg", "find_arch", "list_models", "model_arch",
           "register_model"]

# where a model carries its record: ``arch``, or ``micronet_arch`` when the user's network has an ``arch`` of its own
ARCH_ATTRIBUTES = ("arch", "micronet_arch")

Factory = Callable[[int, int, list[int]], nn.Module]


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    default_cfg: tuple[int, ...]


_REGISTRY: dict[str, _Entry] = {}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelArch:
    """What is needed to rebuild a model: registry name, classes, input channels and channel config; for the
    user's own model (``source`` set) the name is its ``MODULE:CALLABLE`` spec and the cfg is empty."""

    name: str
    num_classes: int
    in_channels: int
    cfg: tuple[int, ...]
    source: ModelImport | None = None

    def to_json(self) -> dict:
        """A JSON-ready dict: ``{"name", "num_classes", "in_channels", "cfg": [ints]}``, plus ``"source"`` for the
        user's own model."""
        d = {"name": self.name, "num_classes": self.num_classes, "in_channels": self.in_channels,
             "cfg": list(self.cfg)}
        if self.source is not None:
            d["source"] = self.source.to_json()
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModelArch:
        """Read back :meth:`to_json` output, checking every key and type; raises :class:`ModelConfigError`."""
        if not isinstance(d, Mapping):
            raise ModelConfigError(
                f"model architecture must be a JSON object, not {type(d).__name__}: "
                "pass the dict written by ModelArch.to_json()")
        expected = {"name", "num_classes", "in_channels", "cfg"}
        missing = sorted(expected - set(d))
        extra = sorted(set(d) - expected - {"source"})
        if missing or extra:
            problem = f"missing {missing}" if missing else f"unknown {extra}"
            raise ModelConfigError(
                f"model architecture has {problem} keys: it must have exactly name, num_classes, "
                "in_channels and cfg as written by ModelArch.to_json()")
        name, num_classes, in_channels, cfg = d["name"], d["num_classes"], d["in_channels"], d["cfg"]
        if not isinstance(name, str):
            raise ModelConfigError(f"model architecture name must be a string (got {name!r}): use a name from list_models()")
        for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if not _is_int(value) or value < 1:
                raise ModelConfigError(f"model architecture {key} must be a positive integer (got {value!r}): fix the saved JSON")
        if not isinstance(cfg, (list, tuple)) or not all(_is_int(c) for c in cfg):
            raise ModelConfigError(f"model architecture cfg must be a list of integers (got {cfg!r}): fix the saved JSON")
        source = ModelImport.from_json(d["source"]) if "source" in d else None
        return cls(name, num_classes, in_channels, tuple(cfg), source)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`build_model` that rebuild this architecture."""
        if self.source is not None:
            return {"name": self.source, "num_classes": self.num_classes, "in_channels": self.in_channels, "cfg": None}
        return {"name": self.name, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "cfg": list(self.cfg)}

    def build(self) -> nn.Module:
        """``build_model(**self.kwargs())``: a freshly initialised model of this architecture."""
        return build_model(**self.kwargs())


def register_model(name: str, factory: Factory, default_cfg: Sequence[int] = (), *, overwrite: bool = False) -> None:
    """Add a model to the registry.

    ``factory(num_classes, in_channels, cfg)`` must return an ``nn.Module``; it receives the resolved
    cfg (``default_cfg`` when the caller passes none, otherwise a list of the same length of positive
    ints) and should raise :class:`ModelConfigError` for model-specific violations (divisibility).
    A model without a channel config registers ``default_cfg=()``.
    """
    if not isinstance(name, str) or not name or name != name.strip().lower():
        raise ModelConfigError(f"model name {name!r} is not valid: register a non-empty lower-case name without spaces")
    if name in _REGISTRY and not overwrite:
        raise ModelConfigError(f"model {name!r} is already registered: pick another name or pass overwrite=True")
    if not callable(factory):
        raise ModelConfigError(f"factory for model {name!r} is not callable: pass factory(num_classes, in_channels, cfg)")
    cfg = tuple(default_cfg)
    if not all(_is_int(c) and c > 0 for c in cfg):
        raise ModelConfigError(f"default cfg for model {name!r} must hold positive integers (got {list(cfg)}): fix the registration")
    _REGISTRY[name] = _Entry(factory, cfg)


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> tuple[str, _Entry]:
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        close = difflib.get_close_matches(str(key), list(_REGISTRY), n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelConfigError(f"unknown model {name!r}{hint}: choose one of {', '.join(list_models())}")
    return key, _REGISTRY[key]


def default_cfg(name: str) -> list[int]:
    """The channel config a model gets when ``build_model`` is called without ``cfg``."""
    return list(_entry(name)[1].default_cfg)


def _check_cfg(name: str, cfg: Any, default: tuple[int, ...]) -> list[int]:
    if not isinstance(cfg, (list, tuple)) or not all(_is_int(c) for c in cfg):
        raise ModelConfigError(f"cfg for {name} must be a list of integers (got {cfg!r}): pass channel counts such as {list(default)}")
    if len(cfg) != len(default):
        raise ModelConfigError(
            f"cfg for {name} must have {len(default)} channel counts (got {len(cfg)}): "
            "pass the list saved with the pruned checkpoint, or None for the default")
    bad = [i for i, c in enumerate(cfg) if c < 1]
    if bad:
        raise ModelConfigError(
            f"cfg for {name} has non-positive channel counts at positions {bad} ({[cfg[i] for i in bad]}): "
            "every layer needs at least one channel")
    return list(cfg)


def build_model(name: str | ModelImport, num_classes: int = 10, in_channels: int = 3,
                cfg: Sequence[int] | None = None) -> nn.Module:
    """Build a freshly initialised model and attach ``model.arch`` (a :class:`ModelArch`).

    ``name`` is a registry name or the user's ``MODULE:CALLABLE`` (or a :class:`ModelImport`).
    ``cfg=None`` selects the model's default channel config; otherwise ``cfg`` must have the same
    length as :func:`default_cfg` and satisfy the model's constraints (see each model's docstring).
    Raises :class:`ModelConfigError` for an unknown name or a config that does not fit.
    """
    external = isinstance(name, ModelImport) or is_model_spec(name)
    key = (name.spec if isinstance(name, ModelImport) else name) if external else _entry(name)[0]
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not _is_int(value) or value < 1:
            example = 10 if arg == "num_classes" else 3
            raise ModelConfigError(
                f"{arg} for {key} must be a positive integer (got {value!r}): pass e.g. {arg}={example}")
    if external:
        if cfg:
            raise ModelConfigError(f"cfg applies to registry models only, not to {key}: build your model at the "
                                   "size you want (pruning records its own channel sizes)")
        model, source = build_from_spec(name, num_classes, in_channels)
        attach_arch(model, ModelArch(source.spec, num_classes, in_channels, (), source))
        return model
    entry = _entry(name)[1]
    resolved = list(entry.default_cfg) if cfg is None else _check_cfg(key, cfg, entry.default_cfg)
    model = entry.factory(num_classes, in_channels, list(resolved))
    attach_arch(model, ModelArch(key, num_classes, in_channels, tuple(resolved)))
    return model


def find_arch(model: nn.Module) -> ModelArch | None:
    """The :class:`ModelArch` that :func:`build_model` attached, or None (looks through DataParallel/DDP and
    torch.compile wrappers)."""
    seen = model
    for _ in range(8):
        for attribute in ARCH_ATTRIBUTES:
            arch = getattr(seen, "__dict__", {}).get(attribute)
            if isinstance(arch, ModelArch):
                return arch
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        seen = inner
    return None


def model_arch(model: nn.Module) -> ModelArch:
    """The :class:`ModelArch` that :func:`build_model` attached; raises :class:`ModelConfigError` without one."""
    arch = find_arch(model)
    if arch is None:
        raise ModelConfigError(
            f"{type(model).__name__} has no micronet architecture record: build it with micronet.models.build_model "
            "so that checkpoints can rebuild it")
    return arch


def attach_arch(model: nn.Module, arch: ModelArch) -> None:
    """Record ``arch`` on ``model``: as ``model.arch``, unless the model uses that name itself (a user's network
    may), then as ``model.micronet_arch``, so that nothing of the user's is overwritten."""
    if "micronet_arch" in model.__dict__:
        model.micronet_arch = arch
        return
    try:
        own = model.arch
    except AttributeError:
        own = None
    if own is None or isinstance(own, ModelArch):
        model.arch = arch
    else:
        model.micronet_arch = arch
