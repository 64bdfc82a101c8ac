"""Clamping binary latent weights to [−1, 1] after each step: beyond ±1 they get no gradient and never return."""

from __future__ import annotations

import json

import torch

from micronet.cli import main
from micronet.compression.quantization.core.schedule import binary_latent_weights
from micronet.compression.quantization.wbwtab import quantize as wbwtab
from micronet.data import BatchLoader, load_dataset
from micronet.engine import TrainConfig, fit, load_checkpoint, load_model
from micronet.engine.hooks import LambdaHook
from micronet.models import build_model


def _binary_nin_with_large_latent_weights():
    torch.manual_seed(0)
    model = wbwtab.prepare(build_model("nin", 10, 1, cfg=[8] * 8), W=2, A=2)
    weight = binary_latent_weights(model)[2]
    with torch.no_grad():
        weight.mul_(100)  # most latent weights of this layer now lie beyond ±1
    return model, weight


def _train(model, hooks):
    splits = load_dataset("synthetic", train_subset=256, test_subset=32)
    loader = BatchLoader(splits.train, 32, shuffle=True, seed=0, drop_last=True)
    fit(model, TrainConfig(epochs=1, lr=0.5, weight_decay=0.0, momentum=0.0, progress=False), loader, hooks=hooks,
        log=lambda line: None)


def test_latent_weights_beyond_one_are_stuck_without_the_clamp_and_move_with_it():
    model, weight = _binary_nin_with_large_latent_weights()
    before = weight.detach().clone()
    beyond = before.abs() > 1
    assert beyond.float().mean() > 0.8
    _train(model, [])
    assert torch.equal(weight.detach()[beyond], before[beyond])  # zero gradient: not one of them moved
    assert not torch.equal(weight.detach()[~beyond], before[~beyond])

    model, weight = _binary_nin_with_large_latent_weights()
    _train(model, [wbwtab.ClampBinaryWeights()])
    after = weight.detach()
    assert after.abs().max() <= 1.0
    assert all(w.detach().abs().max() <= 1.0 for w in binary_latent_weights(model))
    # clamped to ±1 at the start, they get gradients again: many left the boundary
    assert (after[beyond].abs() < 1).float().mean() > 0.2


