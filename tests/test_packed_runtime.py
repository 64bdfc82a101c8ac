"""Tests for micronet.deploy.packed: the bit-packed binary runtime gives the PyTorch model's outputs on
every kernel path (AVX-512 VPOPCNTDQ / AVX-512BW / AVX2 / scalar where this CPU has them, and the
pure-torch reference everywhere)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from micronet.cli import main
from micronet.compression.fusion import fuse
from micronet.compression.packing import META_FILE, save_packed
from micronet.compression.quantization.wbwtab import quantize as wbwtab
from micronet.deploy.packed import ISA_ENV, PackedRuntimeWarning, available_isas, compile_packed, kernels, resolve_isa
from micronet.deploy.packed.layers import PackedConv2d
from micronet.engine import save_checkpoint
from micronet.errors import CheckpointError, DeployError
from micronet.models import build_model
from micronet.models.layers import ChannelBias

ISA_PATHS = available_isas()  # every path this machine can run, reference included
SMALL_NIN = [64, 48, 32, 64, 64, 64, 128, 128]  # the default pipeline's NIN: partial words (48, 32 channels)
SMALL_NIN_GC = [64, 64, 64, 128, 128, 128, 256, 256]


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BatchNorms: some negative γ (flipped thresholds), offsets that move thresholds."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) * 2 - 0.6
            m.bias.data = torch.randn(n, generator=g) * 0.5
            m.running_mean = torch.randn(n, generator=g) * 3
            m.running_var = torch.rand(n, generator=g) * 4 + 0.5
    return model


def binary(name: str, cfg=None, in_channels: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(name, 10, in_channels, cfg)
    return randomize_batchnorm(wbwtab.prepare(model, A=2, W=2), seed).eval()


def assert_same_logits(packed: torch.Tensor, expected: torch.Tensor) -> None:
    """The float epilogue within 1e-5 relative of the logits' scale, and the same top-1 everywhere."""
    scale = expected.abs().max().clamp(min=1e-6)
    assert float((packed - expected).abs().max() / scale) <= 1e-5
    assert torch.equal(packed.argmax(1), expected.argmax(1))


def binary_bireal() -> nn.Module:
    """The binary-friendly NIN: real-valued shortcuts (one widening by channel repeat), learned thresholds."""
    model = binary("nin_bireal", [48, 48, 48, 48, 48, 48, 128, 128], in_channels=3)
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, ChannelBias):
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.3
    return model


