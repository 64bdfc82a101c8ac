"""Extension points of the training loop.

Methods that later stages plug in (sparsity regularisation, QAT phase switches, weight clipping)
override one or more of these; the loop calls every hook in order. A hook with state that must
survive a resume returns it from :meth:`Hook.state_dict` as JSON-compatible data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from micronet.engine.trainer import Trainer


class Hook:
    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch (also after a resume)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before epoch ``epoch`` (0-based); e.g. switch a QAT phase."""

    def on_batch(self, trainer: Trainer, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """A training batch is about to be fed to the model (e.g. run a teacher on the same inputs)."""

    def extra_loss(self, trainer: Trainer, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """A term added to the task loss for this batch."""
        return None

    def after_backward(self, trainer: Trainer) -> None:
        """Gradients exist, the optimizer has not stepped: edit gradients here (e.g. L1 subgradients)."""

    def after_step(self, trainer: Trainer) -> None:
        """The optimizer stepped: project weights here (e.g. clip latent binary weights)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        """After validation of epoch ``epoch``; may add entries to ``metrics``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class LambdaHook(Hook):
    """Build a hook from plain functions, e.g. ``LambdaHook(after_backward=fn)``."""

    def __init__(self, **callbacks: Any) -> None:
        unknown = set(callbacks) - {
            "on_fit_start",
            "on_epoch_start",
            "on_batch",
            "extra_loss",
            "after_backward",
            "after_step",
            "on_epoch_end",
        }
        if unknown:
            raise TypeError(f"LambdaHook got unknown callbacks: {', '.join(sorted(unknown))}")
        for name, fn in callbacks.items():
            setattr(self, name, fn)
