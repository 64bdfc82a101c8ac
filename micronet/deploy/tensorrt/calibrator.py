"""INT8 calibration data for TensorRT's implicit quantization (an FP32 ONNX built with ``precision="int8"``).

TensorRT 10.1 deprecates implicit quantization (the ``IInt8*Calibrator`` classes) in favour of explicit Q/DQ
graphs, and TensorRT 11 removes it; it is kept because it needs nothing but an FP32 ONNX and some images.

The protocol (``get_batch_size``, ``get_batch(names)`` returning device pointers or None, ``read_calibration_cache``,
``write_calibration_cache``) lives in the plain class :class:`CalibrationFeeder`, so it is tested without
TensorRT or a GPU. TensorRT calls a subclass of its own ``IInt8EntropyCalibrator2`` that
:func:`make_entropy_calibrator` defines only once ``tensorrt`` is importable, and that delegates every call.

TensorRT calls these methods from C++; an exception raised there is printed and lost, and calibration just
stops. So the subclass records the first error on the feeder (:attr:`CalibrationFeeder.error`), returns
"no more batches", and :func:`~micronet.deploy.tensorrt.build_engine` raises it after the build.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from micronet.deploy.tensorrt._support import require_device, require_tensorrt, synchronize
from micronet.errors import DeployError
from micronet.io import atomic_write


def _as_array(batch: object, index: int) -> np.ndarray:
    """The image array of one batch: an ndarray, a tensor, or the first item of a (images, labels) pair."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    if not isinstance(batch, np.ndarray):
        raise DeployError(f"calibration batch {index} is a {type(batch).__name__}: pass numpy arrays, tensors or "
                          "a micronet BatchLoader")
    return batch


