"""The torch.fx tracer micronet's graph passes use, and readable trace-failure messages.

:class:`MicronetTracer` treats three kinds of submodules as leaves (recorded as one ``call_module`` node,
never traced into):

* torch's own modules (``torch.nn.*``, ``torch.ao.nn.*``; fx's default rule, which excludes
  ``nn.Sequential`` containers);
* every module whose class is defined inside the ``micronet`` package (``Add``, ``Concat``,
  ``ChannelShuffle``, the registry models' blocks, and the quantized / pruned modules later layers
  define): they are already in the form module-swapping passes expect;
* instances of the types the caller passes in ``leaf_modules``.

The root module is always traced (fx never asks whether the root is a leaf).
"""

from __future__ import annotations

import os
import traceback

import torch
import torch.fx as fx
from torch import nn

__all__ = ["MicronetTracer", "describe_trace_failure", "is_micronet_module"]

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_THIS_DIR = os.path.dirname(os.path.abspath(__file__))


def is_micronet_module(module: nn.Module) -> bool:
    """True when ``module``'s class is defined inside the ``micronet`` package."""
    name = type(module).__module__ or ""
    return name == "micronet" or name.startswith("micronet.")


class MicronetTracer(fx.Tracer):
    """``torch.fx.Tracer`` whose leaves are torch modules, micronet modules and ``leaf_modules`` types."""

    def __init__(self, leaf_modules: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if is_micronet_module(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame outside torch and outside this package: the user's offending line."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if path.startswith(_TORCH_DIR + os.sep) or path.startswith(_THIS_DIR + os.sep):
            continue
        return frame
    return None


def describe_trace_failure(exc: BaseException, tracer: fx.Tracer, root: nn.Module) -> str:
    """One paragraph saying why tracing failed, in which submodule and at which source line.

    The submodule comes from the tracer's module stack (fx pushes a submodule's path before tracing into
    its ``forward`` and pops it only on success, so after a failure the innermost entry is the culprit).
    """
    text = str(exc).strip() or "(no message)"
    parts = [f"{type(exc).__name__}: {text}"]
    stack = list(getattr(tracer, "module_stack", {}).values())
    where: str
    hint: str
    if stack:
        path, mtype = stack[-1]
        mtype_name = getattr(mtype, "__qualname__", str(mtype))
        where = f"in submodule '{path}' ({mtype_name})"
        hint = (f"make it opaque with leaf_modules=({mtype_name},) or remove the Python control flow on "
                "tensor values from its forward")
    else:
        where = f"in the forward of the root module ({type(root).__qualname__})"
        hint = "remove the Python control flow on tensor values (if/while/bool() on a tensor) from it"
    frame = _user_frame(exc)
    if frame is not None:
        line = (frame.line or "").strip()
        where += f" at {os.path.basename(frame.filename)}:{frame.lineno}" + (f": `{line}`" if line else "")
    parts.append(where)
    parts.append(hint)
    return "; ".join(parts)
