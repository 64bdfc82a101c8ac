"""Training engine: one fit/evaluate loop, hooks, checkpoints and distributed set-up."""

from micronet.engine.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_model,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from micronet.engine.config import TrainConfig, lr_factor
from micronet.engine.distillation import Distillation, distillation_loss
from micronet.engine.distributed import DistContext, setup, teardown
from micronet.engine.hooks import Hook, LambdaHook
from micronet.engine.trainer import FitResult, Trainer, build_optimizer, evaluate, fit

__all__ = [
    "Checkpoint",
    "DistContext",
    "Distillation",
    "FitResult",
    "Hook",
    "LambdaHook",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "distillation_loss",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "lr_factor",
    "resolve_checkpoint",
    "save_checkpoint",
    "setup",
    "teardown",
]