class CalibrationFeeder:
    """Feeds calibration batches to TensorRT from host arrays through one preallocated device buffer.

    ``batches``: numpy arrays or tensors N×C×H×W, (images, labels) pairs, or a :class:`~micronet.data.BatchLoader`;
    None to calibrate from ``cache_path`` alone. Every batch must have the first batch's shape and dtype (TensorRT
    calibrates at one fixed shape: use ``BatchLoader(..., drop_last=True)``); it is copied as contiguous float32.
    ``cache_path``: the calibration table. When the file exists TensorRT reuses it and reads no batch: delete it
    to recalibrate after the model or the data changed. ``device``: where the buffer lives, ``"cuda"`` for
    TensorRT (``"cpu"`` only serves tests).
    """

    def __init__(self, batches: Iterable | None, cache_path: str | os.PathLike | None = None,
                 max_batches: int | None = None, device: str | torch.device = "cuda") -> None:
        if max_batches is not None and max_batches < 1:
            raise DeployError(f"max_batches={max_batches} is invalid: calibrate on at least 1 batch (or None for all)")
        if batches is None and (cache_path is None or not Path(cache_path).is_file()):
            raise DeployError("INT8 calibration needs batches or an existing calibration cache: pass calibration "
                              "images (e.g. a BatchLoader over training data) or the cache_path of an earlier run")
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.device = require_device(device)
        source = iter(()) if batches is None else iter(batches)
        self._batches: Iterator = source if max_batches is None else itertools.islice(source, max_batches)
        self._started = False
        self._first: np.ndarray | None = None
        self._pending: np.ndarray | None = None  # the first batch, read early, until get_batch hands it out
        self._read_count = 0
        self._buffer: torch.Tensor | None = None
        self.batches_fed = 0
        self.cache_written = False
        self.error: BaseException | None = None

    def _read(self) -> np.ndarray | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self._read_count += 1
        return _as_array(batch, self._read_count - 1)

    def _start(self) -> None:
        """Read the first batch once: it fixes the shape, dtype and buffer of the whole run."""
        if not self._started:
            self._started = True
            self._first = self._pending = self._read()

    @property
    def batch_shape(self) -> tuple[int, ...] | None:
        """The calibration batch shape (None when there are no batches, i.e. calibrating from the cache); the
        builder reads it before TensorRT starts, for the calibration profile."""
        self._start()
        return None if self._first is None else tuple(self._first.shape)

    def get_batch_size(self) -> int:
        """N of the calibration batches (1 when calibrating from a cache alone)."""
        shape = self.batch_shape
        return shape[0] if shape else 1

    def _checked(self, batch: np.ndarray) -> np.ndarray:
        first = self._first
        assert first is not None
        if batch.shape != first.shape or batch.dtype != first.dtype:
            raise DeployError(f"calibration batch {self.batches_fed} has shape {list(batch.shape)} {batch.dtype} but "
                              f"the first batch had {list(first.shape)} {first.dtype}: TensorRT calibrates at one fixed "
                              "shape, so feed equal batches (BatchLoader(..., drop_last=True))")
        return np.ascontiguousarray(batch, dtype=np.float32)

    def get_batch(self, names: list[str]) -> list[int] | None:
        """Device pointers, one per input in ``names``, of the next batch; None once the batches are used up."""
        if len(names) != 1:
            raise DeployError(f"the network has {len(names)} inputs ({', '.join(names)}): micronet calibrates "
                              "single-input image classifiers only")
        self._start()
        if self._pending is not None:
            batch, self._pending = self._pending, None
        else:
            batch = self._read()
        if batch is None:
            return None
        host = torch.from_numpy(self._checked(batch))
        if self._buffer is None:
            self._buffer = torch.empty(host.shape, dtype=torch.float32, device=self.device)
        self._buffer.copy_(host)
        synchronize(self.device)  # TensorRT reads the buffer on its own stream
        self.batches_fed += 1
        return [int(self._buffer.data_ptr())]

    def read_calibration_cache(self) -> bytes | None:
        """The cached table when ``cache_path`` exists (TensorRT then skips calibration), else None."""
        if self.cache_path is not None and self.cache_path.is_file():
            return self.cache_path.read_bytes()
        return None

    def write_calibration_cache(self, cache) -> None:
        """Store TensorRT's table at ``cache_path`` atomically (a reader never sees half a table)."""
        if self.cache_path is None:
            return
        data = bytes(cache)
        atomic_write(self.cache_path, lambda tmp: tmp.write_bytes(data))
        self.cache_written = True


@functools.cache
def _entropy_calibrator_class(trt: ModuleType) -> type:
    """The ``trt.IInt8EntropyCalibrator2`` subclass for this ``tensorrt`` module (defined lazily, once)."""

    class EntropyCalibrator2(trt.IInt8EntropyCalibrator2):
        def __init__(self, feeder: CalibrationFeeder) -> None:
            super().__init__()  # the pybind11 trampoline must be initialised before TensorRT calls back
            self.feeder = feeder

        def _guard(self, call, default):
            if self.feeder.error is not None:
                return default
            try:
                return call()
            except Exception as error:  # TensorRT would print and drop it: keep it for build_engine to raise
                self.feeder.error = error
                return default

        def get_batch_size(self) -> int:
            return self._guard(self.feeder.get_batch_size, 1)

        def get_batch(self, names):  # the TensorRT 10 signature (TensorRT 7 also passed bindings)
            return self._guard(lambda: self.feeder.get_batch(list(names)), None)

        def read_calibration_cache(self):
            return self._guard(self.feeder.read_calibration_cache, None)

        def write_calibration_cache(self, cache) -> None:
            self._guard(lambda: self.feeder.write_calibration_cache(cache), None)

    return EntropyCalibrator2


def make_entropy_calibrator(feeder: CalibrationFeeder):
    """A ``tensorrt.IInt8EntropyCalibrator2`` that delegates to ``feeder`` (needs TensorRT)."""
    return _entropy_calibrator_class(require_tensorrt())(feeder)


__all__ = ["CalibrationFeeder", "make_entropy_calibrator"]
