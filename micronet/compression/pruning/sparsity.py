"""Sparse training for network slimming (Liu et al. 2017): an L1 penalty on BatchNorm scales.

Adding ``s · sign(γ)`` to the gradient of every BatchNorm scale γ is the subgradient of ``s · Σ|γ|``; it
drives the scales of unimportant channels towards zero so that pruning by |γ| removes them with little
loss. With SGD the push is exactly ``lr · s`` per step; with Adam it is normalised per parameter (as in
the original micronet, whose recommended ``s`` values assume Adam).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from micronet.engine.hooks import Hook
from micronet.errors import ConfigError

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class BatchNormL1(Hook):
    """Engine hook: after each backward pass, ``γ.grad += s_epoch · sign(γ)`` for the chosen BatchNorms.

    ``names``: module names (a prefix selects its children) to restrict the penalty to; every affine
    BatchNorm by default. ``ramp_epochs``: ``s`` grows linearly, ``s · (epoch + 1) / ramp_epochs``, over the
    first epochs, so the penalty does not hit a network that has not learnt anything yet.
    ``prunable_only`` (default): of those, penalise only the BatchNorms over channels that pruning can remove
    (:func:`~micronet.compression.pruning.prunable_batchnorms`, traced on the first training batch); the
    scales of e.g. NIN's logits BatchNorm would only shrink for nothing. ``False`` penalises them all, as the
    original did.
    """

    def __init__(self, s: float, names: Iterable[str] | None = None, ramp_epochs: int = 0,
                 prunable_only: bool = True) -> None:
        if not s > 0:
            raise ConfigError(f"the sparsity strength s must be positive (got {s}); typical values are 1e-5 to 1e-3")
        if ramp_epochs < 0:
            raise ConfigError(f"ramp_epochs must be 0 (no ramp) or positive (got {ramp_epochs})")
        self.s = float(s)
        self.names = None if names is None else tuple(names)
        self.ramp_epochs = int(ramp_epochs)
        self.current = self.s if not ramp_epochs else self.s / ramp_epochs
        self.prunable_only = bool(prunable_only)
        self.scales: list[nn.Parameter] = []
        self._candidates: dict[str, nn.Parameter] = {}
        self._narrowed = False

    def _selected(self, name: str) -> bool:
        return self.names is None or any(name == n or name.startswith(n + ".") for n in self.names)

    def on_fit_start(self, trainer) -> None:
        model = getattr(trainer.model, "module", trainer.model)  # DistributedDataParallel wraps the model
        self._candidates = {name: m.weight for name, m in model.named_modules()
                            if isinstance(m, _BATCH_NORMS) and m.affine and self._selected(name)}
        self.scales = list(self._candidates.values())
        self._narrowed = not self.prunable_only
        if not self.scales:
            wanted = "" if self.names is None else f" among {', '.join(self.names)}"
            raise ConfigError(f"sparse training needs BatchNorm layers with scales{wanted}, and the model has none")

    def on_batch(self, trainer, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """On the first batch, keep only the BatchNorms over prunable channels (the graph needs an input)."""
        if self._narrowed:
            return
        from micronet.compression.pruning.api import prunable_batchnorms
        from micronet.errors import PruningError

        self._narrowed = True
        model = getattr(trainer.model, "module", trainer.model)
        try:
            prunable = set(prunable_batchnorms(model, inputs[:1]))
        except PruningError as exc:
            raise ConfigError(f"sparse training could not find which BatchNorms can be pruned ({exc}); penalise "
                              "every BatchNorm instead (prunable_only=False, `micronet train --sr-all-bn`)") from exc
        left_out = [name for name in self._candidates if name not in prunable]
        self.scales = [gamma for name, gamma in self._candidates.items() if name in prunable]
        if not self.scales:
            raise ConfigError(f"sparse training: none of the BatchNorms {', '.join(left_out)} is over prunable "
                              "channels; penalise them all with prunable_only=False (`--sr-all-bn`)")
        if left_out and hasattr(trainer, "log") and trainer.ctx.is_main:
            trainer.log(f"sparse training: {len(self.scales)} BatchNorms penalised; left out (channels that cannot "
                        f"be pruned): {', '.join(left_out)}")

    def on_epoch_start(self, trainer, epoch: int) -> None:
        self.current = self.s if not self.ramp_epochs else self.s * min(1.0, (epoch + 1) / self.ramp_epochs)

    @torch.no_grad()
    def after_backward(self, trainer) -> None:
        for gamma in self.scales:
            if gamma.grad is not None:
                gamma.grad.add_(torch.sign(gamma), alpha=self.current)

    def state_dict(self) -> dict:
        """Saved with the run, so that ``micronet train --resume`` continues the same sparse training."""
        return {"kind": "batchnorm_l1", "s": self.s, "names": None if self.names is None else list(self.names),
                "ramp_epochs": self.ramp_epochs, "prunable_only": self.prunable_only}

    @classmethod
    def from_state(cls, state: dict) -> BatchNormL1:
        # a run saved before prunable_only existed penalised every BatchNorm: it continues so
        return cls(state["s"], state.get("names"), state.get("ramp_epochs", 0), state.get("prunable_only", False))

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, float]) -> None:
        metrics["sparsity_s"] = self.current
        with torch.no_grad():
            metrics["bn_gamma_l1"] = float(sum(g.abs().sum() for g in self.scales))
