"""Knowledge distillation: train a compressed student to match a float teacher's softened outputs.

Binary and low-bit networks underfit: their training accuracy stays below the float model's. The
teacher's class probabilities (which shirt looks like a pullover) are an easier target than one-hot
labels, so the same epochs reach a higher accuracy (Hinton et al. 2015; ReActNet's distributional loss).
The term is added to the task's cross-entropy: ``loss = CE(student, labels) + weight · T² · KL(p_T(teacher) ‖ p_T(student))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from micronet.engine.hooks import Hook
from micronet.errors import ConfigError

__all__ = ["Distillation", "distillation_loss", "load_teacher"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` averaged over the batch.

    The ``T²`` keeps the gradient's size independent of ``T`` (the softened gradients shrink as ``1/T²``).
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def load_teacher(path: str | Path, num_classes: int, data_name: str | None = None) -> nn.Module:
    """The float model of a micronet checkpoint, checked to score the same classes as the student."""
    from micronet.engine.checkpoint import load_checkpoint, resolve_checkpoint

    teacher = load_checkpoint(resolve_checkpoint(path))
    if teacher.arch.num_classes != num_classes:
        raise ConfigError(f"the teacher {teacher.path} scores {teacher.arch.num_classes} classes but the student "
                          f"{num_classes}: distill from a checkpoint trained on the same dataset")
    held = teacher.data_info
    if data_name is not None and held is not None and held.name != data_name:
        raise ConfigError(f"the teacher {teacher.path} was trained on {held.name}, the student trains on {data_name}: "
                          "distill from a checkpoint trained on the same dataset")
    return teacher.build_model()


class Distillation(Hook):
    """Engine hook: runs ``teacher`` (eval mode, no gradients) on every training batch and adds the
    distillation term to the loss. ``source`` (the teacher's checkpoint path) is saved with the run so
    that ``--resume`` distills from the same teacher.
    """

    def __init__(self, teacher: nn.Module, *, weight: float = 1.0, temperature: float = 4.0,
                 source: str | None = None) -> None:
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"distillation weight must be a positive number, got {weight}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"distillation temperature must be a positive number, got {temperature}")
        self.teacher = teacher.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.source = source
        self._teacher_logits: torch.Tensor | None = None
        self._channels_last = True
        self._term_sum: float | torch.Tensor = 0.0
        self._batches = 0

    def on_fit_start(self, trainer: Any) -> None:
        self.teacher.to(trainer.ctx.device, memory_format=torch.channels_last)

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self._term_sum, self._batches = 0.0, 0

    def on_batch(self, trainer: Any, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """The teacher's logits for this batch. Computed on every batch, not cached per epoch: training
        batches are augmented afresh each epoch (random crop and flip), so last epoch's logits would
        describe other images. Inference mode skips autograd's bookkeeping (version counters, views)."""
        self.teacher.eval()
        with torch.inference_mode():
            logits = self._teacher_forward(inputs).float()
        self._teacher_logits = logits.clone()  # a normal tensor: inference tensors cannot enter autograd graphs

    def _teacher_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The teacher runs in channels-last memory whatever the student does: oneDNN then skips the layout
        reorders around every conv (the demo NIN's inference forward: 1.6x faster). A model that cannot run
        so (a ``.view`` on a conv output) switches back to contiguous memory for good on its first batch."""
        if self._channels_last and inputs.dim() == 4:
            try:
                return self.teacher(inputs.contiguous(memory_format=torch.channels_last))
            except RuntimeError:
                self._channels_last = False
                self.teacher.to(memory_format=torch.contiguous_format)
        return self.teacher(inputs)

    def extra_loss(self, trainer: Any, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        teacher = self._teacher_logits
        if teacher is None:
            raise RuntimeError("Distillation.extra_loss called before on_batch: the trainer must call on_batch first")
        if teacher.shape != outputs.shape:
            raise ConfigError(f"the teacher's outputs have shape {tuple(teacher.shape)} but the student's "
                              f"{tuple(outputs.shape)}: distill from a model with the same classes")
        term = self.weight * distillation_loss(outputs, teacher, self.temperature)
        self._term_sum = self._term_sum + term.detach()  # a tensor: no host sync per batch
        self._batches += 1
        self._teacher_logits = None
        return term

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        if self._batches:
            metrics["distill_loss"] = float(self._term_sum) / self._batches

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "distillation", "teacher": self.source, "weight": self.weight, "temperature": self.temperature}

    @classmethod
    def from_state(cls, state: dict[str, Any], num_classes: int, data_name: str | None = None,
                   prepare_teacher: Callable[[nn.Module], nn.Module] | None = None) -> Distillation:
        """Rebuild the hook of a saved run (``micronet ... --resume``) from its teacher checkpoint, passed
        through ``prepare_teacher`` (e.g. :func:`micronet.compression.fusion.fold_for_inference`) when given."""
        if not state.get("teacher"):
            raise ConfigError("the run was distilled from a teacher given as a module, not a checkpoint path: "
                              "it cannot be resumed from the command line")
        teacher = load_teacher(state["teacher"], num_classes, data_name)
        if prepare_teacher is not None:
            teacher = prepare_teacher(teacher)
        return cls(teacher, weight=state["weight"], temperature=state["temperature"], source=state["teacher"])
