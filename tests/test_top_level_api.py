"""The top-level API (``import micronet as mn``): every name is the library function, and does its job on a
tiny model; ``import micronet`` itself stays light; the seed's self-checks still run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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


OWN_MODEL = '''
import torch
from torch import nn


class SmallNet(nn.Module):
    """Not in micronet's registry: a stem, two branches joined by a concat, and a residual add."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.left = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.left(x), self.right(x)], 1)
        x = torch.relu(x + self.body(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
'''


def _readme_block(marker: str) -> str:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    after = readme.split(f"<!-- runnable: {marker} -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_compress_your_own_model_runs(tmp_path):
    """The README's own-model block, run as written on a model trained here from a .py file outside the repo."""
    (tmp_path / "my_nets.py").write_text(OWN_MODEL)
    splits = load_dataset("fashion-mnist", train_subset=4000, test_subset=2000)
    torch.manual_seed(0)
    model = mn.build_model(f"{tmp_path / 'my_nets.py'}:SmallNet", num_classes=10, in_channels=1)
    train = BatchLoader(splits.train, 64, shuffle=True, seed=0, drop_last=True)
    result = mn.fit(model, mn.TrainConfig(epochs=3, optimizer="adam", lr=0.01, weight_decay=0), train)
    torch.save(result.model.state_dict(), tmp_path / "small_net.pt")

    block = _readme_block("own-model")
    assert len(block.strip().splitlines()) <= 15
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    numbers = re.fullmatch(r"float (\d\.\d{4})  ORT int8 (\d\.\d{4})", done.stdout.strip().splitlines()[-1])
    assert numbers, done.stdout
    float_acc, int8_acc = map(float, numbers.groups())
    assert float_acc >= 0.7 and abs(int8_acc - float_acc) <= 0.02  # Fashion-MNIST after 3 short epochs
    rebuilt = mn.load_model(tmp_path / "runs" / "small_int8").eval()
    assert rebuilt.arch.source.module == str((tmp_path / "my_nets.py").resolve())
