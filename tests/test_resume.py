"""A resumed run continues with every option it was started with: restored when left out, refused when changed."""

from __future__ import annotations

import json

import pytest

from micronet.cli import main
from micronet.engine import load_checkpoint
from micronet.engine.resume import check_resumed_options, resume_options
from micronet.errors import ConfigError

DATA = ["--data", "synthetic", "--train-subset", "300", "--test-subset", "100", "--val-fraction", "0.2",
        "--data-seed", "3", "--batch-size", "32", "--no-progress"]


def _data_line(out: str) -> str:
    return next(line for line in out.splitlines() if "| data synthetic:" in line).split("| data ")[1].split(" |")[0]


def test_resumed_train_keeps_its_data_options_and_refuses_changed_ones(tmp_path, capsys, cli_fails):
    run = tmp_path / "run"
    assert main(["train", "--model", "lenet", *DATA, "--epochs", "1", "--out", str(run)]) == 0
    started = _data_line(capsys.readouterr().out)
    assert started == "synthetic: 240 train, 60 val, 100 test"
    recorded = load_checkpoint(run / "last").training["options"]
    assert recorded["train_subset"] == 300 and recorded["model"] == "lenet" and recorded["cfg"] == [10, 20, 50]

    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert _data_line(out) == started and "resumed at epoch 1/2" in out
    assert load_checkpoint(run / "last").training["options"] == recorded  # kept for the next resume

    for flag, value, held in (("--lr", "0.1", "0.05"), ("--train-subset", "400", "300"), ("--test-subset", "500", "100"),
                              ("--val-fraction", "0.1", "0.2"), ("--data-seed", "0", "3"), ("--model", "nin", "lenet"),
                              ("--batch-size", "64", "32"), ("--optimizer", "adam", "sgd")):
        cli_fails(["train", "--resume", str(run), "--epochs", "3", flag, value],
                  f"{run} was started with {flag} {held}, not {value}", f"drop {flag}")
    cli_fails(["train", "--resume", str(run), "--epochs", "3", "--data-root", str(tmp_path)],
              f"{run} was not started with --data-root", "drop --data-root")
    cli_fails(["train", "--resume", str(run), "--epochs", "3", "--sr"], "was not started with --sr")
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]

    # the same values, however spelled, are accepted: a pipeline resumes with its whole command line again
    assert main(["train", "--resume", str(run), "--model", "LeNet", "--lr", "5e-2", *DATA, "--epochs", "3",
                 "--out", str(run)]) == 0
    assert _data_line(capsys.readouterr().out) == started


def test_resumed_quantize_keeps_its_options(tmp_path, capsys, cli_fails):
    float_run, qat = tmp_path / "float", tmp_path / "qat"
    assert main(["train", "--model", "lenet", *DATA, "--epochs", "1", "--out", str(float_run)]) == 0
    assert main(["quantize", "iao", "--checkpoint", str(float_run), *DATA, "--epochs", "1", "--w_bits", "6",
                 "--out", str(qat)]) == 0
    started = _data_line(capsys.readouterr().out)
    cli_fails(["quantize", "iao", "--resume", str(qat), "--epochs", "2", "--lr", "0.5"],
              f"{qat} was started with --lr 0.002, not 0.5")
    cli_fails(["quantize", "iao", "--resume", str(qat), "--epochs", "2", "--w-bits", "8"],
              f"{qat} was started with --w-bits 6, not 8")
    cli_fails(["quantize", "dorefa", "--resume", str(qat), "--epochs", "2"], "was started with method iao, not dorefa")
    assert main(["quantize", "iao", "--resume", str(qat), "--epochs", "2", "--no-progress"]) == 0
    assert _data_line(capsys.readouterr().out) == started


def test_option_comparison_and_runs_recorded_before_options():
    flags = {"cfg": "--cfg", "lr": "--lr"}
    assert check_resumed_options("r", {"cfg": [64, 48], "lr": 0.1}, {"cfg": ["64,48"], "lr": 1e-1}, flags) == []
    with pytest.raises(ConfigError, match="r was started with --cfg 64 48, not 64 32"):
        check_resumed_options("r", {"cfg": [64, 48]}, {"cfg": ["64", "32"]}, flags)
    # an older run holds its TrainConfig and model only: those are checked, the data options cannot be
    training = {"config": {"lr": 0.05, "batch_size": 128}}
    restored, unchecked = resume_options("r", training, "lenet", {"train_subset": 10, "lr": 0.05}, {})
    assert unchecked == ["--train-subset"] and restored == {"lr": 0.05, "batch_size": 128, "model": "lenet"}
    with pytest.raises(ConfigError, match="r was started with --model lenet, not nin"):
        resume_options("r", training, "lenet", {"model": "nin"}, {})
