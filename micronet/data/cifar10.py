"""CIFAR-10 from a user-supplied folder (python-pickle or binary version).

No package registry ships CIFAR-10, so users point micronet at the folder they extracted. Both official layouts
are read; the pickles only through the restricted reader in :mod:`micronet.data.safe_pickle`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from micronet.data.dataset import ArrayDataset
from micronet.data.info import DatasetInfo
from micronet.data.safe_pickle import load_restricted_pickle
from micronet.errors import DatasetError

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PY_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
PY_TEST = "test_batch"
BIN_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
BIN_TEST = "test_batch.bin"
_PIXELS = 3 * 32 * 32
_HINT = "pass --data-root pointing at the extracted `cifar-10-batches-py` folder (python version from https://www.cs.toronto.edu/~kriz/cifar.html)"


def _missing(folder: Path, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not (folder / n).is_file()]


def _resolve_folder(root: str | os.PathLike | None) -> tuple[Path, str]:
    """The folder holding the batches and its layout ("python" or "binary")."""
    if root is None:
        raise DatasetError(f"CIFAR-10 needs a data folder: {_HINT}.")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10 folder {root} does not exist: {_HINT}.")
    # Accept the folder above the extracted one too (where the tarball was unpacked).
    candidates = [root, root / "cifar-10-batches-py", root / "cifar-10-batches-bin"]
    for folder in candidates:
        if folder.is_dir() and not _missing(folder, PY_TRAIN + (PY_TEST,)):
            return folder, "python"
        if folder.is_dir() and not _missing(folder, BIN_TRAIN + (BIN_TEST,)):
            return folder, "binary"
    py_missing = ", ".join(_missing(root, PY_TRAIN + (PY_TEST,)))
    bin_missing = ", ".join(_missing(root, BIN_TRAIN + (BIN_TEST,)))
    raise DatasetError(
        f"{root} is not a CIFAR-10 folder: the python version is missing {py_missing} and the binary version is missing "
        f"{bin_missing} in {root}; {_HINT}."
    )


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = load_restricted_pickle(path)
    bad = f"{path} is not a CIFAR-10 batch"
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetError(f"{bad} (expected a dict with b'data' and b'labels'): re-extract the python version of CIFAR-10.")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{bad} (b'data' is {got}, expected uint8 N×{_PIXELS}): re-extract the python version of CIFAR-10.")
    if not isinstance(labels, (list, np.ndarray)):
        raise DatasetError(f"{bad} (b'labels' is a {type(labels).__name__}, expected a list of ints): re-extract "
                           f"the python version of CIFAR-10.")
    if isinstance(labels, list) and not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise DatasetError(f"{bad} (b'labels' holds non-integers): re-extract the python version of CIFAR-10.")
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DatasetError(f"{bad} (b'labels' has dtype {labels.dtype} and shape {labels.shape}): re-extract the "
                           f"python version of CIFAR-10.")
    return data, labels.astype(np.int64)


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % (_PIXELS + 1):
        raise DatasetError(
            f"{path} holds {raw.size} bytes, not a whole number of {_PIXELS + 1}-byte CIFAR-10 records: the file "
            f"is truncated, re-extract it."
        )
    records = raw.reshape(-1, _PIXELS + 1)
    return np.ascontiguousarray(records[:, 1:]), records[:, 0].astype(np.int64)


def _checked(path: Path, data: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if data.shape[0] != labels.shape[0]:
        raise DatasetError(f"{path} holds {data.shape[0]} images but {labels.shape[0]} labels: the file is corrupt, re-extract it.")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path} holds labels in {labels.min()}..{labels.max()}, outside 0..9: it is not "
                           f"CIFAR-10 (CIFAR-100?), use a CIFAR-10 folder.")
    return data, labels


def _class_names(folder: Path, layout: str) -> tuple[str, ...]:
    if layout == "python" and (folder / "batches.meta").is_file():
        meta = load_restricted_pickle(folder / "batches.meta")
        names = meta.get(b"label_names") if isinstance(meta, dict) else None
        if names is not None:
            if not (isinstance(names, list) and len(names) == 10 and all(isinstance(n, (bytes, str)) for n in names)):
                raise DatasetError(f"{folder / 'batches.meta'} has no list of ten b'label_names': the file is "
                                   f"corrupt, re-extract it or delete it.")
            return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)
    if layout == "binary" and (folder / "batches.meta.txt").is_file():
        names = [line.strip() for line in (folder / "batches.meta.txt").read_text(errors="replace").splitlines() if line.strip()]
        if len(names) == 10:
            return tuple(names)
    return CLASS_NAMES


def load_cifar10(root: str | os.PathLike | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """The 50,000 training and 10,000 test images as N×3×32×32 uint8 (any N per batch file is accepted)."""
    folder, layout = _resolve_folder(root)
    read = _read_python_batch if layout == "python" else _read_binary_batch
    train_files, test_file = (PY_TRAIN, PY_TEST) if layout == "python" else (BIN_TRAIN, BIN_TEST)
    parts = [_checked(folder / f, *read(folder / f)) for f in train_files]
    test_x, test_y = _checked(folder / test_file, *read(folder / test_file))
    info = DatasetInfo("cifar10", 10, 3, (32, 32), MEAN, STD, _class_names(folder, layout))

    def wrap(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        # Each row is 1024 red, 1024 green, 1024 blue values of row-major 32×32 planes, i.e. already C×H×W.
        return ArrayDataset(torch.from_numpy(np.require(x, requirements=["C", "W"]).reshape(-1, 3, 32, 32)), torch.from_numpy(y), info)

    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    return wrap(train_x, train_y), wrap(test_x, test_y)
