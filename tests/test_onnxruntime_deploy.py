"""ONNX Runtime deployment: sessions, accuracy, latency, int8 coverage and ORT's own PTQ, library and CLI.

Models are small registry nets exported with the legacy (TorchScript) exporter at opset 17 on 1×28×28
inputs with a dynamic batch; a LeNet trained for four short epochs on the synthetic set makes the accuracy checks
meaningful (confident predictions, far above chance). No test asserts a speed.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from micronet.cli import main
from micronet.data import BatchLoader, load_dataset
from micronet.deploy.onnx import GraphView, load_model
from micronet.deploy.onnxruntime import (
    benchmark,
    build_session,
    evaluate,
    int8_coverage,
    quantize_with_onnxruntime,
    run,
    top1_agreement,
)
from micronet.engine import evaluate as torch_evaluate
from micronet.errors import ConfigError, DeployError
from micronet.models import build_model

NIN_CFG = [16, 16, 16, 16, 16, 16, 32, 32]


def _export(model: torch.nn.Module, path, dynamic: bool = True, batch: int = 2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        torch.onnx.export(model.eval(), (torch.randn(batch, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None)
    return path


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", train_subset=1024, test_subset=300)


@pytest.fixture(scope="module")
def trained_lenet(data):
    """LeNet after four epochs on 924 synthetic images (Adam, about 1 s): about 95% test accuracy."""
    torch.manual_seed(0)
    model = build_model("lenet", num_classes=10, in_channels=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = BatchLoader(data.train, 64, shuffle=True)
    model.train()
    for epoch in range(4):
        loader.set_epoch(epoch)
        for images, labels in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    return model.eval()


def _calibration(data, n_batches: int = 2, batch: int = 32) -> list[np.ndarray]:
    return [x.numpy() for x, _ in list(BatchLoader(data.train, batch))[:n_batches]]


@pytest.fixture(scope="module")
def files(tmp_path_factory, data, trained_lenet):
    """FP32 and ORT-QDQ files of the trained LeNet, ResNet-20 and a slim NIN, plus a fixed-batch LeNet."""
    root = tmp_path_factory.mktemp("ort")
    torch.manual_seed(0)
    models = {"lenet": trained_lenet, "resnet20": build_model("resnet20", 10, 1),
              "nin": build_model("nin", 10, 1, cfg=NIN_CFG)}
    paths = {"models": models}
    for name, model in models.items():
        paths[name] = _export(model, root / f"{name}.onnx")
        paths[f"{name}_int8"] = quantize_with_onnxruntime(paths[name], root / f"{name}_int8.onnx", _calibration(data))
    paths["lenet_fixed"] = _export(trained_lenet, root / "lenet_fixed.onnx", dynamic=False, batch=1)
    return paths


@pytest.mark.parametrize("name", ["lenet", "resnet20", "nin"])
def test_fp32_session_matches_torch(files, name):
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = files["models"][name](x).numpy()
    for optimization in ("all", "disable"):
        got = run(build_session(files[name], threads=1, optimization=optimization), x.numpy())
        assert got.shape == (8, 10)
        assert np.abs(got - expected).max() < 1e-4, optimization


def test_evaluate_equals_torch_accuracy(files, data, trained_lenet):
    ours = evaluate(files["lenet"], data.test, batch_size=64)
    reference = torch_evaluate(trained_lenet, BatchLoader(data.test, 64), "cpu")
    assert ours["samples"] == reference["samples"] == 300
    assert ours["acc"] == reference["acc"]  # the same predictions, image by image
    assert ours["acc"] > 0.8  # trained: far above the 10% of chance
    assert abs(ours["loss"] - reference["loss"]) < 1e-5


def test_fixed_batch_model_is_evaluated_with_padding(files, data):
    dynamic = evaluate(files["lenet"], data.test, batch_size=64)
    fixed = evaluate(files["lenet_fixed"], data.test, batch_size=64)  # runs 300 batches of 1
    assert fixed["samples"] == 300 and fixed["acc"] == dynamic["acc"]


def test_evaluate_rejects_other_image_size(files):
    other = load_dataset("synthetic", test_subset=10, image_size=(32, 32)).test
    with pytest.raises(DeployError, match=r"\[.*1, 28, 28\].*1x32x32"):
        evaluate(files["lenet"], other)


def test_top1_agreement():
    a = np.array([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert top1_agreement(a, a) == 1.0
    assert top1_agreement(a, torch.tensor(a[:, ::-1].copy())) == 0.0
    with pytest.raises(ValueError):
        top1_agreement(a, a[:3])


def test_ort_quantizer_writes_a_qdq_file_that_keeps_accuracy(files, data, tmp_path):
    model = load_model(files["lenet_int8"])
    counts = GraphView(model).op_counts()
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
    fp32, int8 = evaluate(files["lenet"], data.test), evaluate(files["lenet_int8"], data.test)
    # Measured: 95.0% FP32 -> 92.7% INT8, top-1 agreement 0.93 (64 calibration images; 512 change nothing):
    # MinMax PTQ of this small, briefly trained LeNet costs a few points; the bounds leave room for that.
    assert int8["acc"] >= fp32["acc"] - 0.05
    x = np.concatenate([x.numpy() for x, _ in BatchLoader(data.test, 100)])
    agreement = top1_agreement(run(build_session(files["lenet"]), x), run(build_session(files["lenet_int8"]), x))
    assert agreement >= 0.9
    assert [p.name for p in files["lenet_int8"].parent.iterdir() if p.name.endswith(".tmp")] == []  # written atomically
    with pytest.raises(DeployError, match="no calibration batches"):
        quantize_with_onnxruntime(files["lenet"], tmp_path / "q.onnx", [])
    with pytest.raises(DeployError, match="fixed batch of 1"):
        quantize_with_onnxruntime(files["lenet_fixed"], tmp_path / "q.onnx", _calibration(data, 1, 4))


def test_benchmark_reports_every_combination(files):
    results = benchmark(files["lenet"], (1, 28, 28), batch_sizes=(1, 4), threads=(1, 2), warmup=1, repeats=5)
    assert [(r.batch, r.threads) for r in results] == [(1, 1), (4, 1), (1, 2), (4, 2)]
    for r in results:
        assert 0 < r.median_ms <= r.p90_ms
        assert r.images_per_s == pytest.approx(r.batch / (r.median_ms / 1e3))
        assert r.input_shape == (1, 28, 28) and len(r.loadavg) == 3
        assert r.machine["cpu_capability"] and r.machine["onnxruntime"]


def test_benchmark_errors(files):
    with pytest.raises(DeployError, match="exported with a fixed batch of 1: export with a dynamic batch"):
        benchmark(files["lenet_fixed"], batch_sizes=(64,), threads=(1,), warmup=0, repeats=1)
    with pytest.raises(DeployError, match=r"1x32x32"):
        benchmark(files["lenet"], (1, 32, 32), batch_sizes=(1,), threads=(1,), warmup=0, repeats=1)
    with pytest.raises(ConfigError, match="batch sizes"):
        benchmark(files["lenet"], batch_sizes=(0,), threads=(1,))


@pytest.mark.parametrize("name, convs, extra_int8", [
    ("resnet20", 21, {"QLinearAdd": 9, "QGemm": 1}),  # residual adds and the classifier fused too
    ("nin", 9, {"NhwcMaxPool": 2}),  # at level "all" max-pooling runs on uint8 in NHWC
])
def test_coverage_of_ort_quantized_convnets_is_complete(files, name, convs, extra_int8):
    report = int8_coverage(files[f"{name}_int8"])
    assert report.int8_ops["QLinearConv"] == convs
    assert all(report.int8_ops[op] == n for op, n in extra_int8.items())
    assert report.float_compute_nodes == [] and sum(report.float_ops.values()) == 0
    assert report.compute_coverage == 1.0
    assert (report.quantize_linear, report.dequantize_linear) == (1, 1)  # the model's input and output only
    assert "QLinearConv" in report.to_text() and report.to_json()["int8_ops"]["QLinearConv"] == convs


def test_coverage_shows_lenets_float_maxpool(files):
    """LeNet pools before its ReLU. ORT's quantizer folds the ReLU into the Q after the pool (zero point 0), so
    the DQ in front of MaxPool and the Q behind it have different scales and ORT keeps MaxPool in float."""
    for optimization in ("all", "extended"):
        report = int8_coverage(files["lenet_int8"], optimization=optimization)
        assert report.int8_ops["QLinearConv"] == 2 and report.int8_ops["QGemm"] == 2
        assert report.float_ops["MaxPool"] == 2 and report.float_compute_nodes == []
        assert report.quantize_linear >= 3 and report.dequantize_linear >= 3


def test_coverage_of_fp32_lists_every_conv_as_float(files):
    report = int8_coverage(files["resnet20"])
    assert len(report.float_compute_nodes) == 22  # 21 convolutions and the classifier's Gemm
    assert sum(report.int8_ops.values()) == 0 and report.compute_coverage == 0.0
    assert report.float_ops["Conv (nchwc)"] == 21  # level "all": ORT's blocked-layout convolutions
    assert int8_coverage(files["resnet20"], optimization="extended").float_ops["FusedConv"] > 0


@pytest.mark.parametrize("call", [
    lambda p: build_session(p),
    lambda p: evaluate(p, load_dataset("synthetic", test_subset=4).test),
    lambda p: benchmark(p, batch_sizes=(1,), threads=(1,)),
    lambda p: int8_coverage(p),
    lambda p: quantize_with_onnxruntime(p, p.with_name("out.onnx"), [np.zeros((1, 1, 28, 28), np.float32)]),
], ids=["session", "evaluate", "benchmark", "coverage", "quantize"])
def test_bad_files_raise_deploy_error(tmp_path, call):
    with pytest.raises(DeployError, match="no such ONNX file"):
        call(tmp_path / "missing.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("these are my notes, not a model\n")
    with pytest.raises(DeployError, match="not an ONNX model"):
        call(text)


def test_unknown_optimization_level(files):
    with pytest.raises(ConfigError, match="disable, basic, extended, all"):
        build_session(files["lenet"], optimization="max")


def test_cli_evaluate_onnx(files, capsys):
    assert main(["evaluate", "--onnx", str(files["lenet"]), "--data", "synthetic", "--train-subset", "100",
                 "--test-subset", "300", "--batch-size", "128"]) == 0
    out = capsys.readouterr().out
    acc = evaluate(files["lenet"], load_dataset("synthetic", train_subset=100, test_subset=300).test)["acc"]
    assert f"on synthetic test: accuracy {acc * 100:.2f}%" in out
    assert "300 images (ONNX Runtime" in out and "1 thread)" in out


def test_cli_benchmark_prints_table_and_coverage(files, capsys, tmp_path):
    assert main(["benchmark", "--onnx", str(files["nin_int8"]), "--batch-sizes", "1,2", "--threads", "1",
                 "--warmup", "1", "--repeats", "3", "--coverage", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "| batch | threads | median ms | p90 ms | images/s |" in out
    assert "input 1x28x28" in out and "cpu capability" in out
    assert "9 of 9 Conv/Gemm/MatMul nodes in int8" in out and "| QLinearConv" in out
    assert (tmp_path / "b.json").is_file()


def test_cli_errors(files, tmp_path, cli_fails):
    cli_fails(["evaluate", "--data", "synthetic"], "pass --checkpoint DIR or --onnx FILE")
    cli_fails(["evaluate", "--onnx", str(files["lenet"])], "pass --data")
    cli_fails(["evaluate", "--onnx", str(tmp_path / "none.onnx"), "--data", "synthetic"], "no such ONNX file")
    cli_fails(["benchmark", "--onnx", str(files["lenet_fixed"]), "--batch-sizes", "64", "--threads", "1"],
              "fixed batch of 1", "export with a dynamic batch")
    cli_fails(["benchmark", "--onnx", str(files["lenet"]), "--batch-sizes", "1,x"], "--batch-sizes")


def test_import_micronet_does_not_import_onnxruntime():
    code = "import sys, micronet, micronet.cli, micronet.deploy; assert 'onnxruntime' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_model_onnxruntime_cannot_load(tmp_path, cli_fails):
    from onnx import TensorProto, helper, save

    node = helper.make_node("NoSuchOp", ["input"], ["output"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 28, 28])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "odd.onnx"))
    with pytest.raises(DeployError, match="ONNX Runtime .* cannot load .*odd.onnx"):
        build_session(tmp_path / "odd.onnx")
    cli_fails(["benchmark", "--onnx", str(tmp_path / "odd.onnx")], "cannot load")


def test_benchmark_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "--help"])
    assert exit_info.value.code == 0 and "examples:" in capsys.readouterr().out
