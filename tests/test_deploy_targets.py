"""Deployment targets: the int8 file depends on the chosen target, never on the CPU that exports it.

The portable target's exactness on CPUs without VNNI is arithmetic, not a measurement (this suite may run
on any x86 CPU): ONNX Runtime's u8s8 kernels there add pairs of uint8 × int8 products in saturating int16
(``vpmaddubsw``), and a pair of uint8 activations (≤ 255) times int8 weights within ±63 is at most
2·255·63 = 32130 ≤ 32767. The tests check the file holds such codes and types whatever
``micronet.machine`` reports.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch

import micronet.machine
from micronet.compression.quantization.core.scheme import QuantScheme
from micronet.compression.quantization.core.workflow import calibrate
from micronet.compression.quantization.wqaq.iao import quantize as iao
from micronet.data import BatchLoader, load_dataset
from micronet.deploy.onnx import GraphView, export, load_model, read_metadata
from micronet.deploy.onnxruntime import SaturatingKernelWarning, build_session, run
from micronet.deploy.targets import PORTABLE_WEIGHT_CODE_MAX, TARGETS, get_target
from micronet.errors import ConfigError
from micronet.models import build_model

INT16_MAX = 32767
SMALL_NIN = [32, 24, 16, 32, 32, 32, 64, 64]


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    splits = load_dataset("fashion-mnist", train_subset=30 * 32, test_subset=512)
    train = [(x, y) for x, y in BatchLoader(splits.train, 32)]
    return {"train": torch.cat([x for x, _ in train]), "labels": torch.cat([y for _, y in train]),
            "test": torch.cat([x for x, _ in BatchLoader(splits.test, 512)])}


@pytest.fixture(scope="module")
def trained_nin(data) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("nin", num_classes=10, in_channels=1, cfg=SMALL_NIN)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in zip(data["train"].split(32), data["labels"].split(32)):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval().state_dict()


def _ptq(state, data, **options) -> torch.nn.Module:
    model = build_model("nin", num_classes=10, in_channels=1, cfg=SMALL_NIN)
    model.load_state_dict(state)
    quantized = iao.prepare(model.eval(), ptq=True, **options)
    calibrate(quantized, data["train"][:128].split(64))
    return quantized.eval()


def _weight_codes(path) -> list[np.ndarray]:
    view = GraphView(load_model(path))
    return [view.constant(view.producer[conv.input[1]].input[0]) for conv in view.nodes("Conv")]


def _machine(monkeypatch, vnni: bool) -> None:
    flags = "avx2 avx512f avx512_vnni" if vnni else "avx2 avx512f"
    monkeypatch.setattr(micronet.machine, "cpu_flags", lambda: flags)
    monkeypatch.setattr(micronet.machine, "cpu_has_vnni", lambda: vnni)


def test_portable_file_is_the_same_on_every_cpu(tmp_path, monkeypatch, data, trained_nin):
    """Default target: 7-bit weights, int8 codes within ±63, uint8 activations, the target in the file,
    and byte-identical files whether the exporting CPU has VNNI or not."""
    model = _ptq(trained_nin, data)
    assert model.quant_scheme.target == "portable" and model.quant_scheme.weight.bits == 7
    files = {}
    for vnni in (True, False):
        _machine(monkeypatch, vnni)
        files[vnni] = export(model, tmp_path / f"vnni{vnni}.onnx", data["test"][:1], exporter="legacy").path
    assert files[True].read_bytes() == files[False].read_bytes()
    codes = _weight_codes(files[True])
    assert len(codes) == 9 and all(c.dtype == np.int8 for c in codes)
    widest = max(int(np.abs(c).max()) for c in codes)
    assert widest <= PORTABLE_WEIGHT_CODE_MAX and 2 * 255 * widest <= INT16_MAX
    view = GraphView(load_model(files[True]))
    assert {view.constant(q.input[2]).dtype for q in view.nodes("QuantizeLinear")} == {np.dtype(np.uint8)}
    assert read_metadata(files[True])["micronet.target"] == "portable"


@pytest.mark.parametrize("target, weight_type", [("portable", np.uint8), ("vnni", np.int8)])
def test_eight_bit_weights_follow_the_target_not_the_cpu(tmp_path, monkeypatch, data, trained_nin, target, weight_type):
    """8-bit codes (|w| up to 127) would saturate u8s8 pairs without VNNI (2·255·127 > 32767): the portable
    target writes them as uint8 with zero point 128 (exact u8u8 kernels), the vnni target as int8; on either
    exporting CPU. Both files compute what the fake-quant model computes."""
    model = _ptq(trained_nin, data, w_bits=8)
    assert 2 * 255 * 127 > INT16_MAX
    outputs = []
    for vnni in (True, False):
        _machine(monkeypatch, vnni)
        report = export(model, tmp_path / f"{target}{vnni}.onnx", data["test"][:1], exporter="legacy", target=target)
        codes = _weight_codes(report.path)
        assert {c.dtype for c in codes} == {np.dtype(weight_type)}
        assert read_metadata(report.path)["micronet.target"] == target
        outputs.append(report.path.read_bytes())
    assert outputs[0] == outputs[1]
    monkeypatch.undo()  # from here on, this machine's real CPU
    with torch.no_grad():
        reference = model(data["test"]).argmax(1).numpy()
    emulated = run(build_session(report.path, optimization="basic"), data["test"].numpy()).argmax(1)
    assert (emulated == reference).mean() >= 0.995  # the Q/DQ nodes computed in float, on every CPU
    if get_target(target).needs_vnni and not micronet.machine.cpu_has_vnni():
        with pytest.warns(SaturatingKernelWarning, match="--target vnni"):
            build_session(report.path)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", SaturatingKernelWarning)
        got = run(build_session(report.path), data["test"].numpy()).argmax(1)
    assert (got == reference).mean() >= 0.995  # on this CPU's int8 kernels


@pytest.mark.parametrize("target", ["portable", "vnni"])
def test_int8_kernels_without_vnni_warn_for_the_vnni_target_only(tmp_path, monkeypatch, data, trained_nin, target):
    """A vnni-target file would run on saturating u8s8 kernels on a CPU without VNNI: opening it there at an
    optimization level that fuses the int8 kernels warns; at ``basic`` (float Q/DQ), on a VNNI CPU or for the
    portable target nothing is said."""
    path = export(_ptq(trained_nin, data, w_bits=8), tmp_path / "m.onnx", data["test"][:1], exporter="legacy",
                  target=target).path
    for vnni, optimization in ((False, "all"), (False, "extended"), (False, "basic"), (True, "all")):
        _machine(monkeypatch, vnni)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build_session(path, optimization=optimization)
        said = [str(w.message) for w in caught if issubclass(w.category, SaturatingKernelWarning)]
        expected = target == "vnni" and not vnni and optimization != "basic"
        assert len(said) == int(expected), (vnni, optimization, said)
        if expected:
            assert "has no VNNI" in said[0] and "--target portable" in said[0]


def test_tensorrt_target_writes_signed_activations(tmp_path, data, trained_nin):
    model = _ptq(trained_nin, data, target="tensorrt")
    assert model.quant_scheme.weight.bits == 8 and model.quant_scheme.activation.signed
    report = export(model, tmp_path / "trt.onnx", data["test"][:1], exporter="legacy")
    view = GraphView(load_model(report.path))
    assert {view.constant(q.input[2]).dtype for q in view.nodes("QuantizeLinear")} == {np.dtype(np.int8)}
    assert read_metadata(report.path)["micronet.target"] == "tensorrt"


def test_target_is_kept_by_the_checkpoint_scheme():
    scheme = iao.iao_scheme(target="vnni")
    assert QuantScheme.from_json(scheme.to_json()).target == "vnni"
    legacy = scheme.to_json()
    del legacy["target"]  # a scheme written before targets existed
    assert QuantScheme.from_json(legacy).target == "portable"
    assert {name: t.weight_bits for name, t in TARGETS.items()} == {"portable": 7, "vnni": 8, "tensorrt": 8}


def test_unknown_target_is_refused(tmp_path, data, trained_nin):
    with pytest.raises(ConfigError, match="unknown target 'avx2': choose one of portable, vnni, tensorrt"):
        get_target("avx2")
    with pytest.raises(ConfigError, match="unknown target"):
        export(_ptq(trained_nin, data), tmp_path / "m.onnx", data["test"][:1], exporter="legacy", target="avx2")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_records_the_target(tmp_path, data):
    """`micronet export --int8` quantizes for the portable target by default (7-bit weights)."""
    from micronet.cli import main
    from micronet.data import load_dataset as _load
    from micronet.engine import save_checkpoint

    torch.manual_seed(0)
    checkpoint = tmp_path / "fp32"
    save_checkpoint(checkpoint, build_model("lenet", num_classes=10, in_channels=1),
                    data_info=_load("fashion-mnist", train_subset=64, test_subset=64).info)
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--int8", "--out", str(out), "--train-subset", "256",
                 "--calib-batches", "2", "--check-images", "0", "--exporter", "legacy"]) == 0
    assert read_metadata(out)["micronet.target"] == "portable"
    assert max(int(np.abs(c).max()) for c in _weight_codes(out)) <= PORTABLE_WEIGHT_CODE_MAX
    assert onnx.load(str(out)).producer_name == "micronet"
