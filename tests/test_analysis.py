"""Tests for micronet.analysis: parameter counts, FLOPs/MACs, bit-aware size, tables."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from micronet.analysis import (
    FlopCount,
    ModelSummary,
    count_flops,
    count_parameters,
    format_table,
    model_size_bytes,
    parameter_bits,
    summarize,
)
from micronet.models import build_model, default_cfg

# LeNet on 1×28×28, by hand:
#   conv1 1→10 k5: 28→24, pool → 12     weights 10·1·25 = 250,  bias 10  →   260 params
#   conv2 10→20 k5: 12→8, pool → 4      weights 20·10·25 = 5000, bias 20 →  5020 params
#   fc1 20·4·4 = 320 → 50               weights 16000, bias 50            → 16050 params
#   fc2 50 → 10                         weights 500, bias 10              →   510 params
LENET_PARAMS = 260 + 5020 + 16050 + 510  # 21840
#   MACs: conv1 10·24·24·25 = 144000 (out channels · out pixels · in·k·k)
#         conv2 20·8·8·(10·25) = 320000, fc1 320·50 = 16000, fc2 50·10 = 500
LENET_MACS = 10 * 24 * 24 * 25 + 20 * 8 * 8 * 250 + 320 * 50 + 50 * 10  # 480500


def lenet():
    return build_model("lenet", in_channels=1)


def test_lenet_parameters_and_macs():
    assert LENET_PARAMS == 21840 and LENET_MACS == 480500
    m = lenet()
    assert count_parameters(m) == LENET_PARAMS
    fc = count_flops(m, (1, 28, 28))
    assert isinstance(fc, FlopCount)
    assert fc.macs == LENET_MACS
    assert fc.flops == 2 * LENET_MACS
    assert fc.by_module == {"conv1": 2 * 144000, "conv2": 2 * 320000, "fc1": 2 * 16000, "fc2": 2 * 500}


def test_plain_conv_macs_and_batch():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv, (3, 32, 32)).macs == 3 * 8 * 9 * 32 * 32
    assert count_flops(conv, (1, 3, 32, 32)).macs == 3 * 8 * 9 * 32 * 32
    assert count_flops(conv, (4, 3, 32, 32)).macs == 4 * 3 * 8 * 9 * 32 * 32  # a given batch is counted as given


def test_grouped_conv_macs():
    conv = nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False)
    assert count_flops(conv, (16, 8, 8)).macs == 32 * (16 // 4) * 9 * 8 * 8


def test_nin_parameters_by_hand():
    c = default_cfg("nin")  # [192, 160, 96, 192, 192, 192, 192, 192]
    widths = [3, *c, 10]
    kernels = [5, 1, 1, 5, 1, 1, 3, 1, 1]
    conv_weights = sum(widths[i] * widths[i + 1] * kernels[i] ** 2 for i in range(9))
    assert conv_weights == 965_568  # the original NIN's conv weights
    bn = 2 * sum(widths[1:])  # gamma and beta; convs have no bias
    assert count_parameters(build_model("nin")) == conv_weights + bn == 968_404


def test_nin_macs_match_spec():
    # the original NIN: 0.222 GMAC on 3×32×32
    assert round(count_flops(build_model("nin"), (3, 32, 32)).macs / 1e9, 3) == 0.222


def test_count_flops_restores_mode_and_buffers():
    m = build_model("resnet20")
    m.train()
    m.layer1.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    count_flops(m, (3, 32, 32))
    assert m.training and not m.layer1.training and m.layer2.training
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _ObservingIdentity(nn.Module):
    """Changes its buffer on every forward, even in eval mode (like a careless observer)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += 1
        return x


def test_count_flops_has_no_side_effects_on_buffers():
    m = nn.Sequential(_ObservingIdentity(), nn.Linear(4, 2))
    count_flops(m, (1, 1, 4))
    assert m[0].seen.item() == 0


def test_lenet_size_bytes():
    assert model_size_bytes(lenet()) == LENET_PARAMS * 4


class _FakeQuantizer(nn.Module):
    def __init__(self, bits):
        super().__init__()
        self.bits = bits


@pytest.mark.parametrize("bits", [2, torch.tensor(2), torch.tensor([2.0])])
def test_weight_quantizer_bits(bits):
    m = lenet()
    m.conv2.weight_quantizer = _FakeQuantizer(bits)
    pb = parameter_bits(m)
    assert pb["conv2.weight"] == 2
    assert pb["conv2.bias"] == 32 and pb["conv1.weight"] == 32
    assert set(pb) == {name for name, _ in m.named_parameters()}
    assert model_size_bytes(m) == (LENET_PARAMS - 5000) * 4 + 5000 * 2 / 8


def test_weight_quantizer_buffer_bits():
    q = nn.Module()
    q.register_buffer("bits", torch.tensor(4, dtype=torch.int32))
    m = lenet()
    m.fc1.weight_quantizer = q
    assert parameter_bits(m)["fc1.weight"] == 4


def test_weight_quantizer_bad_bits():
    m = lenet()
    m.fc1.weight_quantizer = _FakeQuantizer(1.5)
    with pytest.raises(ValueError, match="fc1"):
        parameter_bits(m)


def test_summarize():
    s = summarize(lenet(), (1, 28, 28))
    assert s == ModelSummary(params=LENET_PARAMS, macs=LENET_MACS, flops=2 * LENET_MACS, size_bytes=LENET_PARAMS * 4.0)
    assert s.to_json() == {"params": 21840, "macs": 480500, "flops": 961000, "size_bytes": 87360.0}
    assert s.as_row() == {"params (M)": 0.0218, "MMACs": 0.48, "MFLOPs": 0.961, "size (MB)": 0.0874}


def test_format_table_aligns_columns():
    rows = [{"model": "lenet", "params": 21840, "MMACs": 0.48},
            {"model": "nin", "params": 968404, "MMACs": 222.487}]
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4
    assert len({len(line) for line in lines}) == 1
    assert lines[0].split("|")[1:-1] == [" model ", " params ", "   MMACs "]
    assert lines[1] == "|-------|-------:|--------:|"
    assert lines[2] == "| lenet |  21840 |    0.48 |"
    assert lines[3] == "| nin   | 968404 | 222.487 |"
    # every pipe sits in the same column on every line
    assert len({tuple(i for i, ch in enumerate(line) if ch == "|") for line in lines}) == 1


def test_format_table_lists_and_missing_cells():
    text = format_table([["a", 1], ["bbb", 22, None]], headers=["name", "n", "x"])
    lines = text.splitlines()
    assert lines[2] == "| a    |   1 |     |"
    assert lines[3] == "| bbb  |  22 |     |"
    no_header = format_table([[1.5, "x"], [10.25, "yy"]])
    assert no_header.splitlines() == ["|   1.5 | x   |", "| 10.25 | yy  |"]
    assert format_table([{"a": 1}, {"b": 2.0}]).splitlines()[2:] == ["|   1 |     |", "|     |   2 |"]
