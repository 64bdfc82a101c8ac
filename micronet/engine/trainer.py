"""The one training / evaluation loop every method in micronet runs on.

Quantization-aware training, sparse training and fine-tuning differ only in the hooks they pass
(:mod:`micronet.engine.hooks`). Each finished epoch writes a resumable checkpoint (``last/``), the
best checkpoint by validation accuracy (``best/``) and ``log.jsonl``; the test set is never looked at.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from micronet.engine.checkpoint import CHECKPOINT_OUTPUT, load_checkpoint, resolve_checkpoint, save_checkpoint
from micronet.engine.config import TrainConfig, lr_factor
from micronet.engine.distributed import DistContext, broadcast_object
from micronet.engine.hooks import Hook
from micronet.engine.numerics import ClassificationScore, nonfinite_tensor
from micronet.engine.state import optimizer_state_join, optimizer_state_split, restore_rng_state, rng_state
from micronet.errors import CheckpointError, NumericalError
from micronet.io import atomic_write_text
from micronet.models.registry import find_arch
from micronet.outputs import OutputKind

LOG_FILE = "log.jsonl"
PRUNE_REPORT_FILE = "prune_report.json"  # `micronet prune` writes it beside the pruned run's best/
_RUN_ENTRIES = frozenset({"best", "last", LOG_FILE, PRUNE_REPORT_FILE})


def _is_run(path: Path) -> bool:
    checkpoints = [path / name for name in ("best", "last") if (path / name).exists()]
    return all(CHECKPOINT_OUTPUT.recognise(folder) for folder in checkpoints) and \
        any((path / name).exists() for name in _RUN_ENTRIES)


# A training run's folder: its checkpoints and log are written one by one, so an overwritten run is
# emptied of them first (no best/ of the old run may outlive it).
RUN_OUTPUT = OutputKind("training run", _is_run, _RUN_ENTRIES, clear_on_overwrite=True)


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    out_dir: Path | None = None
    resumed_from_epoch: int = 0

    @property
    def best_checkpoint(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "best"

    @property
    def last_checkpoint(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "last"


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weight matrices and kernels only; BN γ/β and biases are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.AdamW(groups, lr=config.lr)


def _autocast(device: torch.device, enabled: bool):
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str | None = None,
    *,
    amp: bool = False,
    source: str = "the model",
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode; restores the model's mode. Non-finite
    outputs raise :class:`~micronet.errors.NumericalError` naming ``source``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    score = ClassificationScore(source)
    try:
        for inputs, targets in loader:
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with _autocast(device, amp):
                outputs = model(inputs)
            score.add(outputs, targets)
    finally:
        model.train(was_training)
    return score.result()


class Trainer:
    """Runs ``config.epochs`` epochs of ``model`` on ``train_loader`` with the given hooks.

    ``train_loader`` must offer ``set_epoch(epoch)`` and ``__len__`` and produce the same batches for
    the same epoch (micronet's :class:`~micronet.data.BatchLoader` does), so resuming is exact.
    ``options``: the settings the run was started with (JSON values; see :mod:`micronet.engine.resume`),
    recorded in the resumable checkpoint so that a resumed run can restore and check them.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_loader: Any,
        val_loader: Any = None,
        *,
        hooks: Sequence[Hook] = (),
        ctx: DistContext | None = None,
        out_dir: str | Path | None = None,
        data_info: Any = None,
        checkpoint_extra: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.ctx = ctx or DistContext(next(model.parameters()).device)
        self.config = config
        self.model = model.to(self.ctx.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.hooks = list(hooks)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.data_info = data_info
        self.checkpoint_extra = checkpoint_extra or {}
        self.options = options  # what the run was started with (data, model, method): restored on resume
        self.optimizer = optimizer or build_optimizer(self.model, config)
        for group in self.optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self._uses_fp16())
        self.log = log or (lambda line: print(line, flush=True))
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.train_model = self._wrap(self.model)

    # ----------------------------------------------------------------- setup
    def _uses_fp16(self) -> bool:
        return (
            self.config.amp and self.ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        )

    def _wrap(self, model: nn.Module) -> nn.Module:
        wrapped = model
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids)
        if self.config.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def resume(self, path: str | Path) -> None:
        """Continue from a resumable checkpoint (``last/`` of a run, or the run directory)."""
        source = resolve_checkpoint(Path(path) / "last" if (Path(path) / "last").exists() else path)
        checkpoint = load_checkpoint(source, with_train_state=True)
        training = checkpoint.training
        if not training or "optimizer" not in training:
            raise CheckpointError(f"{source} holds weights only, no training state: resume from the run's last/ checkpoint")
        held, ours = checkpoint.meta.get("arch"), find_arch(self.model)
        if held and ours is not None and (held.get("name") != ours.name or list(held.get("cfg", [])) != list(ours.cfg)):
            raise CheckpointError(
                f"{source} holds {held.get('name')} with cfg {held.get('cfg')}, not {ours.name} with cfg {list(ours.cfg)}: "
                "resume with the model the run was started with"
            )
        checkpoint.load_into(self.model)
        self.optimizer.load_state_dict(optimizer_state_join(checkpoint.train_tensors, training["optimizer"]))
        if training.get("scaler"):
            self.scaler.load_state_dict(training["scaler"])
        restore_rng_state(checkpoint.train_tensors)
        self.epoch = int(training["epoch"])
        self.history = list(training.get("history", []))
        self.best = training.get("best")
        if self.options is None and isinstance(training.get("options"), dict):
            self.options = training["options"]
        for hook, state in zip(self.hooks, training.get("hooks", [])):
            hook.load_state_dict(state)

    # ----------------------------------------------------------------- loop
    def fit(self, resume: str | Path | None = None) -> FitResult:
        if self.config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if resume is not None:
            self.resume(resume)
        else:
            torch.manual_seed(self.config.seed + self.ctx.rank)
        start = self.epoch
        if self.ctx.is_main and start > 0:
            self.log(f"resumed at epoch {start}/{self.config.epochs} from {resume}")
        for hook in self.hooks:
            hook.on_fit_start(self)
        for epoch in range(start, self.config.epochs):
            self.epoch = epoch
            for hook in self.hooks:
                hook.on_epoch_start(self, epoch)
            metrics = self._train_one_epoch(epoch)
            metrics.update(self._validate())
            for hook in self.hooks:
                hook.on_epoch_end(self, epoch, metrics)
            self.epoch = epoch + 1
            self.history.append(metrics)
            improved = self._update_best(metrics)
            if self.ctx.is_main:
                self.log(self._summary(metrics))
                self._save(improved)
        return FitResult(self.model, self.history, self.best, self.out_dir, start)

    def _set_lr(self, progress: float) -> float:
        factor = lr_factor(self.config, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]

    def _train_one_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, device = self.config, self.ctx.device
        self.model.train()
        self.train_loader.set_epoch(epoch)
        steps = len(self.train_loader)
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not (show and self.ctx.is_main))
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        started = time.perf_counter()
        lr = cfg.lr
        for step, (inputs, targets) in enumerate(self.train_loader):
            lr = self._set_lr(epoch + step / max(steps, 1))
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            for hook in self.hooks:
                hook.on_batch(self, inputs, targets)
            with _autocast(device, cfg.amp):
                outputs = self.train_model(inputs)
                loss = F.cross_entropy(outputs.float(), targets, label_smoothing=cfg.label_smoothing)
                for hook in self.hooks:
                    term = hook.extra_loss(self, outputs, targets)
                    if term is not None:
                        loss = loss + term
            self._check_loss(loss, epoch, step, steps)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            for hook in self.hooks:
                hook.after_backward(self)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            for hook in self.hooks:
                hook.after_step(self)
            with torch.no_grad():
                loss_sum += loss.detach().double() * targets.numel()
                correct += (outputs.argmax(1) == targets).sum()
            seen += targets.numel()
            if bar.disable is False and (step % 10 == 0 or step == steps - 1):
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}", img_s=f"{seen / elapsed:.0f}")
            bar.update(1)
        bar.close()
        self._check_weights(epoch, steps)
        elapsed = time.perf_counter() - started
        totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)])
        if self.ctx.distributed:
            torch.distributed.all_reduce(totals)
            self._sync_buffers()
        total_seen = max(totals[2].item(), 1.0)
        return {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": totals[0].item() / total_seen,
            "train_acc": totals[1].item() / total_seen,
            "seconds": round(elapsed, 3),
            "img_per_s": round(total_seen / elapsed, 1),
        }

    def _kept_checkpoint(self) -> str:
        if self.out_dir is None or self.epoch == 0 or not (self.out_dir / "last").exists():
            return "no checkpoint was written"
        return f"{self.out_dir / 'last'} keeps epoch {self.epoch}"

    def _check_loss(self, loss: torch.Tensor, epoch: int, step: int, steps: int) -> None:
        """Stop before a NaN or infinite loss reaches the weights (all ranks stop together under DDP)."""
        finite = torch.isfinite(loss.detach()).to(torch.int32)
        if self.ctx.distributed:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite.item():
            value = loss.item()
            raise NumericalError(
                f"the training loss became {'NaN' if value != value else value} at epoch {epoch + 1}, batch {step + 1} of "
                f"{steps}: training stopped ({self._kept_checkpoint()}); lower --lr (it is {self.config.lr:g}) "
                "or add --warmup-epochs")

    def _check_weights(self, epoch: int, steps: int) -> None:
        """The last step of an epoch can make the weights non-finite without any loss showing it."""
        bad = nonfinite_tensor(self.model)
        if bad is not None:
            raise NumericalError(
                f"weight {bad} became NaN or infinite in the last step of epoch {epoch + 1} (batch {steps} of {steps}): "
                f"training stopped ({self._kept_checkpoint()}); lower --lr (it is {self.config.lr:g}) "
                "or add --warmup-epochs")

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BN running statistics drift apart between broadcasts)."""
        for buffer in self.model.buffers():
            torch.distributed.broadcast(buffer, src=0)

    def _validate(self) -> dict[str, Any]:
        if self.val_loader is None:
            return {}
        result = None
        if self.ctx.is_main:
            stats = evaluate(self.model, self.val_loader, self.ctx.device, amp=self.config.amp)
            result = {"val_loss": stats["loss"], "val_acc": stats["acc"]}
        return broadcast_object(result, self.ctx)

    def _update_best(self, metrics: dict[str, Any]) -> bool:
        score = metrics.get("val_acc")
        if score is None:  # without validation data the latest epoch is the one to keep
            self.best = {"epoch": metrics["epoch"]}
            return True
        if self.best is None or score > self.best.get("val_acc", float("-inf")):
            self.best = {"epoch": metrics["epoch"], "val_acc": score}
            return True
        return False

    def _summary(self, m: dict[str, Any]) -> str:
        parts = [f"epoch {m['epoch']}/{self.config.epochs}", f"lr {m['lr']:.4g}", f"train loss {m['train_loss']:.4f}",
                 f"train acc {m['train_acc']:.4f}"]
        if "val_acc" in m:
            parts += [f"val loss {m['val_loss']:.4f}", f"val acc {m['val_acc']:.4f}"]
        parts += [f"{m['seconds']:.1f} s", f"{m['img_per_s']:.0f} img/s"]
        return " | ".join(parts)

    # ----------------------------------------------------------------- saving
    def training_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        opt_tensors, opt_json = optimizer_state_split(self.optimizer)
        training = {
            "epoch": self.epoch,
            "config": self.config.to_json(),
            "history": self.history,
            "best": self.best,
            "optimizer": opt_json,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "hooks": [hook.state_dict() for hook in self.hooks],
        }
        if self.options is not None:
            training["options"] = self.options
        return training, {**opt_tensors, **rng_state()}

    def _save(self, improved: bool) -> None:
        if self.out_dir is None:
            return
        last = self.history[-1]
        metrics = {k: v for k, v in last.items() if k.startswith(("val_", "train_"))}
        training, tensors = self.training_state()
        save_checkpoint(
            self.out_dir / "last",
            self.model,
            data_info=self.data_info,
            metrics=metrics,
            training=training,
            train_tensors=tensors,
            extra=self.checkpoint_extra,
        )
        if improved:
            save_checkpoint(
                self.out_dir / "best",
                self.model,
                data_info=self.data_info,
                metrics=metrics,
                training={"epoch": self.epoch, "config": self.config.to_json()},
                extra=self.checkpoint_extra,
            )
        atomic_write_text(self.out_dir / LOG_FILE, "".join(json.dumps(row) + "\n" for row in self.history))


def fit(model: nn.Module, config: TrainConfig, train_loader: Any, val_loader: Any = None, *,
        resume: str | Path | None = None, **options: Any) -> FitResult:
    """Train ``model``; see :class:`Trainer` for the options."""
    return Trainer(model, config, train_loader, val_loader, **options).fit(resume)
