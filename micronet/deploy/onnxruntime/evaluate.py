"""Accuracy and loss of an ONNX file in ONNX Runtime on a micronet dataset split.

It batches with the same :class:`~micronet.data.BatchLoader` (same normalization) and computes the same
mean cross-entropy as :func:`micronet.engine.evaluate`, so the numbers of the deployed file and of the
PyTorch model it came from are directly comparable.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from micronet.data import ArrayDataset, BatchLoader
from micronet.deploy.onnxruntime.session import ModelSource, as_session, check_image_shape, fixed_batch, run
from micronet.engine.numerics import ClassificationScore, require_finite
from micronet.errors import DeployError


def evaluate(model: ModelSource | ort.InferenceSession, split: ArrayDataset, batch_size: int = 256,
             threads: int = 1, runtime: str = "onnxruntime") -> dict[str, float]:
    """``{"acc", "loss", "samples"}`` of the model's first output (logits) on ``split``.

    A model exported with a fixed batch is fed batches of exactly that size (the last one padded).
    ``runtime``: "onnxruntime" or "openvino" (the same file, see :mod:`micronet.deploy.openvino`).
    """
    session = as_session(model, threads=threads, runtime=runtime)
    info = split.info
    check_image_shape(session, (info.in_channels, *info.image_size), f"{info.name} data",
                      "evaluate on the dataset the model was exported for")
    fixed = fixed_batch(session)
    batch_size = fixed or batch_size
    score = ClassificationScore("the ONNX model")
    for images, labels in BatchLoader(split, batch_size):
        n = len(labels)
        x = images.numpy()
        if fixed is not None and n < fixed:
            x = np.concatenate([x, np.repeat(x[-1:], fixed - n, axis=0)])
        logits = run(session, x)[:n]
        if logits.ndim != 2 or logits.shape[1] != info.num_classes:
            raise DeployError(f"the model outputs shape {list(logits.shape)} but {info.name} has "
                              f"{info.num_classes} classes: evaluate on the dataset the model was trained on")
        score.add(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), labels)
    return score.result()


def top1_agreement(a_logits: np.ndarray | torch.Tensor, b_logits: np.ndarray | torch.Tensor) -> float:
    """Share of samples where two models' top-1 classes agree (e.g. ORT INT8 against PyTorch FP32).

    Raises :class:`~micronet.errors.NumericalError` when either holds NaN or infinite logits: an argmax over
    NaN picks a class all the same, and two NaN models would "agree" 100%."""
    a, b = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in (a_logits, b_logits))
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"top1_agreement needs two N×K logit arrays of the same shape (got {a.shape} and {b.shape})")
    require_finite(a, "the first model")
    require_finite(b, "the second model")
    if len(a) == 0:
        return float("nan")
    return float((a.argmax(1) == b.argmax(1)).mean())
