"""A user's own images in ``root/train/<class>/*.png`` and ``root/test/<class>/...`` (or ``val/``).

Decoded once into memory with Pillow, so training speed does not depend on the disk or on worker processes.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from micronet.data.dataset import ArrayDataset, channel_stats
from micronet.data.info import DatasetInfo
from micronet.errors import DatasetError

EXTENSIONS = (".png", ".jpg", ".jpeg")
_LAYOUT = "root/train/<class>/*.png|jpg|jpeg and root/test/<class>/... (or val/)"


def _class_folders(split_dir: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files, for every non-hidden subfolder."""
    classes = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{split_dir} has no class subfolders: put each class's images in {split_dir}/<class name>/.")
    out: dict[str, list[Path]] = {}
    for folder in classes:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if not files:
            raise DatasetError(f"class folder {folder} holds no .png/.jpg/.jpeg images: add images or remove the folder.")
        out[folder.name] = files
    return out


def _parse_size(image_size: object) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)  # type: ignore[arg-type]
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise DatasetError(f"imagefolder option image_size={image_size!r} is invalid: give two positive ints (H, W).")
    return size  # type: ignore[return-value]


def _probe(path: Path) -> tuple[str, tuple[int, int]]:
    """Mode and (H, W) from the header, without decoding pixels."""
    try:
        with Image.open(path) as im:
            return im.mode, (im.height, im.width)
    except Exception as exc:  # Pillow raises many types for bad files
        raise DatasetError(f"cannot decode image {path} ({type(exc).__name__}): replace or delete the file.") from exc


def _decode(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. palette-with-transparency notices; the conversion is what we want
            with Image.open(path) as im:
                im = im.convert(mode)
                if size is not None and (im.height, im.width) != size:
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                return np.asarray(im, dtype=np.uint8)
    except Exception as exc:
        raise DatasetError(f"cannot decode image {path} ({type(exc).__name__}): replace or delete the file.") from exc


def load_imagefolder(root: str | os.PathLike | None = None, image_size: object = None) -> tuple[ArrayDataset, ArrayDataset]:
    """Train and test sets from a folder tree; mean/std are computed from the train images."""
    if root is None:
        raise DatasetError(f"imagefolder needs a data folder: pass --data-root DIR laid out as {_LAYOUT}.")
    root = Path(root)
    size = _parse_size(image_size)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"imagefolder root {root} has no train/ folder: lay it out as {_LAYOUT}.")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if test_dir is None:
        raise DatasetError(f"imagefolder root {root} has neither a test/ nor a val/ folder: lay it out as {_LAYOUT}.")
    train_classes, test_classes = _class_folders(train_dir), _class_folders(test_dir)
    if set(train_classes) != set(test_classes):
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DatasetError(
            f"the class folders differ between {train_dir} and {test_dir} (only in train: {only_train or 'none'}; "
            f"only in {test_dir.name}: {only_test or 'none'}): give both splits the same classes."
        )
    class_names = tuple(sorted(train_classes))
    splits = [[(p, i) for i, c in enumerate(class_names) for p in classes[c]] for classes in (train_classes, test_classes)]

    probes = {p: _probe(p) for split in splits for p, _ in split}
    mode = "L" if all(m == "L" for m, _ in probes.values()) else "RGB"
    if size is None:
        common, _ = Counter(s for _, s in probes.values()).most_common(1)[0]
        for path, (_, s) in probes.items():
            if s != common:
                raise DatasetError(
                    f"image {path} is {s[0]}×{s[1]} but most images are {common[0]}×{common[1]}: "
                    "resize it or pass the option image_size=(H, W) to resize all images."
                )
        size = common

    channels = 1 if mode == "L" else 3

    def build(split: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        arrays = [_decode(p, mode, size) for p, _ in split]
        x = np.stack(arrays).reshape(len(arrays), size[0], size[1], channels).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor([c for _, c in split], dtype=torch.int64)

    train_x, train_y = build(splits[0])
    test_x, test_y = build(splits[1])
    mean, std = channel_stats(train_x)
    info = DatasetInfo("imagefolder", len(class_names), channels, size, mean, std, class_names)
    return ArrayDataset(train_x, train_y, info), ArrayDataset(test_x, test_y, info)
