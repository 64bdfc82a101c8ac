"""Tests for micronet.compression.packing: bit streams, packed artifacts, measured sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from micronet.cli import main
from micronet.compression.fusion import fuse
from micronet.compression.packing import (
    META_FILE,
    TENSOR_FILE,
    load_packed,
    pack_bits,
    packed_size,
    safetensors_tensor_bytes,
    save_packed,
    unpack_bits,
)
from micronet.compression.quantization.wbwtab import quantize as wbwtab
from micronet.compression.quantization.wqaq.dorefa import quantize as dorefa
from micronet.compression.quantization.wqaq.iao import quantize as iao
from micronet.engine import save_checkpoint
from micronet.errors import CheckpointError, QuantizationError
from micronet.models import build_model

SMALL_NIN = [16, 16, 16, 32, 32, 32, 32, 24]  # odd-ish channel counts for the per-channel vectors
SIZES = [1, 7, 13, 1001]


# ------------------------------------------------------------------------------------------ bit streams
@pytest.mark.parametrize("bits", range(1, 17))
def test_round_trip_every_width(bits):
    g = torch.Generator().manual_seed(bits)
    for numel in SIZES:
        codes = torch.randint(0, 1 << bits, (numel,), generator=g)
        codes[0], codes[-1] = (1 << bits) - 1, 0  # both extremes
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_size(numel, bits)
        assert packed.numel() == (2 * numel if bits > 8 else -(-numel * bits // 8))
        assert torch.equal(unpack_bits(packed, bits, numel), codes)


def test_round_trip_keeps_any_shape_in_c_order():
    codes = torch.randint(0, 8, (5, 3, 3, 3))  # odd channel count and odd element count
    assert torch.equal(unpack_bits(pack_bits(codes, 3), 3, codes.numel()).reshape(codes.shape), codes)
    assert unpack_bits(pack_bits(torch.zeros(0, dtype=torch.int64), 4), 4, 0).numel() == 0


def test_documented_bit_order():
    assert pack_bits(torch.tensor([1, 0, 1, 1]), 1).tolist() == [0b1101]  # code 0 → bit 0 of byte 0
    assert pack_bits(torch.tensor([3, 1]), 2).tolist() == [0b0111]
    assert pack_bits(torch.tensor([5, 6, 7]), 3).tolist() == [0b11110101, 0b1]  # code 2 straddles bytes
    assert pack_bits(torch.tensor([0x123, 0xBEEF]), 16).tolist() == [0x23, 0x01, 0xEF, 0xBE]  # little-endian
    assert pack_bits(torch.tensor([0x1FF]), 9).tolist() == [0xFF, 0x01]


def test_bad_inputs_are_refused():
    with pytest.raises(QuantizationError, match="1 to 16 bits"):
        pack_bits(torch.tensor([1]), 0)
    with pytest.raises(QuantizationError, match="1 to 16 bits"):
        pack_bits(torch.tensor([1]), 17)
    with pytest.raises(QuantizationError, match="integer codes"):
        pack_bits(torch.tensor([1.0]), 4)
    with pytest.raises(QuantizationError, match=r"\[0, 15\]"):
        pack_bits(torch.tensor([16]), 4)
    with pytest.raises(QuantizationError, match=r"\[0, 3\]"):
        pack_bits(torch.tensor([-1]), 2)
    with pytest.raises(QuantizationError, match="corrupted"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 7)


# ------------------------------------------------------------------------------------------ artifacts
def trained(model: nn.Module, steps: int = 2) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(8, 1, 28, 28))
    return model.eval()


def assert_identical_after_packing(model: nn.Module, path) -> dict:
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        expected = model.eval()(x)
    save_packed(model, path)
    loaded = load_packed(path)
    with torch.no_grad():
        got = loaded(x)
    assert torch.equal(got, expected)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    return json.loads((path / META_FILE).read_text())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("q_type,q_level", [(0, 0), (1, 1), (1, 0)])
def test_iao_models_reload_bit_identical(tmp_path, bits, q_type, q_level):
    torch.manual_seed(bits)
    model = trained(iao.prepare(build_model("nin", 10, 1, SMALL_NIN), w_bits=bits, a_bits=bits,
                                q_type=q_type, q_level=q_level))
    meta = assert_identical_after_packing(model, tmp_path / "packed")
    assert all(layer["stored"] == "packed" and layer["bits"] == bits for layer in meta["layers"])
    packed = next(layer for layer in meta["layers"] if layer["name"] == "features.1.conv")
    assert (packed["scale_axis"] is None) == (q_level == 1)


def test_fused_iao_qat_model_packs_and_unfused_one_keeps_float_with_reason(tmp_path):
    torch.manual_seed(0)
    model = trained(iao.prepare(build_model("nin", 10, 1, SMALL_NIN), w_bits=4, a_bits=4, bn_fuse=True))
    meta = assert_identical_after_packing(model, tmp_path / "unfused")
    assert {layer["stored"] for layer in meta["layers"]} == {"float"}
    assert "fuse the model first" in meta["layers"][0]["reason"]
    fused, _ = fuse(model)
    meta = assert_identical_after_packing(fused, tmp_path / "fused")
    assert {layer["stored"] for layer in meta["layers"]} == {"packed"}
    assert meta["extra"]["fusion"]["steps"][0]["stage"] == "quantized"


@pytest.mark.parametrize("preset", ["binary", "ternary", "dorefa4", "dorefa1"])
def test_low_bit_families_reload_bit_identical(tmp_path, preset):
    torch.manual_seed(0)
    net = build_model("nin", 10, 1, SMALL_NIN)
    model = {
        "binary": lambda: wbwtab.prepare(net, W=2),
        "ternary": lambda: wbwtab.prepare(net, W=3),
        "dorefa4": lambda: dorefa.prepare(net, w_bits=4, a_bits=4),
        "dorefa1": lambda: dorefa.prepare(net, w_bits=1, a_bits=2),
    }[preset]()
    meta = assert_identical_after_packing(trained(model), tmp_path / "packed")
    stored = [layer for layer in meta["layers"] if layer["stored"] == "packed"]
    assert stored and len(stored) == len(meta["layers"]), meta["layers"]
    if preset == "binary":  # one shared zero point (0.5), per-channel scales 2α
        assert all(layer["zero_point_axis"] is None and layer["scale_axis"] == 0 for layer in stored)


def test_fused_sign_net_reloads_identical(tmp_path):
    torch.manual_seed(0)
    model = wbwtab.prepare(build_model("nin", 10, 1, SMALL_NIN), W=2).eval()
    fused, _ = fuse(model)
    meta = assert_identical_after_packing(fused, tmp_path / "packed")
    assert {layer["stored"] for layer in meta["layers"]} == {"packed"}  # the sign fold kept the quantizers


@pytest.mark.parametrize("command", ["fuse", "pack"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def quantized_layer_bytes(path) -> tuple[int, int, int]:
    """(packed codes bytes, codes + scale + zero point bytes, FP32 bytes) of the packed layers, measured
    from the safetensors header of the artifact."""
    meta = json.loads((path / META_FILE).read_text())
    sizes = safetensors_tensor_bytes(path / TENSOR_FILE)
    layers = [layer for layer in meta["layers"] if layer["stored"] == "packed"]
    codes = sum(sizes[f"{layer['name']}.weight.packed"] for layer in layers)
    total = sum(sizes[f"{layer['name']}.weight.{s}"] for layer in layers for s in ("packed", "scale", "zero_point"))
    fp32 = sum(4 * torch.Size(layer["shape"]).numel() for layer in layers)
    return codes, total, fp32


def test_binary_packed_bytes_measured_from_the_file(tmp_path):
    """Binary weights are 1 bit each; the per-channel scale 2α is stored as float16 (α is kept on the
    float16 grid, so that is exact). NIN-GC's grouped 1×1 convs have only 128 weights (16 bytes of codes)
    per channel: with float32 scales the total would be ~1/25.8 of FP32, with float16 scales ~1/28.6."""
    ratios = {}
    for name in ("nin", "nin_gc"):
        torch.manual_seed(0)
        model = wbwtab.prepare(build_model(name, 10, 3), W=2).eval()
        save_packed(model, tmp_path / name)
        codes, total, fp32 = quantized_layer_bytes(tmp_path / name)
        assert codes * 32 == fp32  # every binary layer here has a multiple of 8 weights
        ratios[name] = fp32 / total
    assert ratios["nin"] >= 28, ratios
    assert ratios["nin_gc"] >= 28, ratios


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    model = trained(iao.prepare(build_model("nin", 10, 1, SMALL_NIN), w_bits=4, a_bits=4))
    path = save_packed(model, tmp_path / "packed")
    data = bytearray((path / TENSOR_FILE).read_bytes())
    data[-1] ^= 0xFF
    (path / TENSOR_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_packed(path)
    torch.save(model.state_dict(), path / TENSOR_FILE)
    with pytest.raises(CheckpointError):
        load_packed(path)
    with pytest.raises(CheckpointError, match="not a packed artifact"):
        load_packed(tmp_path / "missing")


def test_missing_tensor_and_shape_mismatch_are_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    from micronet.engine.checkpoint import file_sha256

    model = trained(iao.prepare(build_model("nin", 10, 1, SMALL_NIN), w_bits=4, a_bits=4))
    path = save_packed(model, tmp_path / "packed")
    tensors = load_file(str(path / TENSOR_FILE))
    del tensors["features.1.conv.weight.scale"]
    save_file(tensors, str(path / TENSOR_FILE))
    meta = json.loads((path / META_FILE).read_text())
    meta["files"][TENSOR_FILE] = {"bytes": (path / TENSOR_FILE).stat().st_size, "sha256": file_sha256(path / TENSOR_FILE)}
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="features.1.conv.weight.scale"):
        load_packed(path)


def test_model_without_architecture_record_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"needs a model built by micronet.models.build_model .* your own "
                                              r"network, build_model\('my_nets.py:build'\)"):
        save_packed(nn.Sequential(nn.Linear(2, 2)), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ CLI
def test_pack_and_info_show_measured_bytes(tmp_path, capsys):
    torch.manual_seed(0)
    model = wbwtab.prepare(build_model("nin", 10, 1, SMALL_NIN), W=2).eval()
    save_checkpoint(tmp_path / "ck", model)
    assert main(["pack", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "packed")]) == 0
    out = capsys.readouterr().out
    assert "packed artifact" in out and "total (quantized layers)" in out
    assert main(["info", "--checkpoint", str(tmp_path / "packed")]) == 0
    out = capsys.readouterr().out
    assert "packed nin" in out and "BinaryWeightQuantizer 1b" in out and "| packed |" in out
    total = next(line for line in out.splitlines() if line.startswith("| total"))
    cells = [c.strip() for c in total.strip("|").split("|")]
    assert float(cells[-1]) > 20  # FP32 / disk of the binary layers
    assert main(["info", "--checkpoint", str(tmp_path / "ck")]) == 0
    assert "float32" in capsys.readouterr().out


def test_pack_command_fuses_bn_folding_convs_first(tmp_path, capsys):
    """A QAT checkpoint with BN folding packs every conv (the command fuses first; fusion is exact), where
    the library's save_packed of the unfused model keeps them float (see above)."""
    torch.manual_seed(0)
    model = trained(iao.prepare(build_model("nin", 10, 1, SMALL_NIN), w_bits=4, a_bits=4, bn_fuse=True))
    save_checkpoint(tmp_path / "ck", model)
    assert main(["pack", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "packed")]) == 0
    assert "fused before packing" in capsys.readouterr().out
    meta = json.loads((tmp_path / "packed" / META_FILE).read_text())
    assert {layer["stored"] for layer in meta["layers"]} == {"packed"}
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "packed")(x), model.eval()(x))


