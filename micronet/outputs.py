"""Output paths: what a command may write over, checked before it does any work.

Every command that writes (a run, a checkpoint, a packed artifact, an ONNX file, a report) first claims its
output path with :func:`claim_output`. The rule is the same everywhere:

* a path that does not exist, or an empty folder, is written;
* a path that holds what micronet wrote as this same kind of output (a checkpoint over a checkpoint, a run
  over a run) is replaced only with ``--overwrite``, and then only micronet's own files in it are replaced;
* anything else (a folder with other files, a run where a checkpoint is wanted, a file where a folder is
  wanted) is refused, with or without ``--overwrite``.

A kind of output is recognised by its contents (``micronet.json`` of a checkpoint, ``packed.json`` of a packed
artifact, the ``best/``, ``last/`` and ``log.jsonl`` of a run), so outputs written by any micronet version count.
The path is also checked for writability here, so a read-only or misspelled ``--out`` fails in one line before
an epoch of training is spent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micronet.errors import OutputError

STEP_RECORD = "pipeline_step.json"
MEASURE_RECORD = "measure.json"
# The pipeline's records inside a step folder: they describe the folder's contents, so a folder that holds
# nothing else counts as empty.
BOOKKEEPING = frozenset({STEP_RECORD, MEASURE_RECORD})


@dataclass(frozen=True)
class OutputKind:
    """What a command writes at its output path, and how to recognise one that micronet wrote.

    ``entries``: for a folder, the names micronet writes inside it. ``recognise``: True when an existing
    path is micronet's output of this kind. ``clear_on_overwrite``: the entries are written one by one (a
    run's ``best/``, ``last/``, ``log.jsonl``), so an overwritten output is emptied of them first and no
    stale file of the old output survives; a kind written as a whole (a checkpoint) is swapped atomically.
    """

    name: str
    recognise: Callable[[Path], bool]
    entries: frozenset[str] = frozenset()
    directory: bool = True
    clear_on_overwrite: bool = False


def read_json_dict(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def described_as(meta_file: str, fmt: str) -> Callable[[Path], bool]:
    """A ``recognise`` for folders described by a micronet JSON file whose ``format`` is ``fmt``."""
    return lambda path: (read_json_dict(path / meta_file) or {}).get("format") == fmt


def _preview(names: Iterable[str], limit: int = 3) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# The temporary names of micronet's atomic writes (:mod:`micronet.io`): ``.<name>.<pid>.<random>.tmp`` / ``.staging``.
LEFTOVER_PATTERN = r"\.{name}\.(?:(?P<pid>\d+)\.)?[a-z0-9_]{{8}}\.(?:tmp|staging)"


def is_leftover_name(name: str, of: str) -> bool:
    """``name`` is a temporary file or staging folder of a write of ``of`` (or the parked old version)."""
    return name == f"{of}.previous" or re.fullmatch(LEFTOVER_PATTERN.format(name=re.escape(of)), name) is not None


def _is_leftover_of(name: str, entries: Iterable[str]) -> bool:
    """An interrupted atomic write of one of ``entries`` (see :mod:`micronet.io`)."""
    return any(is_leftover_name(name, entry) for entry in entries)


def foreign_entries(folder: Path, allowed: Iterable[str]) -> list[str]:
    """Names in ``folder`` that are neither ``allowed``, the pipeline's records, nor leftovers of those."""
    allowed = set(allowed) | BOOKKEEPING
    return sorted(child.name for child in folder.iterdir()
                  if child.name not in allowed and not _is_leftover_of(child.name, allowed))


def holds_nothing(folder: Path, entries: Iterable[str] = ()) -> bool:
    """An empty folder, or one with only the pipeline's records and leftovers of interrupted writes of
    ``entries`` or of those records."""
    names = set(entries) | BOOKKEEPING
    return all(child.name in BOOKKEEPING or _is_leftover_of(child.name, names) for child in folder.iterdir())