def test_cli_clamp_weights_is_saved_kept_on_resume_and_refused_elsewhere(tmp_path, capsys, cli_fails):
    common = ["--data", "synthetic", "--train-subset", "256", "--test-subset", "64", "--batch-size", "32", "--no-progress"]
    assert main(["train", "--model", "nin", "--cfg", "8,8,8,8,8,8,8,8", *common, "--epochs", "1",
                 "--out", str(tmp_path / "float")]) == 0
    run = tmp_path / "bnn"
    assert main(["quantize", "wbwtab", "--checkpoint", str(tmp_path / "float"), *common, "--clamp-weights", "--lr", "0.5",
                 "--epochs", "1", "--out", str(run)]) == 0
    assert "binary latent weights clamped to [-1, 1] after each step" in capsys.readouterr().out
    assert {"kind": "clamp_binary_weights"} in load_checkpoint(run / "last").training["hooks"]
    assert main(["quantize", "wbwtab", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert "binary latent weights clamped" in capsys.readouterr().out
    last = load_checkpoint(run / "last")
    assert last.training["epoch"] == 2 and {"kind": "clamp_binary_weights"} in last.training["hooks"]
    weights = binary_latent_weights(load_model(run / "last"))
    assert weights and all(w.abs().max() <= 1.0 for w in weights)

    cli_fails(["quantize", "dorefa", "--checkpoint", str(tmp_path / "float"), "--clamp-weights"],
              "--clamp-weights clamps binary weights of `micronet quantize wbwtab --W 2`; drop it for dorefa")
    cli_fails(["quantize", "wbwtab", "--checkpoint", str(tmp_path / "float"), "--W", "3", "--clamp-weights"],
              "--clamp-weights applies to binary weights (--W 2), not --W 3")
    plain = tmp_path / "plain"
    assert main(["quantize", "wbwtab", "--checkpoint", str(tmp_path / "float"), *common, "--epochs", "1",
                 "--out", str(plain)]) == 0
    cli_fails(["quantize", "wbwtab", "--resume", str(plain), "--epochs", "2", "--clamp-weights"],
              "was not started with --clamp-weights")


def test_pipeline_step_passes_clamp_weights(tmp_path):
    from micronet.pipeline import load_config
    from micronet.pipeline.config import step_argv

    path = tmp_path / "pipeline.yaml"
    path.write_text("name: t\ndata: {data: synthetic}\nsteps:\n"
                    "  - {name: fp32, run: train, args: {model: lenet, epochs: 1}}\n"
                    "  - {name: bnn, run: quantize, from: fp32, args: {method: wbwtab, W: 2, A: 2, clamp-weights: true}}\n")
    config = load_config(path)
    assert "--clamp-weights" in step_argv(config, config.step("bnn"))


def test_float_weights_first_trains_binary_activations_then_binarizes_and_keeps_a_binarized_best(tmp_path, capsys, cli_fails):
    from micronet.compression.quantization.core.lowbit import LowBitWeightQuantizer

    common = ["--data", "synthetic", "--train-subset", "256", "--test-subset", "64", "--batch-size", "32", "--no-progress"]
    assert main(["train", "--model", "nin", "--cfg", "8,8,8,8,8,8,8,8", *common, "--epochs", "1",
                 "--out", str(tmp_path / "float")]) == 0
    run = tmp_path / "two_stage"
    assert main(["quantize", "wbwtab", "--checkpoint", str(tmp_path / "float"), *common, "--float-weight-epochs", "1",
                 "--epochs", "2", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "float weights for 1 epoch(s), then binarized" in out and "epoch 2: weights binarized" in out
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"epoch"' in line]
    epochs = [entry for entry in log if "train_loss" in entry]
    assert "val_acc" not in epochs[0] and "val_acc_float_weights" in epochs[0] and "val_acc" in epochs[1]
    best = load_model(run / "best")
    quantizers = [m for m in best.modules() if isinstance(m, LowBitWeightQuantizer)]
    assert len(quantizers) == 7 and all(bool(q.enabled) for q in quantizers)
    layer = next(m for m in best.modules() if isinstance(getattr(m, "weight_quantizer", None), LowBitWeightQuantizer))
    assert layer.weight_quantizer(layer.weight).abs().unique(dim=None).numel() <= layer.weight.shape[0]  # ±α per channel
    assert {"kind": "float_weights_first", "epochs": 1} in load_checkpoint(run / "last").training["hooks"]

    cli_fails(["quantize", "wbwtab", "--checkpoint", str(tmp_path / "float"), *common, "--float-weight-epochs", "2",
               "--epochs", "2"], "--float-weight-epochs 2", "below --epochs (2)")
    cli_fails(["quantize", "wbwtab", "--checkpoint", str(tmp_path / "float"), *common, "--W", "32", "--float-weight-epochs",
               "1", "--epochs", "2"], "needs binary or ternary weights")
    cli_fails(["quantize", "dorefa", "--checkpoint", str(tmp_path / "float"), "--float-weight-epochs", "1"],
              "--float-weight-epochs belongs to `micronet quantize wbwtab --W 2/3`")
    cli_fails(["quantize", "wbwtab", "--resume", str(run), "--epochs", "3", "--float-weight-epochs", "2"],
              "was started with --float-weight-epochs 1, not 2")


def test_float_weights_first_switches_the_weight_quantizers_per_epoch():
    from micronet.compression.quantization.core.schedule import FloatWeightsFirst

    model, _ = _binary_nin_with_large_latent_weights()
    seen = []
    probe = LambdaHook(on_epoch_start=lambda trainer, epoch: seen.append(
        [bool(m.weight_quantizer.enabled) for m in trainer.model.modules() if hasattr(m, "weight_quantizer")]))
    splits = load_dataset("synthetic", train_subset=64, test_subset=32)
    loader = BatchLoader(splits.train, 32, shuffle=True, seed=0, drop_last=True)
    fit(model, TrainConfig(epochs=3, lr=0.01, progress=False), loader, hooks=[FloatWeightsFirst(2), probe],
        log=lambda line: None)
    # the 7 binarized layers (the first and last stay float convs) are switched on at the third epoch
    assert seen == [[False] * 7, [False] * 7, [True] * 7]


def test_cli_sign_gradient_option(tmp_path, cli_fails):
    common = ["--data", "synthetic", "--train-subset", "128", "--test-subset", "32", "--batch-size", "32", "--no-progress"]
    assert main(["train", "--model", "nin", "--cfg", "8,8,8,8,8,8,8,8", *common, "--epochs", "1",
                 "--out", str(tmp_path / "float")]) == 0
    assert main(["quantize", "wbwtab", "--checkpoint", str(tmp_path / "float"), *common, "--sign-gradient", "approx",
                 "--epochs", "1", "--out", str(tmp_path / "approx")]) == 0
    signs = [m for m in load_model(tmp_path / "approx" / "best").modules() if type(m).__name__ == "SignActivation"]
    assert len(signs) == 8 and all(m.gradient == "approx" for m in signs)
    cli_fails(["quantize", "wbwtab", "--checkpoint", str(tmp_path / "float"), "--A", "32", "--sign-gradient", "approx"],
              "--sign-gradient applies to sign activations (--A 2), not --A 32")
