"""Tests for micronet.compression.fusion: BatchNorm folding after training.

Equivalence is checked in eval mode against the unfused model: float nets within float tolerance, QAT
BN-folding convs bit for bit, sign folds by the exact signs after every sign activation.
"""

from __future__ import annotations

import torch
from torch import nn

from micronet.compression.fusion import fuse
from micronet.compression.quantization.core.lowbit import SignActivation
from micronet.compression.quantization.wbwtab import quantize as wbwtab
from micronet.compression.quantization.wqaq.iao import quantize as iao
from micronet.engine import load_checkpoint, save_checkpoint
from micronet.models import build_model

SMALL_NIN = [16, 16, 16, 32, 32, 32, 32, 32]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and affine parameters far from their defaults; γ has negative entries and two zeros
    (one with β = 0, whose BN output is exactly 0 and whose sign must be +1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)
                m.weight[0] = 0.0
                if n > 1:
                    m.weight[1], m.bias[1] = 0.0, 0.0
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
    return model


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    scale = a.abs().max().clamp(min=1e-6)
    assert (a - b).abs().max() <= rel * scale, f"max diff {(a - b).abs().max():.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------------------------------ float nets
def test_float_registry_nets_fold_every_batchnorm():
    for name in ("nin", "resnet20", "mobilenetv2"):
        torch.manual_seed(0)
        model = randomize_bn(build_model(name, 10, 3)).eval()
        before = state_copy(model)
        x = torch.randn(3, 3, 32, 32)
        fused, report = fuse(model)
        assert report.traced and not report.kept, (name, report.kept)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        assert all(layer.kind == "fold" for layer in report.layers)
        with torch.no_grad():
            assert_close(model(x), fused(x))
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), f"{name}: fuse edited the user's model"
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_conv1d_and_transposed_conv_fold_and_shared_conv_output_is_kept():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d(6)
            self.t, self.bt = nn.ConvTranspose2d(6, 5, 3, stride=2), nn.BatchNorm2d(5)
            self.c2, self.b2 = nn.Conv2d(5, 4, 1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = self.bt(self.t(y.unsqueeze(-1)))
            z = self.c2(y)
            return self.b2(z) + z.mean()  # c2 feeds the BN and the mean: it cannot absorb the BN

    model = randomize_bn(Net()).eval()
    x = torch.randn(2, 3, 7)
    fused, report = fuse(model)
    kinds = {layer.bn: layer.kind for layer in report.layers}
    assert kinds == {"b1": "fold", "bt": "fold", "b2": "kept"}
    assert "other consumers" in report.kept[0].detail
    with torch.no_grad():
        assert_close(model(x), fused(x))


def test_untraceable_model_uses_module_order():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.body(x)
            return self.body(-x)

    model = randomize_bn(Branchy()).eval()
    fused, report = fuse(model)
    assert not report.traced and len(report.fused) == 1
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(model(x), fused(x))


def test_fused_float_checkpoint_rebuilds_without_fusion_code(tmp_path):
    model = randomize_bn(build_model("nin", 10, 1, SMALL_NIN)).eval()
    fused, report = fuse(model)
    assert all(layer.bias_added for layer in report.fused)  # the registry convs have no bias
    save_checkpoint(tmp_path / "ck", fused)
    checkpoint = load_checkpoint(tmp_path / "ck")
    assert checkpoint.meta["extra"]["fusion"]["steps"][0]["stage"] == "float"
    rebuilt = checkpoint.build_model().eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), fused(x))
    save_checkpoint(tmp_path / "again", rebuilt)  # a rebuilt model keeps its record
    assert load_checkpoint(tmp_path / "again").fusion_record == checkpoint.fusion_record


def test_unfused_checkpoint_still_loads(tmp_path):
    model = build_model("nin", 10, 1, SMALL_NIN)
    save_checkpoint(tmp_path / "ck", model)
    assert "fusion" not in load_checkpoint(tmp_path / "ck").meta["extra"]
    load_checkpoint(tmp_path / "ck").build_model()


# ------------------------------------------------------------------------------------------ IAO QAT
def trained_iao(bits: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = randomize_bn(build_model("nin", 10, 1, SMALL_NIN), seed)
    q = iao.prepare(model, w_bits=bits, a_bits=bits, bn_fuse=True, pretrained_model=True)
    q.train()
    with torch.no_grad():
        for _ in range(2):
            q(torch.randn(8, 1, 28, 28))
    return q.eval()


def test_iao_bn_fold_qat_model_fuses_bit_exactly_and_reloads(tmp_path):
    from micronet.compression.quantization.core.bn_fold import QuantBNFuseConv2d
    from micronet.compression.quantization.core.modules import QuantConv2d

    q = trained_iao()
    fused, report = fuse(q)
    assert report.stage == "quantized" and {layer.kind for layer in report.layers} == {"bn_fold_conv"}
    assert not any(isinstance(m, QuantBNFuseConv2d) for m in fused.modules())
    assert sum(type(m) is QuantConv2d for m in fused.modules()) == 9
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        expected = q(x)
        assert torch.equal(fused(x), expected)
    save_checkpoint(tmp_path / "ck", fused)
    rebuilt = load_checkpoint(tmp_path / "ck").build_model().eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)


