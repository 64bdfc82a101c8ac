"""The training loop: schedules, hooks, learning on real-ish data, exact resume after SIGKILL, DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from micronet.data import BatchLoader, load_dataset
from micronet.deploy.onnxruntime import top1_agreement
from micronet.engine import Hook, TrainConfig, evaluate, fit, load_checkpoint, lr_factor, save_checkpoint
from micronet.errors import ConfigError, NumericalError
from micronet.models import build_model

REPO = Path(__file__).resolve().parents[1]


def test_cosine_and_step_schedules():
    cfg = TrainConfig(epochs=10, schedule="cosine")
    assert lr_factor(cfg, 0) == pytest.approx(1.0)
    assert lr_factor(cfg, 5) == pytest.approx(0.5)
    assert lr_factor(cfg, 10) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(epochs=10, schedule="multistep", milestones=[3, 6], gamma=0.1)
    assert [round(lr_factor(step, e), 6) for e in (0, 2.9, 3, 5, 6, 9)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
    warm = TrainConfig(epochs=10, schedule="constant", warmup_epochs=2)
    assert lr_factor(warm, 1) == pytest.approx(0.5)
    assert lr_factor(warm, 2) == 1.0


@pytest.mark.parametrize(
    "options, text",
    [({"optimizer": "rmsprop"}, "unknown optimizer"), ({"epochs": 0}, "epochs"), ({"lr": -1}, "learning rate"),
     ({"label_smoothing": 1.5}, "label smoothing"), ({"schedule": "poly"}, "unknown schedule")],
)
def test_impossible_options_are_rejected(options, text):
    with pytest.raises(ConfigError, match=text):
        TrainConfig(**options)


def _synthetic_loaders(batch_size=32, **options):
    splits = load_dataset("synthetic", val_fraction=0.2, seed=0, **options)
    train = BatchLoader(splits.train, batch_size, shuffle=True, seed=0, drop_last=True)
    val = BatchLoader(splits.val, 256)
    test = BatchLoader(splits.test, 256)
    return splits, train, val, test


class _Recorder(Hook):
    def __init__(self):
        self.calls = []
        self.l1_terms = 0

    def on_fit_start(self, trainer):
        self.calls.append("fit_start")

    def on_epoch_start(self, trainer, epoch):
        self.calls.append(f"epoch_start {epoch}")

    def extra_loss(self, trainer, outputs, targets):
        self.l1_terms += 1
        return 0.0 * outputs.sum()

    def after_backward(self, trainer):
        assert all(p.grad is not None for p in trainer.model.parameters())

    def on_epoch_end(self, trainer, epoch, metrics):
        metrics["seen_by_hook"] = epoch
        self.calls.append(f"epoch_end {epoch}")


def test_fit_learns_synthetic_data_and_calls_hooks(tmp_path):
    splits, train, val, test = _synthetic_loaders()
    torch.manual_seed(0)
    model = build_model("lenet", splits.info.num_classes, splits.info.in_channels)
    before = evaluate(model, test)["acc"]
    hook = _Recorder()
    result = fit(model, TrainConfig(epochs=3, lr=0.05), train, val, hooks=[hook], out_dir=tmp_path / "run")
    after = evaluate(result.model, test)["acc"]
    assert after >= 0.9 > before + 0.3
    assert hook.calls == ["fit_start", "epoch_start 0", "epoch_end 0", "epoch_start 1", "epoch_end 1", "epoch_start 2", "epoch_end 2"]
    assert hook.l1_terms == 3 * len(train)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2, 3] and log[-1]["seen_by_hook"] == 2
    assert {"train_loss", "train_acc", "val_acc", "img_per_s", "lr"} <= set(log[0])
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()


def test_gradient_hook_changes_training():
    """An after_backward hook really edits the gradients the optimizer uses (network slimming relies on it)."""
    splits, train, _, _ = _synthetic_loaders(num_train=256)
    outcomes = []
    for scale in (0.0, 1.0):
        torch.manual_seed(0)
        model = build_model("nin", splits.info.num_classes, 1, cfg=[8, 8, 8, 8, 8, 8, 8, 8])

        class L1OnBN(Hook):
            def after_backward(self, trainer):
                for m in trainer.model.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.weight.grad.add_(scale * torch.sign(m.weight.detach()))

        fit(model, TrainConfig(epochs=1, lr=0.05, weight_decay=0), train, hooks=[L1OnBN()])
        outcomes.append(sum(m.weight.abs().sum().item() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)))
    assert outcomes[1] < 0.5 * outcomes[0]


def _cli(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "micronet.cli", *args], env=env, cwd=REPO, **kwargs)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    common = ["train", "--model", "lenet", "--data", "synthetic", "--epochs", "4", "--batch-size", "8",
              "--lr", "0.02", "--seed", "3", "--no-progress", "--deterministic"]
    reference = _cli([*common, "--out", str(tmp_path / "ref")], stdout=subprocess.DEVNULL)
    assert reference.wait(timeout=300) == 0

    run = tmp_path / "killed"
    victim = _cli([*common, "--out", str(run)], stdout=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "log.jsonl").exists():
        time.sleep(0.02)
    time.sleep(0.3)  # now inside epoch 2 (an epoch takes seconds at batch size 8)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = json.loads((run / "last" / "micronet.json").read_text())["training"]["epoch"]
    assert 1 <= done < 4, "the kill must land before the run finished"

    resumed = _cli(["train", "--resume", str(run), "--no-progress"], stdout=subprocess.PIPE, text=True)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and f"resumed at epoch {done}/4" in out
    a = load_file(str(tmp_path / "ref" / "last" / "model.safetensors"))
    b = load_file(str(run / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    log_a = (tmp_path / "ref" / "log.jsonl").read_text().splitlines()
    log_b = (run / "log.jsonl").read_text().splitlines()
    def strip(rows):
        return [{k: v for k, v in json.loads(r).items() if k not in ("seconds", "img_per_s")} for r in rows]

    assert strip(log_a) == strip(log_b)


def test_ddp_two_cpu_processes_hold_identical_weights(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    initial = load_file(str(tmp_path / "initial.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0), "training changed nothing"
    for observer in ("moving_average", "percentile", "histogram"):
        a = load_file(str(tmp_path / f"observers_{observer}_rank0.safetensors"))
        b = load_file(str(tmp_path / f"observers_{observer}_rank1.safetensors"))
        assert a.keys() == b.keys() and any("observer" in k for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{observer} observers differ between ranks"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_per_rank"] * 2 * 16 >= summary["train_images"] - 32
    assert summary["val_acc"] > 0.8


class _NaNAt(Hook):
    """Adds NaN to the loss of one batch (epoch and batch 1-based), as a diverging run would."""

    def __init__(self, epoch, batch):
        self.at, self.step = (epoch - 1, batch - 1), 0

    def on_epoch_start(self, trainer, epoch):
        self.epoch, self.step = epoch, 0

    def extra_loss(self, trainer, outputs, targets):
        self.step += 1
        return outputs.sum() * float("nan") if (self.epoch, self.step - 1) == self.at else None


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    splits, train, val, _ = _synthetic_loaders(num_train=256)
    torch.manual_seed(0)
    model = build_model("lenet", splits.info.num_classes, splits.info.in_channels)
    run = tmp_path / "run"
    with pytest.raises(NumericalError, match=rf"loss became NaN at epoch 2, batch 3 of {len(train)}: training stopped "
                                             rf"\({run / 'last'} keeps epoch 1\)"):
        fit(model, TrainConfig(epochs=3, lr=0.05), train, val, hooks=[_NaNAt(2, 3)], out_dir=run)
    last = load_checkpoint(run / "last")
    assert last.training["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last.state_dict.values())
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]


def test_diverging_cli_run_fails_and_nan_models_report_no_accuracy(tmp_path, cli_fails):
    run = tmp_path / "run"
    cli_fails(["train", "--model", "lenet", "--data", "synthetic", "--epochs", "2", "--lr", "1e30", "--out", str(run),
               "--no-progress"], "became", "at epoch 1, batch", "no checkpoint was written", "lower --lr")
    assert not (run / "last").exists() and not (run / "best").exists()
    cli_fails(["train", "--model", "lenet", "--data", "synthetic", "--lr", "inf", "--out", str(run)],
              "learning rate must be a positive number (got inf)")

    model = build_model("lenet", 10, 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    splits = load_dataset("synthetic", train_subset=64, test_subset=64)
    save_checkpoint(tmp_path / "nan", model, data_info=splits.info)
    cli_fails(["evaluate", "--checkpoint", str(tmp_path / "nan"), "--data", "synthetic", "--test-subset", "64"],
              "gives NaN or infinite outputs for 64 of 64 images")
    cli_fails(["export", "--checkpoint", str(tmp_path / "nan"), "--out", str(tmp_path / "nan.onnx")],
              "holds NaN or infinite values in")
    assert not (tmp_path / "nan.onnx").exists()
    nan = torch.full((4, 10), float("nan"))
    with pytest.raises(NumericalError, match="NaN or infinite outputs for 4 of 4 images"):
        top1_agreement(nan, nan)


def test_tensorrt_evaluation_refuses_nan_logits():
    """The TensorRT path reports no accuracy over NaN logits either (a stand-in runner: no GPU needed)."""
    from micronet.deploy.tensorrt.runner import evaluate as tensorrt_evaluate

    class NaNRunner:
        image_shape, fixed_batch, max_batch, min_batch = (1, 28, 28), None, 64, 1

        def __call__(self, images):
            return np.full((len(images), 10), np.nan, dtype=np.float32)

    split = load_dataset("synthetic", train_subset=32, test_subset=16).test
    with pytest.raises(NumericalError, match="the TensorRT engine gives NaN or infinite outputs for 16 of 16 images"):
        tensorrt_evaluate(NaNRunner(), split)
