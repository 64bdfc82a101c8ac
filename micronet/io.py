"""Atomic file and directory writes.

A reader (or a resumed run after ``kill -9``) must never see a half-written artifact: files are
written under a temporary name in the same folder, flushed to disk and renamed into place.

The temporary names carry the writer's process id (``.<name>.<pid>.<random>.tmp`` and ``.staging``), so
the next write to the same place removes the leftovers of a killed writer, and only those: never the
temporary file of a writer that is still running, never a file micronet did not name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from micronet.outputs import LEFTOVER_PATTERN as _LEFTOVER
from micronet.outputs import STEP_RECORD, OutputKind, check_replaceable, is_leftover_name

__all__ = ["atomic_directory", "atomic_write", "atomic_write_text", "is_leftover_name", "previous_version",
           "read_description", "remove_leftovers", "resolve_directory"]


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and staging folders that killed writers of ``path`` left beside it."""
    path = Path(path)
    pattern = re.compile(_LEFTOVER.format(name=re.escape(path.name)))
    removed = []
    with contextlib.suppress(OSError):
        for sibling in path.parent.iterdir():
            match = pattern.fullmatch(sibling.name)
            if match is None or (match["pid"] is not None and _alive(int(match["pid"]))):
                continue
            with contextlib.suppress(OSError):
                if sibling.is_dir() and not sibling.is_symlink():
                    shutil.rmtree(sibling)
                else:
                    sibling.unlink()
                removed.append(sibling)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path`` only once it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the permissions open() would
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def previous_version(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_directory` parks the old directory while swapping in the new one."""
    path = Path(path)
    return path.with_name(path.name + ".previous")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, kind: OutputKind) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``path`` as a whole.

    An existing ``path`` is replaced only when micronet wrote it as the same ``kind`` of output
    (:func:`micronet.outputs.check_replaceable`): a run, or a folder with the user's files, is refused.
    POSIX cannot rename over a non-empty directory, so the swap is two renames: the old directory
    moves to ``<path>.previous``, the staging one moves to ``<path>``, then the old one is deleted.
    A crash between the two renames leaves ``<path>.previous`` intact, and readers fall back to it
    (see :func:`resolve_directory`).
    """
    path = Path(path)
    check_replaceable(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".staging", dir=path.parent))
    try:
        yield staging
        if (path / STEP_RECORD).is_file():  # a pipeline's record of this folder outlives the swap
            shutil.copy2(path / STEP_RECORD, staging / STEP_RECORD)
        for child in staging.iterdir():
            with open(child, "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(staging)
        old = previous_version(path)
        if path.exists():
            if old.exists():  # stale leftover; ``path`` is the valid copy
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(staging, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def resolve_directory(path: str | os.PathLike) -> Path:
    """Return ``path``, or the parked previous version when a swap was interrupted."""
    path = Path(path)
    if not path.exists() and previous_version(path).is_dir():
        return previous_version(path)
    return path


def read_description(meta_path: Path, *, fmt: str, version: int, what: str) -> dict:
    """Parse a micronet JSON description (``micronet.json``, ``packed.json``) and check its format and
    version; ``what`` names the artifact in the error (``checkpoint``, ``packed artifact``)."""
    import json

    from micronet.errors import CheckpointError

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON ({exc}): the {what} is corrupted") from exc
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CheckpointError(f"{meta_path} is not a micronet {what} description (no format '{fmt}')")
    if meta.get("format_version", 0) > version:
        raise CheckpointError(f"{meta_path.parent} was written by a newer micronet ({what} format "
                              f"{meta['format_version']}): upgrade micronet to read it")
    return meta
