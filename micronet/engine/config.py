"""Training options and the learning-rate schedule.

The learning rate is a pure function of training progress (epochs as a float), so a resumed run
computes exactly the rates the uninterrupted run would have used; no scheduler state is saved.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from micronet.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "multistep", "constant")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 512
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: list[int] = field(default_factory=list)
    step_size: int = 30
    gamma: float = 0.1
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    amp: bool = False
    compile: bool = False
    channels_last: bool = True
    seed: int = 0
    deterministic: bool = False
    progress: bool | None = None  # None: a bar only when stderr is a terminal

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1 (got {self.epochs})"),
            (self.batch_size >= 1, f"batch size must be at least 1 (got {self.batch_size})"),
            (self.eval_batch_size >= 1, f"eval batch size must be at least 1 (got {self.eval_batch_size})"),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be a positive number (got {self.lr})"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1) (got {self.momentum}): e.g. --momentum 0.9"),
            (self.weight_decay >= 0, f"weight decay must be non-negative (got {self.weight_decay})"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1) (got {self.label_smoothing})"),
            (self.warmup_epochs >= 0, f"warm-up epochs must be non-negative (got {self.warmup_epochs})"),
            (0 < self.gamma <= 1, f"gamma must be in (0, 1] (got {self.gamma})"),
            (self.step_size >= 1, f"step size must be at least 1 epoch (got {self.step_size})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def lr_factor(config: TrainConfig, progress: float) -> float:
    """Multiplier of the base learning rate after ``progress`` epochs (a float)."""
    if config.warmup_epochs > 0 and progress < config.warmup_epochs:
        return (progress + 1e-8) / config.warmup_epochs
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "cosine":
        span = max(config.epochs - config.warmup_epochs, 1e-8)
        t = min(max((progress - config.warmup_epochs) / span, 0.0), 1.0)
        floor = config.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    epoch = int(progress)
    if config.schedule == "step":
        return config.gamma ** (epoch // config.step_size)
    return config.gamma ** sum(1 for m in config.milestones if epoch >= m)
