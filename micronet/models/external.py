"""The user's own network, named ``MODULE:CALLABLE``, built the same way every time.

``MODULE`` is an importable module (``mypkg.nets``) or the path of a ``.py`` file (``nets/mine.py``);
``CALLABLE`` (dots allowed: ``Factory.small``) returns an ``nn.Module`` and is called with ``num_classes=`` and
``in_channels=`` when its signature names them. A ``.py`` file is imported under a stable module name derived
from its absolute path (so two files called ``model.py`` never collide), with its folder on ``sys.path`` while it
runs so that it can import its neighbours.

A :class:`ModelImport` records the import (a file as its absolute path plus its SHA-256) so a checkpoint can
rebuild the model. A file that changed since is a warning, not an error: the weights are still checked name by
name and shape by shape, so a change that alters the structure fails loudly anyway, while an edit to a comment
or a docstring must not make every saved checkpoint unreadable.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from micronet.errors import ModelConfigError

__all__ = ["ModelImport", "build_from_spec", "call_builder", "is_model_spec", "parse_model_spec", "resolve_callable"]


def is_model_spec(name: object) -> bool:
    """Whether ``name`` is a ``MODULE:CALLABLE`` spec rather than a registry name."""
    return isinstance(name, str) and ":" in name


def _is_file_module(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class ModelImport:
    """How to import the callable that builds a user's model: ``module`` is an importable name or the absolute
    path of a ``.py`` file, ``callable`` an attribute path in it, ``sha256`` the file's digest (files only)."""

    module: str
    callable: str
    sha256: str | None = None

    @property
    def spec(self) -> str:
        """``MODULE:CALLABLE`` as recorded (a file module is its absolute path)."""
        return f"{self.module}:{self.callable}"

    @property
    def is_file(self) -> bool:
        return _is_file_module(self.module)

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "callable": self.callable, "sha256": self.sha256}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModelImport:
        """Read back :meth:`to_json`; raises :class:`ModelConfigError` on a malformed entry."""
        if not isinstance(d, Mapping) or set(d) != {"module", "callable", "sha256"} or not all(
                isinstance(d[k], str) and d[k] for k in ("module", "callable")) or not isinstance(d["sha256"], (str, type(None))):
            raise ModelConfigError(f"model source {d!r} is not valid: it must be {{'module', 'callable', 'sha256'}} as "
                                   "written by ModelImport.to_json()")
        return cls(d["module"], d["callable"], d["sha256"])

    def resolve(self) -> Callable[..., Any]:
        """Import the module and return the callable; warns when a file changed since it was recorded."""
        if self.is_file:
            path = Path(self.module)
            module = _import_file(path, self.spec)
            current = _file_sha256(path)
            if self.sha256 is not None and current != self.sha256:
                warnings.warn(f"{path} changed since the model was saved (SHA-256 {self.sha256[:12]} then, "
                              f"{current[:12]} now): the model is rebuilt from the file as it is now", stacklevel=3)
        else:
            module = _import_module(self.module, self.spec)
        target: Any = module
        for part in self.callable.split("."):
            if not hasattr(target, part):
                raise ModelConfigError(f"cannot build model {self.spec}: {self.module} has no attribute "
                                       f"{self.callable!r}: name a function or class defined there")
            target = getattr(target, part)
        if not callable(target):
            raise ModelConfigError(f"cannot build model {self.spec}: {self.callable} is a {type(target).__name__}, "
                                   "not a function or class")
        return target

    def current(self) -> ModelImport:
        """This source with the file's digest as it is now (what a model built now was built from)."""
        return replace(self, sha256=_file_sha256(Path(self.module))) if self.is_file else self

    def build(self, num_classes: int, in_channels: int) -> nn.Module:
        """Import and call the builder (see :func:`call_builder`)."""
        return call_builder(self.resolve(), self.spec, num_classes=num_classes, in_channels=in_channels)


def parse_model_spec(spec: str) -> ModelImport:
    """``MODULE:CALLABLE`` → :class:`ModelImport` (a file module made absolute and hashed); nothing imported yet."""
    if not is_model_spec(spec):
        raise ModelConfigError(f"model {spec!r} is not MODULE:CALLABLE: pass e.g. my_nets.py:build or mypkg.nets:Net")
    module, _, name = spec.rpartition(":")
    module, name = module.strip(), name.strip()
    if not module or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
        raise ModelConfigError(f"model {spec!r} is not MODULE:CALLABLE: pass e.g. my_nets.py:build or mypkg.nets:Net")
    if not _is_file_module(module):
        return ModelImport(module, name)
    path = Path(module).expanduser().resolve()
    if not path.is_file():
        raise ModelConfigError(f"cannot build model {spec}: {path} does not exist: pass the path of the .py file "
                               "that defines the model")
    return ModelImport(str(path), name, _file_sha256(path))


def _module_name(path: Path) -> str:
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return f"_micronet_user_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise ModelConfigError(f"cannot build model {spec}: {path} does not exist: restore the file or pass the "
                               "model's new location")
    name, digest = _module_name(path), _file_sha256(path)
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__micronet_sha256__", None) == digest:
        return loaded
    import_spec = importlib.util.spec_from_file_location(name, path)
    if import_spec is None or import_spec.loader is None:
        raise ModelConfigError(f"cannot build model {spec}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(import_spec)
    module.__micronet_sha256__ = digest
    sys.modules[name] = module  # dataclasses, torch.fx and deepcopy look classes up by module name
    sys.path.insert(0, str(path.parent))
    try:
        import_spec.loader.exec_module(module)
    except Exception as exc:  # the user's code may raise anything: report it in one line
        sys.modules.pop(name, None)
        raise ModelConfigError(f"cannot build model {spec}: importing {path} raised {_one_line(exc)}") from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_module(module: str, spec: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ModuleNotFoundError, or whatever the module raises on import
        raise ModelConfigError(f"cannot build model {spec}: importing {module} raised {_one_line(exc)}: make it "
                               "importable (install it or add its folder to PYTHONPATH) or pass the .py file's path") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def resolve_callable(spec: str) -> Callable[..., Any]:
    """Import ``MODULE:CALLABLE`` and return the callable; raises :class:`ModelConfigError` in one line."""
    return parse_model_spec(spec).resolve()


def call_builder(builder: Callable[..., Any], spec: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """Call ``builder`` with ``num_classes=`` / ``in_channels=`` where its signature names them (a ``**kwargs``
    catch-all does not count: it may forward them to code that refuses them) and check it returns a module."""
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a builtin without a signature: call it bare
        parameters = {}
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels))
              if k in parameters and parameters[k].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                            inspect.Parameter.KEYWORD_ONLY)}
    call = f"{spec}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    try:
        model = builder(**kwargs)
    except Exception as exc:  # the user's code: report it in one line
        raise ModelConfigError(f"cannot build model: {call} raised {_one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelConfigError(f"cannot build model: {call} returned a {type(model).__name__}, not a torch.nn.Module: "
                               "name a function or class that returns the network")
    return model


def build_from_spec(spec: str | ModelImport, num_classes: int, in_channels: int) -> tuple[nn.Module, ModelImport]:
    """Build the user's model; returns it and the source it was built from (the file's digest as of now)."""
    source = spec if isinstance(spec, ModelImport) else parse_model_spec(spec)
    model = source.build(num_classes, in_channels)
    return model, source.current()
