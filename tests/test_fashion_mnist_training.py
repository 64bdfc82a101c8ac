"""Real data: a small model trained for a bounded time on a Fashion-MNIST subset clears an accuracy floor."""

import time

import pytest
import torch

from micronet.data import BatchLoader, default_augment, load_dataset
from micronet.engine import TrainConfig, evaluate, fit
from micronet.errors import DatasetError
from micronet.models import build_model


@pytest.fixture(scope="module")
def fashion():
    try:
        return load_dataset("fashion-mnist", val_fraction=0.1, seed=0, train_subset=10000, test_subset=2000)
    except DatasetError as exc:
        pytest.fail(f"Fashion-MNIST is part of the test set-up (make test installs it): {exc}")


@pytest.fixture(scope="module")
def trained(fashion):
    """A small NIN trained once for the tests below (about a minute on 2 cores)."""
    torch.manual_seed(0)
    model = build_model("nin", fashion.info.num_classes, fashion.info.in_channels, cfg=[32, 32, 32, 48, 48, 48, 64, 64])
    train = BatchLoader(fashion.train, 64, shuffle=True, augment=default_augment("fashion-mnist"), drop_last=True, channels_last=True)
    started = time.perf_counter()
    result = fit(model, TrainConfig(epochs=3, lr=0.05, progress=False), train, BatchLoader(fashion.val, 512))
    elapsed = time.perf_counter() - started
    test = evaluate(result.model, BatchLoader(fashion.test, 512))
    print(f"nin (small cfg) 9k-image subset, 3 epochs: test acc {test['acc']:.4f} in {elapsed:.0f} s")
    return result.model, test


def test_small_nin_reaches_80_percent_on_fashion_mnist_subset(trained):
    _, test = trained
    assert test["samples"] == 2000
    assert test["acc"] >= 0.80


def test_ptq_w8a8_loses_at_most_half_a_point(fashion, trained):
    from micronet.compression.quantization.core import calibrate
    from micronet.compression.quantization.wqaq.iao.quantize import prepare

    model, float_test = trained
    quantized = prepare(model.cpu(), ptq=True, percentile=0.9999)  # symmetric, per-channel weights
    calibrate(quantized, BatchLoader(fashion.train, 64, shuffle=True), num_batches=20)
    test = evaluate(quantized, BatchLoader(fashion.test, 512))
    print(f"PTQ W8A8: float {float_test['acc']:.4f} -> int8 {test['acc']:.4f}")
    assert float_test["acc"] - test["acc"] <= 0.005


@pytest.mark.slow
def test_default_demo_model_reaches_91_5_percent_on_full_fashion_mnist(tmp_path):
    """The README's `make demo` job: 8 epochs of the slimmed NIN on all 54k training images (~12 min, 2 cores)."""
    from micronet.cli import main

    run = tmp_path / "demo"
    assert main(["train", "--model", "nin", "--cfg", "64,48,32,64,64,64,128,128", "--epochs", "8", "--out", str(run), "--no-progress"]) == 0
    from micronet.engine import load_checkpoint

    assert load_checkpoint(run / "best").metrics["test_acc"] >= 0.915