def _a(name: str) -> str:
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def _named(flag: str | None, path: Path) -> str:
    return f"{flag} {path}" if flag else str(path)


def check_replaceable(path: str | os.PathLike, kind: OutputKind, *, flag: str | None = None) -> None:
    """Refuse to write ``kind`` over an existing ``path`` that micronet did not write as ``kind``.

    The last line of defence below every command: ``save_checkpoint`` and ``save_packed`` call it before
    swapping a folder into place, so even a library caller never deletes a run or a user's folder.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if kind.directory and not path.is_dir():
        raise OutputError(f"{_named(flag, path)} is a file, not a folder: choose another {flag or 'path'}")
    if not kind.directory:
        if path.is_dir():
            raise OutputError(f"{_named(flag, path)} is a folder, not a file: pass a file path")
        if not kind.recognise(path):
            raise OutputError(f"{_named(flag, path)} already exists and is not {_a(kind.name)} micronet wrote: "
                              f"choose another {flag or 'path'} (only {_a(kind.name)} micronet wrote is replaced, "
                              "with --overwrite; nothing else ever is)")
        return
    if holds_nothing(path, kind.entries):
        return
    foreign = foreign_entries(path, kind.entries)
    if foreign or not kind.recognise(path):
        what = _preview(foreign or (child.name for child in path.iterdir()))
        raise OutputError(f"{_named(flag, path)} already exists and holds {what}, which are not the files of "
                          f"{_a(kind.name)}: choose another {flag or 'path'} (only {_a(kind.name)} micronet wrote is "
                          "replaced, with --overwrite; nothing else ever is)")


def check_writable(path: str | os.PathLike, *, flag: str | None = None) -> None:
    """Refuse a ``path`` that cannot be created or written: a file among its parents, no permission, a
    read-only file system. Tried by creating (and removing) a file where the output will be written."""
    path = Path(path)
    ancestor = path if path.is_dir() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{_named(flag, path)} cannot be created: {ancestor} is a file, not a folder")
    probe_in = [ancestor]
    if path.is_dir() and path.parent.is_dir():  # a folder swapped into place is staged beside it
        probe_in.append(path.parent)
    for folder in probe_in:
        try:
            with tempfile.TemporaryFile(prefix=".micronet-probe.", dir=folder):
                pass
        except OSError as exc:
            raise OutputError(f"{_named(flag, path)} cannot be written ({exc.strerror or exc} in {folder}): "
                              "choose a folder you can write to") from None


@dataclass
class Output:
    """A claimed output path (see :func:`claim_output`)."""

    path: Path
    kind: OutputKind
    replacing: bool = False

    def prepare(self) -> Path:
        """Just before the first write: when replacing an output written one entry at a time (a run), remove
        micronet's entries of the old one (and only those), so no stale file of it survives."""
        if self.replacing and self.kind.clear_on_overwrite and self.path.is_dir():
            for child in self.path.iterdir():
                if child.name in self.kind.entries or _is_leftover_of(child.name, self.kind.entries):
                    remove_path(child)
        return self.path


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def claim_output(path: str | os.PathLike, kind: OutputKind, *, overwrite: bool = False,
                 flag: str | None = "--out") -> Output:
    """Check, before any work, that ``kind`` may be written at ``path``; raises :class:`OutputError` in one
    line naming the path and what allows it. See the module docstring for the rule."""
    path = Path(path)
    check_replaceable(path, kind, flag=flag)
    exists = path.exists() and not (kind.directory and path.is_dir() and holds_nothing(path, kind.entries))
    if exists and not overwrite:
        raise OutputError(f"{_named(flag, path)} already holds {_a(kind.name)}: pass --overwrite to replace it, "
                          f"or choose another {flag or 'path'}")
    check_writable(path, flag=flag)
    return Output(path, kind, replacing=exists)


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    with contextlib.suppress(OSError):
        return Path(a).resolve() == Path(b).resolve()
    return False
