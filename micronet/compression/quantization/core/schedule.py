"""QAT schedules as engine hooks: switch phases at epoch boundaries, resumable through model buffers."""

from __future__ import annotations

import torch
from torch import nn

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


def binary_latent_weights(model: nn.Module) -> list[nn.Parameter]:
    """The float (latent) weights of every layer whose weights are binarized."""
    from micronet.compression.quantization.core.lowbit import BinaryWeightQuantizer

    return [module.weight for module in model.modules()
            if isinstance(getattr(module, "weight_quantizer", None), BinaryWeightQuantizer)]


class ClampBinaryWeights(Hook):
    """Clamp the latent weights of binary-weight layers to [−1, 1] after every optimizer step (and once at
    the start), the original's W_clip as a projection.

    Binary weights clip their latent float weights to [−1, 1] before the sign, and the clamp passes no
    gradient beyond ±1: a latent weight that an optimizer step pushed past ±1 would never move again. The
    projection keeps every latent weight where its gradient flows (±1 included).
    """

    def __init__(self) -> None:
        self.weights: list[nn.Parameter] = []

    def state_dict(self) -> dict:
        """Saved with the run, so that ``micronet quantize --resume`` keeps clamping."""
        return {"kind": "clamp_binary_weights"}

    def on_fit_start(self, trainer) -> None:
        self.weights = binary_latent_weights(getattr(trainer.model, "module", trainer.model))
        if not self.weights:
            raise QuantizationError("clamping latent weights applies to binary weights, and the model has no binary-weight "
                                    "layer: prepare it with wbwtab W=2 (`micronet quantize wbwtab --W 2`), or drop "
                                    "--clamp-weights")
        self.after_step(trainer)

    @torch.no_grad()
    def after_step(self, trainer) -> None:
        for weight in self.weights:
            weight.clamp_(-1.0, 1.0)


class FloatWeightsFirst(Hook):
    """Two-stage training of binary networks: binary (or ternary) weights are switched off for the first
    ``epochs`` epochs, so the network first learns with binary activations and float weights, then with
    both binarized (Real-to-Binary, ReActNet). The switch is each weight quantizer's ``enabled`` buffer,
    so a resumed run is in the right stage. Epochs with float weights report their validation accuracy as
    ``val_acc_float_weights``, not ``val_acc``: the best checkpoint is always one with binarized weights.
    """

    def __init__(self, epochs: int) -> None:
        if epochs < 1:
            raise QuantizationError(f"float-weight epochs must be at least 1 (got {epochs})")
        self.epochs = int(epochs)
        self.quantizers: list[nn.Module] = []

    def state_dict(self) -> dict:
        """Saved with the run, so that ``micronet quantize --resume`` switches at the same epoch."""
        return {"kind": "float_weights_first", "epochs": self.epochs}

    @classmethod
    def from_state(cls, state: dict) -> FloatWeightsFirst:
        return cls(int(state["epochs"]))

    def on_fit_start(self, trainer) -> None:
        from micronet.compression.quantization.core.lowbit import LowBitWeightQuantizer

        if trainer.config.epochs <= self.epochs:
            raise QuantizationError(f"{self.epochs} float-weight epochs leave none of the {trainer.config.epochs} to train "
                                    "the binarized weights: train more epochs than float-weight epochs")
        model = getattr(trainer.model, "module", trainer.model)
        self.quantizers = [m for m in model.modules() if isinstance(m, LowBitWeightQuantizer)]
        if not self.quantizers:
            raise QuantizationError("float weights first applies to binary or ternary weights, and the model has none: "
                                    "prepare it with wbwtab W=2 or W=3, or drop --float-weight-epochs")

    def on_epoch_start(self, trainer, epoch: int) -> None:
        binarized = epoch >= self.epochs
        for quantizer in self.quantizers:
            quantizer.enabled.fill_(int(binarized))
        if epoch == self.epochs:
            trainer.log(f"epoch {epoch + 1}: weights binarized (float weights for the first {self.epochs})")

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        if epoch < self.epochs and "val_acc" in metrics:
            metrics["val_acc_float_weights"] = metrics.pop("val_acc")