def test_pipeline_packed_size_fuses_bn_folding_convs_like_the_command(tmp_path):
    """The pipeline's Packed (MB) column packs what `micronet pack` packs: a QAT BN-folding model's convs as
    codes, not float32 (its size had been 3.5× the fused one's on the demo)."""
    from types import SimpleNamespace

    from micronet.pipeline.measure import _packed_megabytes

    torch.manual_seed(0)
    model = trained(iao.prepare(build_model("nin", 10, 1, SMALL_NIN), w_bits=4, a_bits=4, bn_fuse=True)).eval()
    checkpoint, errors = SimpleNamespace(data_info=None, metrics={}), []
    megabytes = _packed_megabytes(model, checkpoint, tmp_path / "packed", errors)
    assert errors == []
    meta = json.loads((tmp_path / "packed" / META_FILE).read_text())
    assert {layer["stored"] for layer in meta["layers"]} == {"packed"}
    unfused = save_packed(model, tmp_path / "unfused")
    assert megabytes * 1e6 < sum(f.stat().st_size for f in Path(unfused).iterdir()) / 2


def test_fuse_command_prints_table_and_accuracies(tmp_path, capsys):
    from micronet.data import load_dataset

    torch.manual_seed(0)
    info = load_dataset("synthetic", test_subset=64).info
    model = build_model("nin", info.num_classes, info.in_channels, SMALL_NIN)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.running_mean, 0, 0.1)
    save_checkpoint(tmp_path / "ck", model, data_info=info)
    assert main(["fuse", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "fused"),
                 "--test_subset", "64"]) == 0
    out = capsys.readouterr().out
    assert "9 BatchNorms folded" in out and "| features.0.conv  | features.0.bn  | fold |" in out
    line = next(line for line in out.splitlines() if "after fusion" in line)
    before, after = (float(part.split("%")[0].split()[-1]) for part in line.split(" before, "))
    assert before == after, line
    assert main(["evaluate", "--checkpoint", str(tmp_path / "fused"), "--test_subset", "64"]) == 0


def test_evaluate_reads_a_packed_artifact_with_the_fake_quant_accuracy(tmp_path, capsys):
    from micronet.data import load_dataset

    torch.manual_seed(0)
    info = load_dataset("synthetic", test_subset=64).info
    model = wbwtab.prepare(build_model("nin", info.num_classes, info.in_channels, SMALL_NIN), W=2, A=2).eval()
    save_checkpoint(tmp_path / "ck", model, data_info=info)
    assert main(["pack", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "packed")]) == 0
    capsys.readouterr()
    results = []
    for directory in ("ck", "packed"):
        assert main(["evaluate", "--checkpoint", str(tmp_path / directory), "--test_subset", "64"]) == 0
        results.append(capsys.readouterr().out.split(": ", 1)[1])
    assert results[0] == results[1]  # same accuracy and loss to the printed digit
