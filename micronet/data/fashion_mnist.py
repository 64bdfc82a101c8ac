"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (or any folder with the four IDX files).

It is micronet's default real dataset because it is the only real image set installable offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from micronet.data.dataset import ArrayDataset
from micronet.data.idx import read_idx
from micronet.data.info import DatasetInfo
from micronet.errors import DatasetError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "MICRONET_FASHION_MNIST"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN = (0.2860,)
STD = (0.3530,)
_INSTALL = "install it with `apt-get install -y dataset-fashion-mnist` (as root) or pass --data-root DIR"


def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root`` if given, else $MICRONET_FASHION_MNIST, else the Debian package's folder."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(f"Fashion-MNIST file {stem}.gz (or {stem}) not found in {folder}: {_INSTALL}.")


def _read_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels: "
            "the files come from different sets or are corrupt, reinstall them."
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise DatasetError(f"{labels_path} holds label {int(labels.max())} outside 0..9: the file is corrupt, reinstall it.")
    return images, labels


def load_fashion_mnist(root: str | os.PathLike | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """The official 60,000 training and 10,000 test images as N×1×28×28 uint8."""
    folder = resolve_root(root)
    if not folder.is_dir():
        raise DatasetError(f"Fashion-MNIST not found in {folder}: {_INSTALL}.")
    train_x, train_y = _read_pair(folder, "train")
    test_x, test_y = _read_pair(folder, "t10k")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DatasetError(
            f"Fashion-MNIST in {folder} has train images of {train_x.shape[1:]} but test images of "
            f"{test_x.shape[1:]}: the files are mixed up, reinstall them."
        )
    h, w = train_x.shape[1:]
    info = DatasetInfo("fashion-mnist", len(CLASS_NAMES), 1, (h, w), MEAN, STD, CLASS_NAMES)

    def wrap(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        return ArrayDataset(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype(np.int64)), info)

    return wrap(train_x, train_y), wrap(test_x, test_y)
