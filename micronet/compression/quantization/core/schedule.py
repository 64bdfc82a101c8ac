"""QAT schedules as engine hooks: switch phases at epoch boundaries, resumable through model buffers."""

from __future__ import annotations

from micronet.compression.quantization.core.bn_fold import freeze_bn_statistics
from micronet.engine.hooks import Hook
from micronet.errors import QuantizationError


class FreezeBNStatistics(Hook):
    """From epoch ``after_epochs`` on (0-based), folded convs train with their running BN statistics.

    Batch-statistics folding scales the weight by γ/σ_B while training but deploys γ/σ_R; freezing the
    statistics for the last epochs lets the weight quantizer settle on the scale that is deployed, which
    matters most at low bit widths. The switch is a buffer in each folded conv, so a resumed run keeps it.
    """

    def __init__(self, after_epochs: int) -> None:
        if after_epochs < 0:
            raise QuantizationError(f"freeze-BN epoch must be non-negative (got {after_epochs})")
        self.after_epochs = after_epochs

    def state_dict(self) -> dict:
        """Saved with the run, so that ``micronet quantize --resume`` freezes at the same epoch."""
        return {"kind": "freeze_bn_statistics", "after_epochs": self.after_epochs}

    @classmethod
    def from_state(cls, state: dict) -> FreezeBNStatistics:
        return cls(int(state["after_epochs"]))

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if epoch >= self.after_epochs and freeze_bn_statistics(trainer.model) and epoch == self.after_epochs:
            trainer.log(f"epoch {epoch + 1}: BatchNorm statistics frozen in the folded convolutions")