CASES = {
    "nin": lambda: binary("nin", SMALL_NIN),
    "nin_bireal": binary_bireal,
    "nin_fused": lambda: fuse(binary("nin", SMALL_NIN))[0],
    "resnet20": lambda: binary("resnet20", in_channels=3),
    "nin_gc": lambda: binary("nin_gc", SMALL_NIN_GC, in_channels=3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_kernel_path_gives_the_model_logits(case):
    model = CASES[case]()
    x = torch.randn(5, model.arch.in_channels if hasattr(model, "arch") else 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    outputs = {}
    for isa in ISA_PATHS:
        packed = compile_packed(model, isa=isa, float_layout="model")
        assert packed.isa == isa
        outputs[isa] = packed(x)
        assert_same_logits(outputs[isa], expected)
    for isa, out in outputs.items():  # integer popcounts and the same epilogue: identical bit for bit
        assert torch.equal(out, outputs["reference"]), isa
    convs = [m for m in packed.modules() if isinstance(m, PackedConv2d)]
    assert len(convs) == {"nin": 7, "nin_bireal": 7, "nin_fused": 7, "resnet20": 20, "nin_gc": 7}[case]


def test_bits_flow_between_binary_layers_and_fused_epilogues():
    packed = compile_packed(binary("nin", SMALL_NIN), isa="reference")
    convs = {n: m for n, m in packed.graph_module.named_modules() if isinstance(m, PackedConv2d)}
    assert all(m.bits_out for m in convs.values())  # BN + sign folded into thresholds, bits passed on
    kinds = dict(packed.report.packed)
    assert kinds["features.3"] == "max pool on bits (OR)"
    assert "folded into features.1.conv's threshold" in kinds["features.1.bn"]
    assert [n for n, _ in packed.report.torch] == ["features.10.conv"]  # the float classifier, listed


def test_residual_convs_write_floats_for_the_addition():
    packed = compile_packed(binary("resnet20", in_channels=3), isa="reference")
    convs = dict(packed.graph_module.named_modules())
    assert convs["layer1.0.conv1"].bits_out and not convs["layer1.0.conv2"].bits_out


class GroupedNet(nn.Module):
    """Depthwise, grouped with 48 channels per group (groups straddle 64-bit words), strided, dilated,
    padded convs, a channel shuffle and a padded max pool between sign activations."""

    def __init__(self) -> None:
        super().__init__()
        from micronet.models.layers import ChannelShuffle

        self.body = nn.Sequential(
            nn.Conv2d(3, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
            nn.Conv2d(96, 96, 3, padding=1, groups=96), nn.BatchNorm2d(96), nn.ReLU(),
            nn.Conv2d(96, 144, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(144), nn.ReLU(),
            ChannelShuffle(3), nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(144, 72, 3, padding=2, dilation=2, groups=3), nn.BatchNorm2d(72), nn.ReLU(),
            nn.Conv2d(72, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_grouped_depthwise_dilated_and_shuffled_layers_match():
    torch.manual_seed(0)
    model = randomize_batchnorm(wbwtab.prepare(GroupedNet(), A=2, W=2)).eval()
    x = torch.randn(3, 3, 17, 15)
    with torch.no_grad():
        expected = model(x)
    reference = compile_packed(model, isa="reference", float_layout="model")(x)
    assert_same_logits(reference, expected)
    for isa in ISA_PATHS:
        packed = compile_packed(model, isa=isa, float_layout="model")
        assert torch.equal(packed(x), reference), isa
    assert ("body.9", "channel shuffle on bits") in packed.report.packed


def test_padding_is_zero_not_minus_one():
    """A padded position contributes 0 to the dot product (the trained model pads its ±1 input with zeros):
    at a corner a 3×3 conv of all +1 inputs and weights sums 4 terms, not 9 (nor 9 − 2·5)."""
    net = nn.Sequential(nn.Conv2d(1, 8, 1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1, bias=False), nn.Conv2d(1, 1, 1))
    model = wbwtab.prepare(net, A=2, W=2).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(0.0)
        model[2].weight.fill_(0.5)
        model[3].weight.fill_(1.0)
        model[3].bias.fill_(0.0)
    packed = compile_packed(model, isa="reference", float_layout="model")
    conv = dict(packed.graph_module.named_modules())["2"]
    x = torch.ones(1, 1, 4, 4)
    dot = kernels.ReferenceKernels().conv(kernels.ReferenceKernels().pack_sign(x.expand(1, 8, 4, 4)), conv)
    assert dot[0, 0, 0, 0].item() == pytest.approx(0.5 * 8 * 4) and dot[0, 0, 1, 1].item() == pytest.approx(0.5 * 8 * 9)
    for isa in ISA_PATHS:
        assert torch.equal(compile_packed(model, isa=isa, float_layout="model")(x), model(x)), isa


def test_channels_last_float_layers_agree_on_top1():
    model = binary("nin", SMALL_NIN)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    out = compile_packed(model, float_layout="channels_last")(x)
    assert torch.equal(out.argmax(1), expected.argmax(1))


def test_quantized_edges_run_in_channels_last_with_a_one_pass_batchnorm():
    """With 8-bit edges the first conv is a quantized conv and its BatchNorm adds an int32 bias: in
    channels-last layout the conv runs channels-last too and the BatchNorm becomes a native one-pass
    BatchNorm computing the same affine map (within float rounding); the logits keep the model's top-1
    (bit-exact in the model layout)."""
    from micronet.compression.quantization.core.integer_bias import IntegerBiasBatchNorm2d
    from micronet.compression.quantization.core.workflow import calibrate
    from micronet.deploy.packed.compiler import _native_batchnorm

    torch.manual_seed(0)
    float_model = build_model("nin", 10, 1, SMALL_NIN)
    for m in float_model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.bias.data.uniform_(-0.3, 0.3)
    model = wbwtab.prepare(float_model, W=2, A=2, edge_bits=8)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    calibrate(model, [x])
    model.eval()
    bn = model.features[0].bn
    assert isinstance(bn, IntegerBiasBatchNorm2d) and bn.integer_shift() is not None
    with torch.no_grad():
        pre = model.features[0].conv(x)
        native, reference = _native_batchnorm(bn)(pre), bn(pre)
        assert (native - reference).abs().max() <= 1e-5 * reference.abs().max()
        expected = model(x)
        exact = compile_packed(model, float_layout="model")(x)
        fast = compile_packed(model, float_layout="channels_last")(x)
    assert torch.equal(exact, expected)
    assert (fast.argmax(1) == expected.argmax(1)).float().mean() >= 0.9


def test_packed_artifact_runs_like_the_model(tmp_path):
    model = fuse(binary("nin", SMALL_NIN))[0]
    save_packed(model, tmp_path / "packed")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    assert_same_logits(compile_packed(tmp_path / "packed", float_layout="model")(x), expected)


def test_artifact_of_another_version_is_one_line_error(tmp_path):
    save_packed(binary("nin", SMALL_NIN), tmp_path / "packed")
    meta = json.loads((tmp_path / "packed" / META_FILE).read_text())
    meta["format_version"] = 999
    (tmp_path / "packed" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        compile_packed(tmp_path / "packed")
    assert "\n" not in str(err.value)


def test_resident_binary_weights_are_a_32nd_of_fp32_when_channels_fill_words():
    packed = compile_packed(binary("nin", [64, 64, 64, 64, 64, 64, 128, 128]), isa="reference")
    weights, fp32 = packed.resident_binary_weight_bytes()
    assert weights * 32 == fp32


def test_taps_share_words_where_channels_fill_half_so_the_pipeline_nin_is_25x_smaller():
    packed = compile_packed(binary("nin", [64, 48, 32, 64, 64, 64, 128, 128]), isa="reference")
    convs = {name: m for name, m in packed.graph_module.named_modules() if isinstance(m, PackedConv2d)}
    five_by_five = convs["features.4.conv"]  # 32 input channels, 25 taps: 13 words per output channel
    assert five_by_five.weight_words.shape == (8, 13, 1, 8)
    weights, fp32 = packed.resident_binary_weight_bytes()
    assert fp32 / weights >= 25 and fp32 / packed.resident_binary_bytes() >= 25


def test_layers_the_kernels_do_not_cover_stay_in_torch_and_are_listed():
    model = binary("nin", SMALL_NIN)
    ternary = randomize_batchnorm(wbwtab.prepare(build_model("nin", 10, 1, SMALL_NIN), A=2, W=3)).eval()
    with pytest.raises(DeployError, match="no binary convolution"):
        compile_packed(ternary)
    with pytest.raises(DeployError, match="no binary convolution"):
        compile_packed(build_model("nin", 10, 1, SMALL_NIN).eval())
    skipped = randomize_batchnorm(wbwtab.prepare(build_model("nin", 10, 1, SMALL_NIN), A=2, W=2,
                                                 skip=["features.4.conv"])).eval()
    packed = compile_packed(skipped, isa="reference", float_layout="model")
    assert ("features.4.conv", "float weights") in packed.report.torch
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert_same_logits(packed(x), skipped(x))
    del model


def test_isa_is_chosen_by_argument_or_environment(monkeypatch):
    monkeypatch.setenv(ISA_ENV, "scalar")
    assert resolve_isa() == ("scalar" if "scalar" in ISA_PATHS else "reference")
    monkeypatch.setenv(ISA_ENV, "reference")
    assert compile_packed(binary("nin", SMALL_NIN)).isa == "reference"
    monkeypatch.setenv(ISA_ENV, "sse9")
    with pytest.raises(DeployError, match="unknown packed kernel 'sse9'"):
        resolve_isa()
    monkeypatch.delenv(ISA_ENV)
    assert resolve_isa() == ISA_PATHS[0]


def test_no_compiler_means_reference_path_with_one_warning(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp, "load", broken)
    kernels.native_extension.cache_clear()
    try:
        with pytest.warns(PackedRuntimeWarning, match="running the pure-torch reference path") as caught:
            assert resolve_isa() == "reference"
            assert resolve_isa("avx2") == "reference"
        assert len(caught) == 1
        model = binary("nin", SMALL_NIN)
        x = torch.randn(2, 1, 28, 28)
        with torch.no_grad():
            assert_same_logits(compile_packed(model, float_layout="model")(x), model(x))
    finally:
        kernels.native_extension.cache_clear()


def test_cli_evaluate_and_benchmark_with_the_packed_runtime(tmp_path, capsys, cli_fails):
    from micronet.data import load_dataset

    info = load_dataset("synthetic", test_subset=64).info
    torch.manual_seed(0)
    model = randomize_batchnorm(wbwtab.prepare(build_model("nin", info.num_classes, info.in_channels, SMALL_NIN),
                                               A=2, W=2)).eval()
    save_checkpoint(tmp_path / "ck", model, data_info=info)
    results = []
    threads = torch.get_num_threads()
    other = 1 if threads != 1 else 2
    for runtime in ("torch", "packed"):
        assert main(["evaluate", "--checkpoint", str(tmp_path / "ck"), "--test_subset", "64", "--runtime", runtime,
                     "--threads", str(other)]) == 0
        out = capsys.readouterr().out
        results.append(out.strip().splitlines()[-1].split(": ", 1)[1].split("images")[0])
        assert torch.get_num_threads() == threads  # the caller's thread count is restored
    assert results[0] == results[1]
    assert main(["benchmark", "--checkpoint", str(tmp_path / "ck"), "--runtime", "packed", "--batch-sizes", "1,4",
                 "--threads", "1", "--repeats", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "binary convolutions on packed bits" in out and out.count("| packed (") == 2
    cli_fails(["evaluate", "--onnx", "x.onnx", "--runtime", "packed"], "--runtime packed runs a checkpoint")
    cli_fails(["benchmark", "--runtime", "packed"], "the packed runtime times a checkpoint")
    float_ck = tmp_path / "float"
    save_checkpoint(float_ck, build_model("nin", info.num_classes, info.in_channels, SMALL_NIN), data_info=info)
    cli_fails(["evaluate", "--checkpoint", str(float_ck), "--test_subset", "64", "--runtime", "packed"],
              "no binary convolution", "micronet quantize wbwtab")


@pytest.mark.parametrize("channels", [1, 7, 64, 77, 130])
def test_pack_and_unpack_agree_with_the_reference_in_both_layouts(channels):
    g = torch.Generator().manual_seed(channels)
    x = torch.randn(2, channels, 5, 3, generator=g)
    x[0, 0, 0, 0] = 0.0  # sign(0) = +1
    x[1, -1, 0, 0] = float("nan")  # NaN -> -1 (bit 0), as the reference's x >= 0
    reference = kernels.ReferenceKernels()
    expected = reference.pack_sign(x)
    assert not kernels.bits_from_words(expected.words, channels)[1, 0, 0, -1]
    for isa in ISA_PATHS:
        ops = kernels.kernels_for(isa)
        for layout in (torch.contiguous_format, torch.channels_last):
            packed = ops.pack_sign(x.contiguous(memory_format=layout))
            assert torch.equal(packed.words, expected.words) and packed.channels == channels, (isa, layout)
        for channels_last in (False, True):
            assert torch.equal(ops.unpack(expected, channels_last), torch.where(x >= 0, 1.0, -1.0)), isa


@pytest.mark.parametrize("kernel, stride, padding", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 1)])
def test_max_pool_on_bits_is_the_float_max_pool_of_the_signs(kernel, stride, padding):
    x = torch.randn(2, 100, 9, 7, generator=torch.Generator().manual_seed(kernel + stride + padding))
    expected = torch.nn.functional.max_pool2d(torch.where(x >= 0, 1.0, -1.0), kernel, stride, padding)
    out_size = tuple(expected.shape[2:])
    for isa in ISA_PATHS:
        ops = kernels.kernels_for(isa)
        pooled = ops.max_pool(ops.pack_sign(x), (kernel, kernel), (stride, stride), (padding, padding), out_size)
        assert torch.equal(ops.unpack(pooled), expected), isa


def random_packed_conv(cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                       padding: int | tuple[int, int] = 0, dilation: int = 1,
                       groups: int = 1, bits_out: bool = True, seed: int = 0) -> PackedConv2d:
    """A packed conv with random ±1 weights and a random epilogue: thresholds around the dot products'
    range (some never met, some always), some flipped channels; or α on the float16 grid and a bias."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups)
    kh, kw = nn.modules.utils._pair(kernel)
    signs = torch.rand(cout, cin // groups, kh, kw, generator=g) < 0.5
    reach = (cin // groups) * kh * kw
    alpha = (torch.rand(cout, generator=g) + 0.1).half().float()
    bias = torch.randn(cout, generator=g)
    threshold = torch.randint(-reach - 2, reach + 3, (cout,), generator=g) if bits_out else None
    flip = torch.rand(cout, generator=g) < 0.3 if bits_out else None
    layer = PackedConv2d(conv, signs, alpha, bias, threshold, flip)
    assert torch.equal(layer.reference_weight(), signs.float() * 2 - 1)  # the packed words hold every sign
    return layer


CONV_GEOMETRIES = {  # (cin, cout, kernel, stride, padding, dilation, groups, batch, height, width)
    "1x1 one word": (64, 48, 1, 1, 0, 1, 1, 3, 6, 5),
    "1x1 odd channels": (37, 19, 1, 1, 0, 1, 1, 2, 7, 3),
    "5x5 padded, half a word": (32, 64, 5, 1, 2, 1, 1, 2, 9, 9),
    "2x2 stride 2, paired taps, odd channels": (19, 40, 2, 2, 1, 1, 1, 2, 7, 8),
    "1x3 dilated, paired taps with a lone last tap": (8, 16, (1, 3), 1, (0, 2), 2, 1, 2, 5, 9),
    "3x3 K not a multiple of 512": (130, 72, 3, 1, 1, 1, 1, 2, 7, 7),
    "3x3 stride 2 odd size": (64, 24, 3, 2, 1, 1, 1, 2, 9, 11),
    "3x3 wide, many blocks": (200, 128, 3, 1, 1, 1, 1, 1, 6, 9),
    "3x3 dilated": (40, 16, 3, 1, 2, 2, 1, 2, 8, 8),
    "grouped 8 per group": (96, 48, 3, 1, 1, 1, 3, 2, 6, 6),
    "grouped straddling words": (144, 96, 1, 1, 0, 1, 2, 1, 5, 7),
    "depthwise": (24, 24, 3, 1, 1, 1, 24, 2, 5, 5),
    "batch 1, output narrower than a tile": (70, 10, 3, 1, 0, 1, 1, 1, 4, 4),
    "one output pixel": (128, 32, 3, 1, 0, 1, 1, 2, 3, 3),
}


@pytest.mark.parametrize("bits_out", [True, False], ids=["bits out", "float out"])
@pytest.mark.parametrize("case", list(CONV_GEOMETRIES))
def test_every_kernel_path_computes_each_conv_geometry_exactly(case, bits_out):
    cin, cout, k, s, p, d, groups, n, h, w = CONV_GEOMETRIES[case]
    layer = random_packed_conv(cin, cout, k, s, p, d, groups, bits_out, seed=cin * cout + h * w)
    x = torch.randn(n, cin, h, w, generator=torch.Generator().manual_seed(3))
    reference = kernels.ReferenceKernels()
    packed = reference.pack_sign(x)
    expected = reference.conv(packed, layer)
    dots = torch.nn.functional.conv2d(reference.unpack(packed), layer.reference_weight(), None, s, p, d, groups)
    if bits_out:  # the reference itself: some channels on each side of their thresholds
        bits = kernels.bits_from_words(expected.words, cout)
        assert bits.any() and not bits.all()
    else:
        assert torch.equal(expected, dots * layer.alpha.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1))
    for isa in ISA_PATHS:
        out = kernels.kernels_for(isa).conv(packed, layer)
        if bits_out:
            assert torch.equal(out.words, expected.words) and out.channels == cout, isa
        else:
            assert torch.equal(out, expected), isa


def test_native_kernels_build_where_a_compiler_exists():
    """Otherwise every test above would compare the reference with itself."""
    import shutil

    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja: the reference path is the runtime here")
    assert "scalar" in ISA_PATHS


NATIVE_PATHS = [isa for isa in ISA_PATHS if isa != "reference"]


def conv_outputs(layer: PackedConv2d, isa: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(native, reference) outputs of one layer on the signs of ``x``, as comparable tensors."""
    reference = kernels.ReferenceKernels()
    packed = reference.pack_sign(x)
    out, expected = kernels.kernels_for(isa).conv(packed, layer), reference.conv(packed, layer)
    return (out.words, expected.words) if layer.bits_out else (out, expected)


@pytest.mark.parametrize("isa", NATIVE_PATHS)
def test_conv_plans_follow_input_sizes_and_in_place_changes(isa):
    """Plans are cached per input size: a second size gets its own, and thresholds, flips, weights, α or
    bias changed in place (as load_state_dict does) are read, never a stale copy."""
    for bits_out in (True, False):
        layer = random_packed_conv(40, 24, 3, 1, 1, bits_out=bits_out, seed=5)
        g = torch.Generator().manual_seed(4)
        for h, w in ((9, 9), (6, 11), (9, 9)):
            assert torch.equal(*conv_outputs(layer, isa, torch.randn(2, 40, h, w, generator=g)))
        assert len(layer.plans()) == 2
        x = torch.randn(2, 40, 9, 9, generator=g)
        before = conv_outputs(layer, isa, x)[0].clone()
        with torch.no_grad():
            if bits_out:
                layer.threshold[:24] = layer.threshold[:24].flip(0)
                layer.flip[:24] ^= 1
            else:
                layer.alpha.mul_(2)
                layer.bias.add_(1)
            layer.weight_words.bitwise_xor_(layer.group_mask[0].view(1, 1, -1, 1))  # every weight's sign
            layer._reference_weight = None
        after, expected = conv_outputs(layer, isa, x)
        assert torch.equal(after, expected) and not torch.equal(after, before)


@pytest.mark.parametrize("isa", NATIVE_PATHS)
def test_packed_models_copy_reload_and_run_under_inference_mode(isa):
    model = binary("nin", SMALL_NIN)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(x)
    packed = compile_packed(model, isa=isa)
    assert torch.equal(packed(x), packed(x))  # plans built, then reused
    twin = copy.deepcopy(packed)
    assert all("_native_plans" not in m.__dict__ for m in twin.modules())  # plans never travel with a copy
    assert torch.equal(twin(x), packed(x))
    other = compile_packed(binary("nin", SMALL_NIN, seed=1), isa=isa)
    other(x)
    other.load_state_dict(packed.state_dict())  # in place: the plans built for the old weights go stale
    assert torch.equal(other(x), packed(x))
    with torch.inference_mode():
        fresh = compile_packed(model, isa=isa)  # buffers are inference tensors: no version counters
        assert_same_logits(fresh(x), expected)
        assert torch.equal(fresh(x), packed(x))
