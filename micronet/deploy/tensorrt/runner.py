"""Run a serialized TensorRT engine: load it, call it on numpy batches, evaluate it on a dataset, time it.

Device memory is torch CUDA tensors, and the engine runs with ``execute_async_v3`` on a dedicated torch CUDA
stream (TensorRT warns that the default stream costs extra synchronisations). Every torch operation of a call
is issued on that same stream, so no cross-stream synchronisation is needed and the caching allocator never
hands a buffer to another stream while TensorRT still uses it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from micronet.data import ArrayDataset, BatchLoader
from micronet.deploy.tensorrt._support import make_logger, require_device, require_tensorrt
from micronet.engine.numerics import ClassificationScore
from micronet.errors import DeployError

EngineSource = str | os.PathLike | bytes


@functools.cache
def _runtime(trt: ModuleType):
    """One TensorRT runtime (and its logger) per process: engines must not outlive the runtime that made them."""
    logger = make_logger(trt)
    return trt.Runtime(logger), logger


def load_engine(engine: EngineSource):
    """Deserialize an engine from a file path or bytes (as returned by :func:`build_engine`)."""
    if isinstance(engine, (bytes, bytearray, memoryview)):
        data, label = bytes(engine), "the engine bytes"
    else:
        path = Path(engine)
        if not path.is_file():
            raise DeployError(f"{path}: no such TensorRT engine file: build one with build_engine(onnx, engine_path='{path}')")
        data, label = path.read_bytes(), str(path)
    trt = require_tensorrt()
    runtime, _ = _runtime(trt)
    cuda_engine = runtime.deserialize_cuda_engine(data)
    if cuda_engine is None:
        raise DeployError(f"{label} is not a TensorRT {trt.__version__} engine for this GPU (an engine only runs on the "
                          "TensorRT version and GPU model that built it): rebuild it with build_engine")
    return cuda_engine


def _torch_dtype(trt: ModuleType, trt_dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=trt.nptype(trt_dtype))).dtype


class TensorRTRunner:
    """Runs a single-input engine: ``runner(images)`` returns the first output as a numpy array.

    ``engine``: a deserialized engine, a file path or engine bytes. ``device``: the CUDA device holding the
    buffers (``"cpu"`` only serves the test stand-in).
    """

    def __init__(self, engine, device: str | torch.device = "cuda") -> None:
        trt = require_tensorrt()
        self.device = require_device(device)
        if isinstance(engine, (str, os.PathLike, bytes, bytearray, memoryview)):
            engine = load_engine(engine)
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in inputs]
        if len(inputs) != 1 or not self.output_names:
            raise DeployError(f"the engine has inputs {inputs} and outputs {self.output_names}: micronet runs "
                              "image classifiers with one input")
        self.input_name = inputs[0]
        self.dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        shape = tuple(engine.get_tensor_shape(self.input_name))
        self.image_shape = shape[1:]
        if shape[0] >= 0:
            self.min_batch = self.max_batch = shape[0]
        else:
            low, _opt, high = engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.max_batch = int(low[0]), int(high[0])
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def fixed_batch(self) -> int | None:
        return self.min_batch if self.min_batch == self.max_batch else None

    def on_stream(self):
        """Context in which torch work is queued on the runner's stream (use it around :meth:`enqueue`)."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def enqueue(self, x: torch.Tensor) -> torch.Tensor:
        """Queue one inference of the device tensor ``x`` and return the (not yet ready) first output."""
        n = int(x.shape[0])
        if not self.min_batch <= n <= self.max_batch:
            raise DeployError(f"batch {n} is outside the engine's batch range [{self.min_batch}, {self.max_batch}]: "
                              "rebuild the engine with a wider min_batch/max_batch")
        if tuple(x.shape[1:]) != self.image_shape:
            raise DeployError(f"the engine takes images of shape {list(self.image_shape)} but got {list(x.shape[1:])}: "
                              "feed images of the exported size")
        x = x.to(device=self.device, dtype=self.dtypes[self.input_name]).contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise DeployError(f"TensorRT refused input shape {list(x.shape)}: rebuild the engine for that shape")
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        outputs = []
        for name in self.output_names:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        handle = self.stream.cuda_stream if self.stream is not None else 0
        if not self.context.execute_async_v3(handle):
            raise DeployError("TensorRT failed to run the engine (its log above says why): check the input shape")
        return outputs[0]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self.on_stream():
            out = self.enqueue(torch.from_numpy(np.ascontiguousarray(images)))
            result = out.float().cpu()  # queued on the runner's stream: waits for the engine
        return result.numpy()


def evaluate(runner: TensorRTRunner, split: ArrayDataset, batch_size: int = 256) -> dict[str, float]:
    """``{"acc", "loss", "samples"}`` of the engine's first output (logits) on ``split``, batched and normalised
    like :func:`micronet.engine.evaluate`; a fixed-batch engine gets its batch size (the last batch padded)."""
    info = split.info
    if tuple(runner.image_shape) != (info.in_channels, *info.image_size):
        raise DeployError(f"the engine takes images of shape {list(runner.image_shape)} but {info.name} has "
                          f"{[info.in_channels, *info.image_size]}: evaluate on the dataset the model was exported for")
    batch_size = runner.fixed_batch or min(batch_size, runner.max_batch)
    score = ClassificationScore("the TensorRT engine")
    for images, labels in BatchLoader(split, batch_size):
        n = len(labels)
        if n < runner.min_batch:
            images = torch.cat([images, images[-1:].expand(runner.min_batch - n, *images.shape[1:])])
        logits = torch.from_numpy(runner(images.numpy())[:n])
        if logits.ndim != 2 or logits.shape[1] != info.num_classes:
            raise DeployError(f"the engine outputs shape {list(logits.shape)} but {info.name} has {info.num_classes} "
                              "classes: evaluate on the dataset the model was trained on")
        score.add(logits, labels)
    return score.result()


def benchmark(runner: TensorRTRunner, input_shape: tuple[int, ...] | None = None,
              batch_sizes: tuple[int, ...] = (1, 32), warmup: int = 10, repeats: int = 50) -> list[dict[str, float]]:
    """Latency of the engine alone (inputs already on the device), per batch size.

    Each repeat enqueues one inference and waits for the stream, so a time is the wall time from launch to
    completion on the GPU. Returns one ``{"batch", "median_ms", "p90_ms", "images_per_s"}`` per batch size.
    """
    if warmup < 0 or repeats < 1:
        raise DeployError(f"warmup={warmup}, repeats={repeats} is invalid: use warmup >= 0 and repeats >= 1")
    image_shape = tuple(input_shape) if input_shape is not None else runner.image_shape
    generator = torch.Generator().manual_seed(0)
    results = []
    for batch in batch_sizes:
        with runner.on_stream():
            x = torch.randn((batch, *image_shape), generator=generator).to(runner.device)
            for _ in range(warmup):
                runner.enqueue(x)
            runner.synchronize()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                runner.enqueue(x)
                runner.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
        median = float(np.median(times))
        results.append({"batch": batch, "median_ms": median, "p90_ms": float(np.percentile(times, 90)),
                        "images_per_s": batch / median * 1e3})
    return results


__all__ = ["TensorRTRunner", "benchmark", "evaluate", "load_engine"]
