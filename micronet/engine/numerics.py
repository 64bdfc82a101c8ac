"""Checks that numbers reported about a model are numbers: an argmax over NaN logits still picks a class,
so accuracy or top-1 agreement over non-finite outputs would look like a result."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from micronet.errors import NumericalError


def nonfinite_rows(outputs: torch.Tensor | np.ndarray) -> int:
    """How many samples (rows) of ``outputs`` hold a NaN or an infinity."""
    if isinstance(outputs, torch.Tensor):
        return int((~torch.isfinite(outputs.detach())).reshape(len(outputs), -1).any(1).sum()) if len(outputs) else 0
    array = np.asarray(outputs)
    return int((~np.isfinite(array)).reshape(len(array), -1).any(1).sum()) if len(array) else 0


def require_finite(outputs: torch.Tensor | np.ndarray, source: str) -> None:
    """Raise :class:`NumericalError` naming ``source`` when some outputs are NaN or infinite."""
    bad = nonfinite_rows(outputs)
    if bad:
        raise NumericalError(f"{source} gives NaN or infinite outputs for {bad} of {len(outputs)} images: its weights "
                             "or inputs are not finite numbers (a diverged training run?), so no accuracy or agreement "
                             "is reported; retrain it with a lower learning rate")


def nonfinite_tensor(model: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer of ``model`` holding a NaN or an infinity, else None.

    Observers start their ranges at ±inf before they see data, so integer-typed and ``min_val``/``max_val``
    buffers are not weights: only floating-point parameters and BatchNorm statistics are checked."""
    for name, tensor in model.named_parameters():
        if not bool(torch.isfinite(tensor).all()):
            return name
    for name, tensor in model.named_buffers():
        if name.endswith(("running_mean", "running_var")) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def require_finite_weights(model: torch.nn.Module, source: str) -> None:
    """Raise :class:`NumericalError` when a weight of ``model`` (loaded from ``source``) is NaN or infinite."""
    bad = nonfinite_tensor(model)
    if bad is not None:
        raise NumericalError(f"{source} holds NaN or infinite values in {bad} (a diverged training run?): "
                             "retrain it with a lower learning rate")


class ClassificationScore:
    """Mean cross-entropy and top-1 accuracy accumulated over batches of logits: the one scoring shared by
    :func:`micronet.engine.evaluate` and the ONNX Runtime / OpenVINO / TensorRT evaluators, so their numbers
    compare. Each batch is checked finite first (``source`` names the model in the error)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        require_finite(logits, self.source)
        self.loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        self.correct += (logits.argmax(1) == labels).sum().item()
        self.seen += labels.numel()

    def result(self) -> dict[str, float]:
        """``{"loss", "acc", "samples"}``; loss and accuracy are NaN when no sample was seen."""
        if self.seen == 0:
            return {"loss": float("nan"), "acc": float("nan"), "samples": 0}
        return {"loss": self.loss_sum / self.seen, "acc": self.correct / self.seen, "samples": self.seen}
