"""Static facts about a dataset that travel with checkpoints.

A checkpoint records the :class:`DatasetInfo` it was trained on, so evaluation and export can rebuild the
exact input pipeline (channels, size, normalisation) without touching the data again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from micronet.errors import DatasetError


@dataclass(frozen=True)
class DatasetInfo:
    """Shape, classes and per-channel normalisation (on the [0, 1] pixel scale) of a dataset."""

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        # Normalise list inputs (from JSON or callers) to tuples so instances compare and hash reliably.
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "class_names", tuple(str(v) for v in self.class_names))
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise DatasetError(f"dataset {self.name!r} has image size {self.image_size}: it must be two positive ints (H, W).")
        if self.in_channels < 1 or len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise DatasetError(
                f"dataset {self.name!r} has {self.in_channels} channels but {len(self.mean)} means and {len(self.std)} stds: "
                "give one mean and one std per channel."
            )
        if any(s <= 0 for s in self.std):
            raise DatasetError(f"dataset {self.name!r} has a non-positive std {self.std}: every channel std must be > 0.")
        if self.num_classes < 1 or len(self.class_names) != self.num_classes:
            raise DatasetError(
                f"dataset {self.name!r} has {self.num_classes} classes but {len(self.class_names)} class names: give one name per class."
            )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DatasetInfo:
        """Inverse of :meth:`to_json`; a missing key raises DatasetError naming it."""
        keys = ("name", "num_classes", "in_channels", "image_size", "mean", "std", "class_names")
        missing = [k for k in keys if k not in d]
        if missing:
            raise DatasetError(f"dataset info is missing {', '.join(missing)}: the checkpoint's dataset record is "
                               f"incomplete or from another tool.")
        return cls(
            name=str(d["name"]),
            num_classes=int(d["num_classes"]),
            in_channels=int(d["in_channels"]),
            image_size=tuple(d["image_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            class_names=tuple(d["class_names"]),
        )
