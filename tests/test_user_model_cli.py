"""The user's own model (``--model MODULE:CALLABLE --weights FILE``) through every verb of the command line and
through a pipeline: train -> prune -> fine-tune -> quantize (PTQ and QAT) -> export -> ONNX Runtime, resume,
and the one-line errors of bad inputs."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from micronet.cli import main
from micronet.engine import load_checkpoint

NETS = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))  # residual add


class TwoBranchNet(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.left = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.left(x), self.right(x)], dim=1)  # concat
        x = self.block(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def not_a_model():
    return 3
'''
DATA = ["--data", "fashion-mnist", "--train-subset", "3000", "--test-subset", "500"]
ADAM = ["--optimizer", "adam", "--lr", "0.01", "--weight-decay", "0", "--no-progress"]
FLOOR = 0.30  # 3x chance after 2 epochs on 3,000 images (about 0.5 measured)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A user's network in a .py file outside the repository, trained by `micronet train --model FILE:CALLABLE`,
    and its weights saved as the plain state dict a user's own training script writes."""
    root = tmp_path_factory.mktemp("user_model")
    (root / "nets.py").write_text(NETS)
    spec = f"{root / 'nets.py'}:TwoBranchNet"
    assert main(["train", "--model", spec, *DATA, "--epochs", "2", *ADAM, "--out", str(root / "fp32")]) == 0
    best = load_checkpoint(root / "fp32" / "best")
    assert best.arch.source is not None and best.arch.source.callable == "TwoBranchNet"
    assert best.metrics["test_acc"] > FLOOR
    torch.save(load_file(str(best.path / "model.safetensors")), root / "trained.pt")
    return root, spec, best.metrics["test_acc"]