# ------------------------------------------------------------------------------------------ sign nets
EPS = torch.finfo(torch.float32).eps


def sign_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every SignActivation, in call order."""
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
             for m in model.modules() if isinstance(m, SignActivation)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def sign_fold_check(model: nn.Module, fused: nn.Module, report, x: torch.Tensor) -> tuple[int, int, int]:
    """Per sign-folded layer, fed the unfused model's input of that layer: (sign mismatches, mismatches
    outside the float rounding bound, pre-sign values inside it).

    The fold evaluates the same threshold test in another order (conv + b − μ + β·σ/γ, bias possibly added
    first inside the conv kernel, instead of γ·(conv + b − μ)/σ + β). With K multiply-adds per output,
    both differ from the exact value by at most (K + 4)·eps·(|γ|/σ·(Σ|w·x| + |b| + |μ|) + |β|) in BN-output
    units, so only pre-sign values inside that bound may legitimately get the other sign.
    """
    captured: dict[tuple[str, str], torch.Tensor] = {}
    layers = [layer for layer in report.layers if layer.kind == "sign_fold"]
    hooks = []
    for layer in layers:
        hooks.append(model.get_submodule(layer.conv).register_forward_hook(
            lambda m, i, o, n=layer.conv: captured.__setitem__((n, "in"), i[0].detach())))
        hooks.append(model.get_submodule(layer.bn).register_forward_hook(
            lambda m, i, o, n=layer.conv: captured.__setitem__((n, "pre"), o.detach())))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    mismatches = outside = inside = 0
    for layer in layers:
        conv, bn = model.get_submodule(layer.conv), model.get_submodule(layer.bn)
        xin, pre = captured[(layer.conv, "in")], captured[(layer.conv, "pre")]
        folded = fused.get_submodule(layer.conv)(xin)
        quantizer = getattr(conv, "weight_quantizer", None)
        w = quantizer.quantize(conv.weight) if quantizer is not None and quantizer.enabled.item() else conv.weight
        per = lambda t: t.detach().abs().reshape(1, -1, 1, 1)  # noqa: E731
        bias = per(conv.bias) if conv.bias is not None else 0.0
        sigma = per(torch.sqrt(bn.running_var + bn.eps))
        magnitude = conv._conv_forward(xin.abs(), w.abs(), None)
        bound = (w[0].numel() + 4) * EPS * (per(bn.weight) / sigma * (magnitude + bias + per(bn.running_mean)) + per(bn.bias))
        wrong = (pre >= 0) != (folded >= 0)
        near = pre.abs() <= bound
        mismatches += int(wrong.sum())
        outside += int((wrong & ~near).sum())
        inside += int(near.sum())
    return mismatches, outside, inside


class SmallSignNet(nn.Module):
    """conv → BN → sign → binary conv → BN → sign → binary conv → BN → sign → pool → linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, 12, 1), nn.BatchNorm2d(12), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def test_small_sign_net_keeps_every_sign():
    torch.manual_seed(0)
    model = wbwtab.prepare(randomize_bn(SmallSignNet()), W=2).eval()
    assert sum(isinstance(m, SignActivation) for m in model.modules()) == 3
    fused, report = fuse(model)
    assert [layer.kind for layer in report.layers] == ["sign_fold"] * 3
    assert [layer.weight_baked for layer in report.layers] == [False] * 3  # Q(−W) = −Q(W) held exactly
    assert all(layer.constant == 2 and layer.flipped > 0 for layer in report.layers)
    x = torch.randn(16, 3, 12, 12)
    mismatches, outside, _ = sign_fold_check(model, fused, report, x)
    assert (mismatches, outside) == (0, 0)
    assert all(torch.equal(a, b) for a, b in zip(sign_outputs(model, x), sign_outputs(fused, x)))
    with torch.no_grad():
        assert_close(model(x), fused(x), 1e-5)
    binary = fused.get_submodule("features.3").quantized_weight()  # ±α per channel, 0 where γ = 0
    levels = [set(channel.abs().unique().tolist()) for channel in binary]
    assert all(len(v) == 1 for v in levels) and levels[0] == {0.0}


def per_tensor_binary(model: nn.Module) -> nn.Module:
    """Binary weights with one α per tensor: zeroing the γ = 0 channels changes α, so Q(s·W) ≠ s·Q(W)."""
    from dataclasses import replace

    from micronet.compression.quantization.core import prepare

    scheme = wbwtab.wbwtab_scheme(W=2)
    return prepare(model, replace(scheme, weight=replace(scheme.weight, per_channel=False)))


def test_sign_fold_bakes_the_quantized_weight_when_the_flip_is_not_exact():
    torch.manual_seed(0)
    model = per_tensor_binary(randomize_bn(SmallSignNet())).eval()
    fused, report = fuse(model)
    assert [layer.weight_baked for layer in report.layers] == [False, True, True]
    assert not fused.get_submodule("features.3").weight_quantizer.enabled.item()
    x = torch.randn(16, 3, 12, 12)
    assert sign_fold_check(model, fused, report, x)[:2] == (0, 0)
    assert all(torch.equal(a, b) for a, b in zip(sign_outputs(model, x), sign_outputs(fused, x)))


