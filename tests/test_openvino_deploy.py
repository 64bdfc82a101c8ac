"""OpenVINO runs the same ONNX file as ONNX Runtime: same accuracy code, agreement on top-1.

The agreement test runs where OpenVINO is installed (an optional dependency); the missing-runtime error is
checked everywhere by hiding the module.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from micronet.compression.quantization.core.workflow import calibrate
from micronet.compression.quantization.wqaq.iao import quantize as iao
from micronet.data import BatchLoader, load_dataset
from micronet.deploy.onnx import export
from micronet.deploy.onnxruntime import benchmark, build_session, evaluate, run
from micronet.errors import DeployError
from micronet.models import build_model

SMALL_NIN = [32, 24, 16, 32, 32, 32, 64, 64]


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory):
    splits = load_dataset("fashion-mnist", train_subset=30 * 32, test_subset=1000)
    torch.manual_seed(0)
    model = build_model("nin", num_classes=10, in_channels=1, cfg=SMALL_NIN)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = list(BatchLoader(splits.train, 32, shuffle=True, seed=0))
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    quantized = iao.prepare(model.eval(), ptq=True)
    calibrate(quantized, [x for x, _ in batches[:4]])
    path = tmp_path_factory.mktemp("ov") / "nin_int8.onnx"
    export(quantized.eval(), path, torch.zeros(1, 1, 28, 28), exporter="legacy", metadata={"micronet.dataset": "fashion-mnist"})
    return path, splits


def test_openvino_agrees_with_onnxruntime(int8_file):
    pytest.importorskip("openvino")
    path, splits = int8_file
    images = torch.cat([x for x, _ in BatchLoader(splits.test, 500)]).numpy()
    ours = {runtime: np.concatenate([run(build_session(path, runtime=runtime), part) for part in np.split(images, 4)])
            for runtime in ("onnxruntime", "openvino")}
    assert ours["openvino"].shape == (1000, 10)
    assert (ours["openvino"].argmax(1) == ours["onnxruntime"].argmax(1)).mean() >= 0.999
    accuracy = {runtime: evaluate(path, splits.test, runtime=runtime)["acc"] for runtime in ours}
    assert abs(accuracy["openvino"] - accuracy["onnxruntime"]) <= 0.001 and accuracy["onnxruntime"] > 0.4
    # far above chance (10%) after 30 steps
    timing = benchmark(path, batch_sizes=[2], threads=[1], warmup=1, repeats=2, runtime="openvino")
    assert timing[0].optimization == "openvino" and timing[0].median_ms > 0


def test_openvino_computes_in_float32(tmp_path):
    """OpenVINO's CPU default on processors with bf16 instructions is bf16; micronet compiles in f32, so an
    FP32 file's outputs match ONNX Runtime's to float32 summation error (bf16 keeps 8 mantissa bits: its
    outputs would be ~1e-2 of the range apart)."""
    pytest.importorskip("openvino")
    torch.manual_seed(0)
    path = tmp_path / "fp32.onnx"
    export(build_model("nin", num_classes=10, in_channels=1, cfg=SMALL_NIN).eval(), path, torch.zeros(1, 1, 28, 28),
           exporter="legacy")
    session = build_session(path, runtime="openvino")
    assert str(session._compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")
    x = torch.rand(16, 1, 28, 28).numpy()
    ours, theirs = run(session, x), run(build_session(path), x)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_missing_openvino_says_how_to_install(int8_file, monkeypatch, cli_fails):
    path, _ = int8_file
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(DeployError, match="pip install openvino"):
        build_session(path, runtime="openvino")
    cli_fails(["evaluate", "--onnx", str(path), "--runtime", "openvino", "--test-subset", "10"], "pip install openvino")
    cli_fails(["benchmark", "--onnx", str(path), "--runtime", "openvino", "--threads", "1"], "pip install openvino")
