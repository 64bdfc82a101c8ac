"""Dataset names -> loader functions, and :func:`load_dataset`, which adds subsets and the train/val split.

Loaders only read the official train and test sets; the seeded subset and validation logic lives here once,
so every dataset gets the same split semantics.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable

from micronet.data.cifar10 import load_cifar10
from micronet.data.dataset import ArrayDataset, DatasetSplits, balanced_subset, split_train_val
from micronet.data.fashion_mnist import load_fashion_mnist
from micronet.data.imagefolder import load_imagefolder
from micronet.data.synthetic import load_synthetic
from micronet.errors import ConfigError, DatasetError

LoaderFn = Callable[..., tuple[ArrayDataset, ArrayDataset]]
_REGISTRY: dict[str, LoaderFn] = {}


def register_dataset(name: str, loader_fn: LoaderFn) -> None:
    """Make ``loader_fn(root, **options) -> (train, test)`` loadable as ``name`` (replacing any earlier one)."""
    if not name or not callable(loader_fn):
        raise ValueError("register_dataset needs a non-empty name and a callable loader")
    _REGISTRY[name] = loader_fn


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_REGISTRY)


def _check_options(name: str, fn: LoaderFn, options: dict[str, Any]) -> None:
    """Turn an unknown option into a one-line ConfigError instead of a TypeError from deep inside."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in list(params)[1:] if params[p].kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise ConfigError(f"dataset {name!r} does not take option(s) {', '.join(unknown)}: it takes {takes}.")


def _check_classes(name: str, train: ArrayDataset, root: str | os.PathLike | None) -> None:
    """Refuse a dataset a classifier cannot learn anything from: with one class every prediction is right."""
    present = int((train.class_counts() > 0).sum())
    if present >= 2:
        return
    where = f" in {root}" if root is not None else ""
    if train.info.num_classes < 2:
        raise DatasetError(f"dataset {name!r}{where} has {train.info.num_classes} class ({', '.join(train.info.class_names)}): "
                           "a classifier needs at least 2 classes (imagefolder: one subfolder per class under train/ and test/).")
    raise DatasetError(f"the training set of dataset {name!r}{where} holds images of {present} of its {train.info.num_classes} "
                       "classes: a classifier needs images of at least 2 classes.")


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    **options: Any,
) -> DatasetSplits:
    """Load ``name`` and split its official training set into train/val; test is the official test set.

    ``train_subset``/``test_subset`` keep a seeded, class-balanced subset; the train subset is taken before the
    val split, so val comes from it. Everything random depends only on ``seed``.
    """
    if name not in _REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(list_datasets())}.")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction {val_fraction} is invalid: use a value in [0, 1).")
    for label, value in (("train_subset", train_subset), ("test_subset", test_subset)):
        if value is not None and value < 1:
            raise ConfigError(f"{label} {value} is invalid: use a positive sample count or leave it unset.")
    fn = _REGISTRY[name]
    _check_options(name, fn, options)
    train, test = fn(root, **options)
    if train.info != test.info:
        raise DatasetError(f"dataset {name!r} returned train and test sets with different info: the loader must share one DatasetInfo.")
    _check_classes(name, train, root)
    if train_subset is not None:
        train = balanced_subset(train, train_subset, seed, "train-subset")
    if test_subset is not None:
        test = balanced_subset(test, test_subset, seed, "test-subset")
    train, val = split_train_val(train, val_fraction, seed)
    if len(train) == 0:
        raise ConfigError(f"dataset {name!r} leaves no training samples with val_fraction {val_fraction}: lower "
                          f"val_fraction or use more samples.")
    return DatasetSplits(train=train, val=val, test=test, info=train.info)


register_dataset("fashion-mnist", load_fashion_mnist)
register_dataset("cifar10", load_cifar10)
register_dataset("imagefolder", load_imagefolder)
register_dataset("synthetic", load_synthetic)
