"""Knowledge distillation: the loss, the hook in the training loop, and the --distill flags."""

import json
import math

import pytest
import torch
from torch import nn

from micronet.cli import main
from micronet.compression.fusion import fold_for_inference
from micronet.compression.quantization.wqaq.iao import quantize as iao
from micronet.data import BatchLoader, load_dataset
from micronet.engine import TrainConfig, evaluate, fit, save_checkpoint
from micronet.engine.distillation import Distillation, distillation_loss, load_teacher
from micronet.errors import ConfigError
from micronet.models import build_model


def test_loss_equals_hand_computed_kl():
    student = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 4.0]])
    T = 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = sum(math.exp(v / T) for v in s_row)
        zt = sum(math.exp(v / T) for v in t_row)
        for s, t in zip(s_row, t_row):
            p_t, p_s = math.exp(t / T) / zt, math.exp(s / T) / zs
            expected += p_t * (math.log(p_t) - math.log(p_s))
    expected = expected / 2 * T**2
    assert distillation_loss(student, teacher, T).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(teacher, teacher, T).item() == pytest.approx(0.0, abs=1e-7)


def test_gradient_pulls_student_towards_teacher():
    student = torch.zeros(1, 3, requires_grad=True)
    distillation_loss(student, torch.tensor([[3.0, 0.0, 0.0]]), 1.0).backward()
    # d/ds KL = p_s - p_t: the teacher's favourite class gets a negative gradient, the others positive
    assert student.grad[0, 0] < 0 < student.grad[0, 1]
    assert student.grad.sum().item() == pytest.approx(0.0, abs=1e-7)


class _Permuted(torch.nn.Module):
    """A teacher that is sure of the wrong class: a trained model's scores with the classes rotated."""

    def __init__(self, model, num_classes):
        super().__init__()
        self.model = model
        self.order = [(c + 1) % num_classes for c in range(num_classes)]

    def forward(self, x):
        return 3.0 * self.model(x)[:, self.order]


def _loaders():
    splits = load_dataset("synthetic", val_fraction=0.2, seed=0)
    return splits, BatchLoader(splits.train, 32, shuffle=True, seed=0, drop_last=True), BatchLoader(splits.test, 256)


def _agreement(model, teacher, loader):
    model.eval()
    with torch.no_grad():
        hits = [(model(x).argmax(1) == teacher(x).argmax(1)).float().mean().item() for x, _ in loader]
    return sum(hits) / len(hits)


def test_distilled_student_follows_the_teacher_not_the_labels():
    """With a teacher that contradicts the labels, a heavily weighted distillation term decides what the
    student learns: it agrees with the teacher, and the student trained on labels alone does not."""
    splits, train, test = _loaders()
    torch.manual_seed(0)
    trained = fit(build_model("lenet", splits.info.num_classes, 1), TrainConfig(epochs=4, lr=0.05), train).model
    teacher = _Permuted(trained.eval(), splits.info.num_classes)
    assert evaluate(teacher, test)["acc"] < 0.1  # the teacher is wrong on (nearly) every image
    agreement = {}
    for weight in (None, 5.0):
        torch.manual_seed(1)
        student = build_model("lenet", splits.info.num_classes, 1)
        hooks = [] if weight is None else [Distillation(teacher, weight=weight, temperature=1.0)]
        fit(student, TrainConfig(epochs=4, lr=0.01), train, hooks=hooks)
        agreement[weight] = _agreement(student, teacher, test)
    assert agreement[None] < 0.2
    assert agreement[5.0] > 0.8