def _accuracy(capsys, args: list[str]) -> float:
    capsys.readouterr()
    assert main(["evaluate", *args]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    return float(line.split("accuracy ")[1].split("%")[0]) / 100


def test_every_verb_takes_the_users_model(trained, tmp_path, capsys):
    root, spec, float_acc = trained
    own = ["--model", spec, "--weights", str(root / "trained.pt"), *DATA]
    assert abs(_accuracy(capsys, own) - float_acc) < 1e-9  # the .pt state dict is the trained model

    assert main(["prune", *own, "--percent", "0.3", "--out", str(tmp_path / "pruned")]) == 0
    pruned = load_checkpoint(tmp_path / "pruned" / "best")
    assert pruned.arch.source is not None and pruned.pruning_record is not None
    assert main(["train", "--prune-refine", str(tmp_path / "pruned"), *DATA, "--epochs", "1", *ADAM,
                 "--out", str(tmp_path / "pruned_ft")]) == 0
    assert load_checkpoint(tmp_path / "pruned_ft" / "best").metrics["test_acc"] > FLOOR

    assert main(["quantize", "iao", "--checkpoint", str(tmp_path / "pruned_ft"), *DATA, "--ptq", "--ptq-batch", "8",
                 "--out", str(tmp_path / "ptq")]) == 0
    assert main(["quantize", "iao", *own, "--bn-fuse", "--epochs", "1", "--lr", "0.001", "--no-progress",
                 "--out", str(tmp_path / "qat")]) == 0
    for name in ("ptq", "qat"):
        quantized = load_checkpoint(tmp_path / name / "best")
        assert quantized.quant_scheme is not None and quantized.arch.source is not None
        torch_acc = quantized.metrics["test_acc"]
        assert torch_acc > FLOOR, name
        assert main(["export", "--checkpoint", str(tmp_path / name), "--out", str(tmp_path / f"{name}.onnx")]) == 0
        onnx_acc = _accuracy(capsys, ["--onnx", str(tmp_path / f"{name}.onnx"), "--test-subset", "500"])
        assert abs(onnx_acc - torch_acc) <= 0.01, (name, onnx_acc, torch_acc)  # int8 ONNX = fake-quant within 5 of 500

    # export --int8 of the user's float model: the quantize workflow's PTQ, then QDQ
    assert main(["export", *own, "--int8", "--calib-batches", "4", "--out", str(tmp_path / "int8.onnx")]) == 0
    assert _accuracy(capsys, ["--onnx", str(tmp_path / "int8.onnx"), "--test-subset", "500"]) > FLOOR
    assert main(["fuse", *own, "--out", str(tmp_path / "fused")]) == 0
    fused_acc = load_checkpoint(tmp_path / "fused").metrics["fused_test_acc"]
    assert abs(fused_acc - float_acc) <= 0.004  # folding BN changes the float sums, not the decisions (2 of 500)
    capsys.readouterr()
    assert main(["info", "--model", spec, "--weights", str(root / "trained.pt"), "--input-shape", "1,28,28"]) == 0
    assert "0.0025" in capsys.readouterr().out  # GFLOPs of the 1x28x28 network
    assert main(["sensitivity", "iao", *own, "--images", "100", "--calibration-batches", "2",
                 "--out", str(tmp_path / "sens")]) == 0
    layers = json.loads((tmp_path / "sens" / "sensitivity.json").read_text())["layers"]
    assert {"head", "block.conv1"} <= {layer["layer"] for layer in layers}


def test_a_users_run_resumes_and_starts_from_weights(trained, tmp_path, capsys):
    root, spec, _ = trained
    run = tmp_path / "run"
    assert main(["train", "--model", spec, *DATA, "--epochs", "1", *ADAM, "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    last = load_checkpoint(run / "last")
    assert last.training["epoch"] == 2 and last.arch.source is not None
    # the same model spelled relative to the working folder is the same option on resume
    capsys.readouterr()
    assert main(["train", "--model", spec, "--weights", str(root / "trained.pt"), *DATA, "--epochs", "1", "--lr",
                 "0.0001", "--optimizer", "adam", "--no-progress", "--out", str(tmp_path / "ft")]) == 0
    out = capsys.readouterr().out
    # fine-tuning with a tiny learning rate from the trained weights stays near them (fresh weights: ~10%)
    assert load_checkpoint(tmp_path / "ft" / "best").metrics["test_acc"] > FLOOR, out


def test_a_pipeline_runs_the_users_model(trained, tmp_path):
    from micronet.pipeline import run_pipeline

    root, _, _ = trained
    config = tmp_path / "conf" / "pipeline.yaml"
    config.parent.mkdir()
    (config.parent / "nets.py").write_text(NETS)  # beside the config: the paths are relative to its folder
    (config.parent / "trained.pt").write_bytes((root / "trained.pt").read_bytes())
    config.write_text(textwrap.dedent("""\
        name: own
        data: {data: fashion-mnist, train_subset: 3000, test_subset: 500}
        measure: {onnx: true, openvino: false, batch_sizes: [1], repeats: 2, warmup: 1}
        steps:
          - name: fp32
            run: quantize
            model: nets.py:TwoBranchNet
            weights: trained.pt
            args: {method: iao, ptq: true, ptq_batch: 4}
            row: W7A8 PTQ of the given weights
          - name: pruned
            run: prune
            model: nets.py:TwoBranchNet
            weights: trained.pt
            args: {percent: 0.3}
          - name: pruned_ft
            run: finetune
            from: pruned
            args: {epochs: 1, optimizer: adam, lr: 0.01, weight-decay: 0, no-progress: true}
            row: pruned 30%
          - name: qat
            run: quantize
            from: pruned_ft
            args: {method: iao, bn_fuse: true, epochs: 1, lr: 0.001, no-progress: true}
            row: pruned + W7A8 QAT
          - name: scratch
            run: train
            model: nets.py:TwoBranchNet
            args: {epochs: 1, optimizer: adam, lr: 0.01, weight-decay: 0, no-progress: true}
        """))
    lines: list[str] = []
    report = run_pipeline(config, out=tmp_path / "out", echo=lines.append)
    assert f"--model {config.parent / 'nets.py'}:TwoBranchNet" in "\n".join(lines)
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {"fp32", "pruned_ft", "qat"}
    for name, row in rows.items():
        assert row["acc_torch"] > FLOOR * 100 and row["errors"] == [], (name, row)  # percent
        assert abs(row["acc_ort"] - row["acc_torch"]) <= 1.0, (name, row)  # within 5 of 500 test images
    again: list[str] = []
    run_pipeline(config, out=tmp_path / "out", echo=again.append)
    assert not any("] micronet " in line for line in again)  # nothing changed: every step cached


@pytest.mark.parametrize(("model", "fragments"), [
    ("no_such_module_xyz:Net", ["cannot build model no_such_module_xyz:Net", "ModuleNotFoundError"]),
    ("{nets}:Missing", ["has no attribute 'Missing'", "name a function or class defined there"]),
    ("{nets}:not_a_model", ["returned a int, not a torch.nn.Module"]),
])
def test_a_bad_model_is_one_line(trained, tmp_path, cli_fails, model, fragments):
    root, _, _ = trained
    spec = model.format(nets=root / "nets.py")
    cli_fails(["evaluate", "--model", spec, "--weights", str(root / "trained.pt"), *DATA], *fragments)
    cli_fails(["train", "--model", spec, *DATA, "--epochs", "1", "--out", str(tmp_path / "t")], *fragments)
    assert not (tmp_path / "t").exists()


def test_bad_weights_and_mixed_sources_are_one_line(trained, tmp_path, cli_fails):
    root, spec, _ = trained
    wrong = {k: v for k, v in torch.load(root / "trained.pt", weights_only=True).items() if not k.startswith("head.")}
    wrong["stem.0.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(wrong, tmp_path / "wrong.pt")
    cli_fails(["quantize", "iao", "--model", spec, "--weights", str(tmp_path / "wrong.pt"), *DATA, "--ptq",
               "--out", str(tmp_path / "q")], "does not fit TwoBranchNet", "missing 2 keys (head.bias, head.weight)",
              "shape differs for 1 key")
    assert not (tmp_path / "q").exists()
    cli_fails(["export", "--checkpoint", str(root / "fp32"), "--model", spec, "--weights", str(root / "trained.pt"),
               "--out", str(tmp_path / "x.onnx")], "pass either --checkpoint DIR or --model MODULE:CALLABLE --weights FILE, not both")
    cli_fails(["prune", "--model", spec, *DATA, "--out", str(tmp_path / "p")], "needs --weights FILE")
    cli_fails(["fuse", "--checkpoint", str(root / "fp32"), "--weights", str(root / "trained.pt"), "--out",
               str(tmp_path / "f")], "--weights FILE goes with --model MODULE:CALLABLE")
    cli_fails(["evaluate", "--model", spec, "--weights", str(root / "trained.pt")], "pass --data")
    cli_fails(["train", "--weights", str(root / "trained.pt"), *DATA], "pass --model too")
    cli_fails(["prune", "--out", str(tmp_path / "p")],
              "pass --checkpoint DIR, or your own model with --model MODULE:CALLABLE --weights FILE")


BAD_STEPS = [
    ("  - {name: a, run: quantize, model: nets.py, weights: w.pt, args: {method: iao}}\n",
     "step 'a': `model` is your own network as MODULE:CALLABLE (e.g. nets.py:Net), with `weights: FILE` (got model 'nets.py')"),
    ("  - {name: a, run: train}\n  - {name: b, run: quantize, from: a, model: 'nets.py:Net', weights: w.pt, args: {method: iao}}\n",
     "step 'b': `model` names the model a quantize step starts from, and so does `from`: keep one"),
    ("  - {name: a, run: quantize, model: 'nets.py:Net', args: {method: iao}}\n",
     "step 'a': a quantize step reads a trained model: add `weights: FILE` beside `model`"),
    ("  - {name: a, run: train, args: {model: 'nets.py:Net'}}\n",
     "step 'a': put your own model in the step's `model:` key (a .py path there is relative to the config file), not in args"),
    ("  - {name: a, run: prune, model: 'nets.py:Net', weights: gone.pt}\n", "step 'a': weights file DIR/gone.pt does not exist"),
]


@pytest.mark.parametrize(("steps", "message"), BAD_STEPS)
def test_a_bad_user_model_step_fails_before_anything_runs(tmp_path, steps, message):
    from micronet.errors import PipelineError
    from micronet.pipeline import load_config

    (tmp_path / "w.pt").write_bytes(b"")
    path = tmp_path / "p.yaml"
    path.write_text("steps:\n" + steps)
    with pytest.raises(PipelineError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}, line ")
    assert message.replace("DIR", str(tmp_path)) in str(error.value)
