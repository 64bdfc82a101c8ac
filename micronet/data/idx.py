"""Reader for the IDX format of (Fashion-)MNIST, validating every header field.

A truncated download or a wrong file must fail with the file's name, not as a reshape error deep inside numpy.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from micronet.errors import DatasetError

_UINT8 = 0x08


def read_idx(path: str | Path, expected_ndim: int | None = None) -> np.ndarray:
    """Read a uint8 IDX file (gzip-compressed if the name ends in .gz) into a writable numpy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read IDX file {path} ({exc.strerror or exc}): check that it exists and is readable.") from exc
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"IDX file {path} is not a valid gzip file ({exc}): the download is corrupt, "
                               f"reinstall or re-download it.") from exc
    return parse_idx(raw, path, expected_ndim)


def parse_idx(raw: bytes, path: str | Path, expected_ndim: int | None = None) -> np.ndarray:
    """Parse IDX bytes; ``path`` is only used in error messages."""
    fix = "the file is corrupt or not an IDX file, reinstall or re-download it"
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"IDX file {path} has a bad magic number (expected two zero bytes first): {fix}.")
    if raw[2] != _UINT8:
        raise DatasetError(f"IDX file {path} has data type 0x{raw[2]:02x} but only unsigned bytes (0x08) are supported: {fix}.")
    ndim = raw[3]
    if ndim < 1 or (expected_ndim is not None and ndim != expected_ndim):
        want = expected_ndim if expected_ndim is not None else ">= 1"
        raise DatasetError(f"IDX file {path} has {ndim} dimensions but {want} were expected: {fix}.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"IDX file {path} is truncated inside its header: {fix}.")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)
    if len(raw) - header != expected:
        raise DatasetError(
            f"IDX file {path} holds {len(raw) - header} data bytes but its header {dims} needs {expected}: {fix}."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzip if the name ends in .gz); used by tests and for exporting subsets."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, _UINT8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