def _trained_looking(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def test_teacher_runs_folded_and_channels_last_with_the_models_logits():
    model = _trained_looking(build_model("nin", 10, 1, [32, 24, 16, 32, 32, 32, 64, 64]))
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    hook = Distillation(fold_for_inference(model))  # what --distill builds
    assert not any(isinstance(m, nn.BatchNorm2d) for m in hook.teacher.modules())  # folded into the convs
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the user's model is untouched
    hook.on_batch(None, x, torch.zeros(8, dtype=torch.long))
    teacher = hook._teacher_logits
    assert hook._channels_last
    assert torch.allclose(teacher, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    assert torch.equal(teacher.argmax(1), expected.argmax(1))


class _ViewHead(nn.Module):
    """A model whose ``.view`` cannot read a channels-last conv output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).view(x.shape[0], -1))


def test_teacher_that_cannot_run_channels_last_falls_back_to_contiguous_memory():
    model = _ViewHead().eval()
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    hook = Distillation(model)
    for _ in range(2):
        hook.on_batch(None, x, torch.zeros(5, dtype=torch.long))
        assert torch.allclose(hook._teacher_logits, expected, atol=1e-5)
    assert not hook._channels_last


def test_a_quantized_teacher_is_not_folded():
    prepared = iao.prepare(_trained_looking(build_model("lenet", 10, 1)), a_bits=8, ptq=True)
    assert fold_for_inference(prepared) is prepared


def test_hook_rejects_bad_settings_and_order():
    teacher = build_model("lenet", 10, 1)
    for options in ({"weight": 0.0}, {"weight": float("nan")}, {"temperature": 0.0}, {"temperature": -1.0}):
        with pytest.raises(ConfigError, match="distillation"):
            Distillation(teacher, **options)
    with pytest.raises(RuntimeError, match="on_batch"):
        Distillation(teacher).extra_loss(None, torch.zeros(2, 10), torch.zeros(2, dtype=torch.long))
    hook = Distillation(teacher)
    hook.on_batch(None, torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match="same classes"):
        hook.extra_loss(None, torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))


def test_teacher_of_other_classes_or_dataset_is_refused(tmp_path):
    splits = load_dataset("synthetic", val_fraction=0.2, seed=0)
    save_checkpoint(tmp_path / "five", build_model("lenet", 5, 1))
    with pytest.raises(ConfigError, match="scores 5 classes but the student 10"):
        load_teacher(tmp_path / "five", 10)
    save_checkpoint(tmp_path / "synthetic", build_model("lenet", 10, 1), data_info=splits.info)
    with pytest.raises(ConfigError, match="trained on synthetic, the student trains on fashion-mnist"):
        load_teacher(tmp_path / "synthetic", 10, "fashion-mnist")
    assert isinstance(load_teacher(tmp_path / "synthetic", 10, "synthetic"), torch.nn.Module)


def _train(out, *extra):
    args = ["--data", "synthetic", "--batch-size", "32", "--out", str(out), "--no-progress", *extra]
    return main(["train", "--model", "lenet", "--epochs", "1", *args])


def test_quantize_with_distillation_logs_the_term_and_resumes_with_it(tmp_path, capsys):
    assert _train(tmp_path / "teacher") == 0
    student = tmp_path / "binary"
    args = ["quantize", "wbwtab", "--W", "2", "--A", "2", "--checkpoint", str(tmp_path / "teacher"), "--out", str(student),
            "--distill", str(tmp_path / "teacher"), "--distill-temperature", "3", "--epochs", "1", "--no-progress"]
    assert main(args) == 0
    assert f"distilling from {tmp_path / 'teacher'} (T=3, weight 1)" in capsys.readouterr().out
    assert main(["quantize", "wbwtab", "--resume", str(student), "--epochs", "2", "--no-progress"]) == 0
    log = [json.loads(line) for line in (student / "log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2]
    assert all(row["distill_loss"] > 0 for row in log)
    meta = json.loads((student / "last" / "micronet.json").read_text())
    assert {"kind": "distillation", "teacher": str(tmp_path / "teacher"), "weight": 1.0, "temperature": 3.0} in meta["training"]["hooks"]


def test_distillation_flag_errors(tmp_path, cli_fails):
    assert _train(tmp_path / "teacher") == 0
    cli_fails(["quantize", "iao", "--ptq", "--checkpoint", str(tmp_path / "teacher"), "--distill", str(tmp_path / "teacher")],
              "--distill", "--ptq does not train")
    cli_fails(["train", "--model", "lenet", "--data", "synthetic", "--epochs", "1", "--out", str(tmp_path / "s"),
               "--distill", str(tmp_path / "missing")], "missing")
    cli_fails(["train", "--model", "lenet", "--data", "synthetic", "--epochs", "1", "--out", str(tmp_path / "s"),
               "--distill", str(tmp_path / "teacher"), "--distill-weight", "-1"], "distillation weight must be a positive")
    assert _train(tmp_path / "plain") == 0
    cli_fails(["train", "--resume", str(tmp_path / "plain"), "--epochs", "2", "--distill", str(tmp_path / "teacher")],
              "not started with --distill")


def test_the_distill_flag_runs_the_teacher_folded(tmp_path):
    from types import SimpleNamespace

    from micronet.workflows.runs import distillation_hooks

    teacher = tmp_path / "teacher"
    assert main(["train", "--model", "nin", "--cfg", "8,8,8,8,8,8,8,8", "--epochs", "1", "--data", "synthetic",
                 "--batch-size", "32", "--out", str(teacher), "--no-progress"]) == 0
    options = SimpleNamespace(distill=str(teacher), distill_weight=1.0, distill_temperature=4.0, resume=None)
    (hook,) = distillation_hooks(options, None, SimpleNamespace(num_classes=10, name="synthetic"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in hook.teacher.modules())
    assert hook.source == str(teacher)
