"""The top-level API (``import micronet as mn``): every name is the library function, and does its job on a
tiny model; ``import micronet`` itself stays light; the seed's self-checks still run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import micronet as mn
from micronet.data import BatchLoader, load_dataset

X = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _tiny_nin():
    torch.manual_seed(0)
    model = mn.build_model("nin", num_classes=10, in_channels=1, cfg=[8, 8, 8, 16, 16, 16, 16, 16])
    for m in model.modules():  # BatchNorms with statistics, so that fusion and pruning change something
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.05, 1.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_names_are_the_library_functions():
    from micronet.compression.fusion import fuse
    from micronet.compression.pruning import prune
    from micronet.compression.quantization.core import calibrate, prepare
    from micronet.deploy.onnx import export
    from micronet.engine import fit, load_model

    assert (mn.prepare, mn.calibrate, mn.prune, mn.fuse, mn.export, mn.load_model, mn.fit) == (
        prepare, calibrate, prune, fuse, export, load_model, fit)
    assert set(mn.__all__) <= set(dir(mn))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mn.nope  # noqa: B018


def test_import_micronet_imports_no_torch():
    code = "import sys, micronet; assert 'torch' not in sys.modules, 'torch imported'; print(micronet.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == mn.__version__


def test_prune_fuse_and_reload(tmp_path):
    model = _tiny_nin()
    small = mn.prune(model, X[:1], percent=0.5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    fused, report = mn.fuse(small)
    assert report.fused and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert torch.allclose(fused(X), small.eval()(X), atol=1e-5)
    mn.save_checkpoint(tmp_path / "ck", fused)
    assert torch.equal(mn.load_model(tmp_path / "ck").eval()(X), fused(X))


def test_prepare_calibrate_export_runs_in_onnx_runtime(tmp_path):
    model = _tiny_nin()
    q = mn.prepare(model, mn.iao_scheme(a_bits=8))
    mn.calibrate(q, [X[:4], X[4:]])
    assert q.calibrated_batches == 2 and q.quant_scheme.name.startswith("iao")
    q.eval()
    report = mn.export(q, tmp_path / "q.onnx", X[:1])
    assert report.path.exists() and report.quantized and report.op_counts.get("QuantizeLinear", 0) > 0
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    ours = q(X).detach().numpy()
    theirs = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
    assert np.abs(ours - theirs).max() <= 0.05 * np.abs(ours).max()  # fake-quant and ORT int8: same codes
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.875


def test_fit_and_evaluate_learn_synthetic_data():
    splits = load_dataset("synthetic", val_fraction=0.2, seed=0)
    train = BatchLoader(splits.train, 32, shuffle=True, seed=0, drop_last=True)
    test = BatchLoader(splits.test, 256)
    torch.manual_seed(0)
    model = mn.build_model("lenet", splits.info.num_classes, splits.info.in_channels)
    before = mn.evaluate(model, test)["acc"]
    result = mn.fit(model, mn.TrainConfig(epochs=3, lr=0.05), train)
    after = mn.evaluate(result.model, test)
    assert after["samples"] == len(splits.test) and after["acc"] >= 0.8 > before + 0.3


@pytest.mark.parametrize("method", ["iao", "dorefa", "wbwtab"])
def test_seed_self_checks_still_run(method, capsys):
    manual = mn.quant_test_manual(method)
    auto = mn.quant_test_auto(method)
    out = capsys.readouterr().out
    assert out.count("quant_model is ready") == 2
    assert any(type(m).__name__.startswith("Quant") for m in manual.modules())
    assert auto.quantization_report.quantized
