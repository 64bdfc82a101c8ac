"""A pickle reader that can rebuild numpy arrays and nothing else.

CIFAR-10's python version is a set of pickles, and ``pickle.load`` on a user-supplied file runs arbitrary code.
This unpickler resolves only the few globals a pickled numpy array needs, so a malicious file fails before any of
its payload can run.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from micronet.errors import DatasetError


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``codecs.encode`` restricted to the latin-1 round trip that Python 3 protocol-2 pickles use for bytes.

    Python 3 writes ``bytes`` under protocol 2 as ``_codecs.encode(text, 'latin1')``; allowing the real function
    would let a pickle pick any codec, so only latin-1 is accepted.
    """
    if not isinstance(obj, str) or encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(obj, "latin-1", errors)


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any] | type]:
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, wherever this numpy version keeps it
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("codecs", "encode"): _latin1_encode,
    }


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DatasetError(f"refusing to unpickle {module}.{name} from {self._source}: not a CIFAR-10 batch.") from None

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError(f"refusing to unpickle a persistent reference from {self._source}: not a CIFAR-10 batch.")


def load_restricted_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` (keys and strings stay bytes), allowing only numpy array reconstruction."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return _ArrayOnlyUnpickler(fh, path).load()
    except DatasetError:
        raise
    except OSError as exc:
        raise DatasetError(f"cannot read {path} ({exc.strerror or exc}): check that it exists and is readable.") from exc
    except Exception as exc:  # a malformed pickle can raise almost anything (EOFError, ValueError, UnpicklingError, ...)
        raise DatasetError(f"{path} is not a readable pickle ({type(exc).__name__}: {exc}): the file is corrupt, re-extract it.") from exc
