"""The command line: help, info, evaluate, and one-line errors with exit status 2."""

import pytest
import torch

from micronet.cli import main
from micronet.engine import save_checkpoint
from micronet.models import build_model


@pytest.mark.parametrize("command", ["train", "evaluate", "info"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_info_of_registry_model(capsys):
    assert main(["info", "--model", "lenet", "--input-shape", "1,28,28"]) == 0
    out = capsys.readouterr().out
    assert "0.0218" in out  # 21,840 parameters
    assert "0.48" in out  # 480,500 MACs
    assert "0.087" in out  # 87,360 bytes at 32 bits


def test_info_list_names_models_and_datasets(capsys):
    assert main(["info", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("lenet", "nin", "nin_bireal", "nin_gc", "resnet20", "resnet56", "mobilenetv2", "fashion-mnist", "cifar10",
                 "synthetic"):
        assert name in out


def test_unknown_model(capsys, cli_fails):
    cli_fails(["train", "--model", "vgg99", "--data", "synthetic"], "vgg99")


def test_cfg_of_wrong_length(capsys, cli_fails):
    cli_fails(["train", "--model", "nin", "--cfg", "8,8", "--data", "synthetic"], "cfg", "8")


def test_missing_dataset(capsys, tmp_path, cli_fails):
    cli_fails(["train", "--data", "fashion-mnist", "--data-root", str(tmp_path / "none")],
           "apt-get install -y dataset-fashion-mnist")


def test_wrong_data_folder_layout(capsys, tmp_path, cli_fails):
    cli_fails(["train", "--data", "cifar10", "--data-root", str(tmp_path)], "data_batch_1")


def test_unknown_dataset(capsys, cli_fails):
    cli_fails(["train", "--data", "imagenet22k"], "imagenet22k")


def test_checkpoint_of_another_model(capsys, tmp_path, cli_fails):
    save_checkpoint(tmp_path / "lenet", build_model("lenet", 10, 1))
    cli_fails(["train", "--model", "resnet20", "--data", "synthetic", "--init", str(tmp_path / "lenet")],
           "holds lenet", "resnet20")


def test_truncated_checkpoint(capsys, tmp_path, cli_fails):
    save_checkpoint(tmp_path / "ck", build_model("lenet", 10, 1))
    file = tmp_path / "ck" / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    cli_fails(["evaluate", "--checkpoint", str(tmp_path / "ck"), "--data", "synthetic"], "truncated")


def test_pickle_checkpoint(capsys, tmp_path, cli_fails):
    torch.save(build_model("lenet", 10, 1).state_dict(), tmp_path / "lenet.pth")
    cli_fails(["evaluate", "--checkpoint", str(tmp_path / "lenet.pth")], "pickle", "safetensors")


def test_train_then_evaluate_and_info(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--model", "lenet", "--data", "synthetic", "--epochs", "4", "--batch-size", "32",
                 "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "params (M)" in out
    assert main(["evaluate", "--checkpoint", str(run)]) == 0
    line = capsys.readouterr().out
    acc = float(line.split("accuracy ")[1].split("%")[0])
    assert acc >= 90.0, line
    assert main(["info", "--checkpoint", str(run)]) == 0
    assert "test_acc" in capsys.readouterr().out
