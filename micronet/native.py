"""Builds micronet's small C++ extensions on first use, once per source version.

``torch.utils.cpp_extension`` compiles the source with ninja into torch's extension folder; the name
carries a digest of the source and the compiler flags, so an edited source builds anew and an unchanged one loads from the cache.
Where no compiler works the caller gets ``None`` and one warning, and runs its pure-torch path, which
gives the same results.

torch guards a build with a ``lock`` file in the build folder and waits, without end, for it to go away;
a process killed mid-build leaves it behind, and every later run would hang at import. So each build runs
under an OS lock of micronet's own (``flock``, released by the kernel when its holder dies): whoever holds
it knows no micronet process is building, and removes a ``lock`` file left by a killed one.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator
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
    name = f"micronet_{stem}_{digest}"
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        build_directory = Path(_get_build_directory(name, verbose=False))
        with _building(build_directory):
            return load(name=name, sources=[str(source)], build_directory=str(build_directory),
                        extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: use the pure-torch path
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        warnings.warn(f"{stem.replace('_', ' ')}: the C++ kernels could not be built ({type(exc).__name__}: "
                      f"{reason}); running {fallback}: install g++ and ninja", warning, stacklevel=3)
        return None


@contextlib.contextmanager
def _building(build_directory: Path) -> Iterator[None]:
    """Hold micronet's build lock for ``build_directory``; remove torch's ``lock`` file if one was left there
    by a build that died (no other micronet process can be building while this lock is held)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock alone
        yield
        return
    build_directory.mkdir(parents=True, exist_ok=True)
    with open(build_directory / "micronet.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