def test_sign_fold_math_on_float_conv_including_zero_gamma():
    conv, bn = nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -0.5, 0.0, 0.0]))
        bn.bias.copy_(torch.tensor([0.3, 0.7, -0.2, 0.0]))
        bn.running_mean.copy_(torch.tensor([0.1, -0.4, 5.0, 5.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 1.0, 1.0]))
    model = nn.Sequential(conv, bn, SignActivation()).eval()
    fused, report = fuse(model)
    assert report.layers[0].kind == "sign_fold" and report.layers[0].flipped == 1 and report.layers[0].constant == 2
    folded = fused[0]
    sigma = torch.sqrt(bn.running_var + bn.eps)
    assert torch.equal(folded.weight[0], conv.weight[0]) and torch.equal(folded.weight[1], -conv.weight[1])
    assert torch.all(folded.weight[2:] == 0)
    expected_bias = torch.stack([
        conv.bias[0] - 0.1 + 0.3 * sigma[0] / 2.0,
        -(conv.bias[1] + 0.4 + 0.7 * sigma[1] / -0.5),
        torch.tensor(-0.2), torch.tensor(0.0)])
    assert torch.allclose(folded.bias, expected_bias.detach(), atol=1e-6)
    x = torch.randn(5, 2, 3, 3)
    with torch.no_grad():
        out = fused(x)
        assert torch.equal(out, model(x))
    assert torch.all(out[:, 2] == -1) and torch.all(out[:, 3] == 1)  # sign(β), sign(0) = +1


def test_real_binary_and_ternary_nets_keep_every_sign_and_prediction():
    for name, W in (("nin_gc", 2), ("nin", 3)):
        torch.manual_seed(1)
        model = wbwtab.prepare(randomize_bn(build_model(name, 10, 3), seed=1), W=W).eval()
        fused, report = fuse(model)
        kinds = [layer.kind for layer in report.layers]
        assert kinds == ["sign_fold"] * 8 + ["fold"], kinds  # the last BN feeds a ReLU: standard fold
        x = torch.randn(4, 3, 32, 32)
        mismatches, outside, inside = sign_fold_check(model, fused, report, x)
        assert outside == 0 and mismatches == 0, (name, mismatches, outside, inside)
        assert all(torch.equal(a, b) for a, b in zip(sign_outputs(model, x), sign_outputs(fused, x)))
        with torch.no_grad():
            a, b = model(x), fused(x)
        assert torch.equal(a.argmax(1), b.argmax(1))
        assert_close(a, b)


def test_sign_fold_only_in_front_of_sign_activations(tmp_path):
    # A = 32: the ReLUs stay; the BNs after binary convs must not get the sign fold (the original's bug).
    torch.manual_seed(0)
    model = wbwtab.prepare(randomize_bn(build_model("nin", 10, 1, SMALL_NIN)), W=2, A=32).eval()
    fused, report = fuse(model)
    assert "sign_fold" not in {layer.kind for layer in report.layers}
    assert [layer.conv for layer in report.fused] == ["features.0.conv", "features.10.conv"]  # the float convs
    assert all("quantization grid" in layer.detail for layer in report.kept)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert_close(model(x), fused(x))
    # a sign activation that is switched off is an identity: standard fold, not the sign fold
    signed = wbwtab.prepare(randomize_bn(SmallSignNet()), W=2).eval()
    signed.get_submodule("features.2").enabled.fill_(0)
    _, report = fuse(signed)
    assert report.layers[0].kind == "fold"


def test_fused_sign_net_checkpoint_round_trip(tmp_path):
    for per_channel in (True, False):
        torch.manual_seed(0)
        net = randomize_bn(build_model("nin", 10, 1, SMALL_NIN))
        model = (wbwtab.prepare(net, W=2) if per_channel else per_tensor_binary(net)).eval()
        fused, _ = fuse(model)
        save_checkpoint(tmp_path / "ck", fused)
        rebuilt = load_checkpoint(tmp_path / "ck").build_model().eval()
        x = torch.randn(3, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), fused(x))
        off = [m for m in rebuilt.modules() if hasattr(m, "weight_quantizer") and not m.weight_quantizer.enabled.item()]
        assert len(off) == (0 if per_channel else 7)  # the binary convs between the float first and last layers


def test_sign_fold_mismatches_stay_inside_the_rounding_bound():
    """Over several random binary NIN-GCs, every per-layer sign difference (if any) is a pre-sign value
    within float rounding of the threshold."""
    total = outside = 0
    for seed in range(4):
        torch.manual_seed(seed)
        model = wbwtab.prepare(randomize_bn(build_model("nin_gc", 10, 3), seed=seed), W=2).eval()
        fused, report = fuse(model)
        mismatches, far, _ = sign_fold_check(model, fused, report, torch.randn(4, 3, 32, 32))
        total, outside = total + mismatches, outside + far
    assert outside == 0 and total <= 4, (total, outside)
