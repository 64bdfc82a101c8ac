"""Builds micronet's small C++ extensions on first use, once per source version.

``torch.utils.cpp_extension`` compiles the source with ninja into torch's extension folder; the name
carries a digest of the source and the compiler flags, so an edited source builds anew and an unchanged one loads from the cache.
Where no compiler works the caller gets ``None`` and one warning, and runs its pure-torch path, which
gives the same results.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

__all__ = ["NativeKernelWarning", "load_extension"]


class NativeKernelWarning(UserWarning):
    """A C++ extension could not be built or loaded: its pure-torch twin runs instead."""


def load_extension(stem: str, source: Path, warning: type[Warning], fallback: str, *,
                   extra_cflags: tuple[str, ...] = ()) -> Any | None:
    """The compiled module of ``source`` (named ``micronet_<stem>_<digest>``), or ``None`` after one
    ``warning`` that names the failure and ``fallback`` (what runs instead)."""
    flags = ["-O3", "-fopenmp", *extra_cflags]
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]  # a flag change rebuilds
    try:
        from torch.utils.cpp_extension import load

        return load(name=f"micronet_{stem}_{digest}", sources=[str(source)],
                    extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: use the pure-torch path
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        warnings.warn(f"{stem.replace('_', ' ')}: the C++ kernels could not be built ({type(exc).__name__}: "
                      f"{reason}); running {fallback}: install g++ and ninja", warning, stacklevel=3)
        return None
