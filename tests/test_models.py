"""Tests for micronet.models (registry, the six models) and micronet.base_module.op."""

from __future__ import annotations

import json
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from micronet.base_module.op import Add, Concat
from micronet.errors import ModelConfigError
from micronet.models import ModelArch, build_model, default_cfg, list_models, model_arch, register_model
from micronet.models.layers import ChannelBias, ChannelRepeat, ChannelShuffle, ConvBNAct
from micronet.models.registry import _REGISTRY

MODELS = ["lenet", "mobilenetv2", "nin", "nin_bireal", "nin_gc", "resnet20", "resnet56"]
SMALL_CFG = {
    "lenet": [6, 16, 32],
    "nin": [64, 48, 32, 64, 64, 64, 128, 128],
    "nin_bireal": [48, 48, 48, 48, 48, 48, 128, 128],
    "nin_gc": [64, 64, 64, 128, 128, 128, 256, 256],
    "resnet20": [16, 24, 48, 8, 8, 8, 16, 16, 16, 32, 32, 32],
    "resnet56": [16, 24, 48] + [8] * 9 + [16] * 9 + [32] * 9,
    "mobilenetv2": [16, 8, 12, 16, 32, 48, 80, 160, 16, 48, 72, 72, 96, 96, 96, 192, 192, 192, 192,
                    288, 288, 288, 480, 480, 480, 640],
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_registry_lists_every_model():
    assert list_models() == sorted(MODELS)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32)])
def test_forward_backward(name, shape):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=shape[1])
    model.train()
    out = model(torch.randn(shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 3])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", MODELS)
def test_small_cfg_builds_smaller_model(name):
    big = build_model(name)
    small = build_model(name, cfg=SMALL_CFG[name])
    assert small.arch.cfg == tuple(SMALL_CFG[name])
    assert n_params(small) < n_params(big)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_lenet_custom_cfg_channels():
    m = build_model("lenet", in_channels=1, cfg=[6, 16, 32])
    assert (m.conv1.out_channels, m.conv2.in_channels, m.conv2.out_channels) == (6, 6, 16)
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.in_features) == (16 * 16, 32, 32)
    # conv1 + conv2 + fc1 + fc2, each with bias
    assert n_params(m) == (1 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (256 * 32 + 32) + (32 * 10 + 10)


def nin_params(cfg, in_ch=3, classes=10):
    """Conv weights (no bias) plus BN gamma/beta for the nine NIN blocks."""
    k = [5, 1, 1, 5, 1, 1, 3, 1, 1]
    widths = [in_ch, *cfg, classes]
    return sum(widths[i] * widths[i + 1] * k[i] ** 2 + 2 * widths[i + 1] for i in range(9))


def test_nin_custom_cfg_channels_and_params():
    cfg = SMALL_CFG["nin"]
    m = build_model("nin", cfg=cfg)
    cs = convs(m)
    assert [c.out_channels for c in cs] == [*cfg, 10]
    assert [c.kernel_size[0] for c in cs] == [5, 1, 1, 5, 1, 1, 3, 1, 1]
    assert all(c.bias is None for c in cs)
    assert n_params(m) == nin_params(cfg)
    assert n_params(build_model("nin")) == nin_params(default_cfg("nin"))


def test_nin_gc_layout_follows_spec():
    cfg = SMALL_CFG["nin_gc"]
    m = build_model("nin_gc", cfg=cfg)
    cs = convs(m)
    assert [c.out_channels for c in cs] == [*cfg, 10]
    assert [c.groups for c in cs] == [1, 2, 2, 16, 4, 4, 32, 8, 1]
    assert [c.kernel_size[0] for c in cs] == [5, 1, 1, 3, 1, 1, 3, 1, 1]
    blocks = [b for b in m.features if isinstance(b, ConvBNAct)]
    shuffles = [b.shuffle.groups if b.shuffle is not None else None for b in blocks]
    assert shuffles == [None, None, 2, 2, 16, 4, 4, 32, None]
    pools = [i for i, b in enumerate(m.features) if isinstance(b, nn.MaxPool2d)]
    assert pools == [3, 7] and all(m.features[i].kernel_size == 2 for i in pools)
    # the original NIN-GC's default conv weights total 578,304
    assert sum(c.weight.numel() for c in convs(build_model("nin_gc"))) == 578_304


def test_channel_shuffle_permutation():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert ChannelShuffle(2)(x).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_resnet_custom_cfg_channels():
    cfg = SMALL_CFG["resnet20"]
    m = build_model("resnet20", cfg=cfg)
    assert m.conv1.out_channels == 16
    for s, stage in enumerate([m.layer1, m.layer2, m.layer3]):
        assert len(stage) == 3
        for b, block in enumerate(stage):
            assert block.conv1.out_channels == cfg[3 + 3 * s + b]
            assert block.conv2.out_channels == cfg[s]
    assert isinstance(m.layer1[0].shortcut, nn.Identity)
    assert isinstance(m.layer2[0].shortcut, nn.Sequential) and m.layer2[0].shortcut[0].stride == (2, 2)
    assert m.fc.in_features == 48


def test_mobilenetv2_custom_cfg_channels():
    cfg = SMALL_CFG["mobilenetv2"]
    m = build_model("mobilenetv2", cfg=cfg)
    blocks = list(m.features)[1:-1]
    assert len(blocks) == 17
    assert blocks[0].expand is None
    assert [b.depthwise.conv.out_channels for b in blocks] == cfg[8:25]
    assert all(b.depthwise.conv.groups == b.depthwise.conv.in_channels for b in blocks)
    assert m.features[0].conv.out_channels == 16 and m.features[-1].conv.out_channels == 640
    assert m.classifier.in_features == 640
    assert isinstance(m.features[0].act, nn.ReLU6)


def test_nin_bireal_layout_and_cfg_rule():
    from micronet.models.nin_bireal import BiRealBlock

    m = build_model("nin_bireal", cfg=SMALL_CFG["nin_bireal"])
    blocks = [b for b in m.features if isinstance(b, BiRealBlock)]
    assert [type(b.shortcut).__name__ for b in blocks] == ["Identity"] * 5 + ["ChannelRepeat", "Identity", "NoneType"]
    assert [b.conv.kernel_size[0] for b in blocks] == [1, 1, 5, 1, 1, 3, 1, 1]
    assert sum(isinstance(x, Add) for x in m.modules()) == 7
    assert [type(x).__name__ for x in m.features].count("MaxPool2d") == 2
    # a block whose BatchNorm writes zeros is its shortcut: the real-valued stream passes on unchanged,
    # widened by repeating channels (output c = input c mod 48)
    widening = blocks[5]
    nn.init.zeros_(widening.bn.weight)
    nn.init.zeros_(widening.bn.bias)
    x = torch.randn(2, 48, 8, 8)
    assert torch.equal(widening.eval()(x), x[:, torch.arange(128) % 48])
    with pytest.raises(ModelConfigError, match=r"cfg\[1\] = 48 for nin_bireal is narrower than cfg\[0\] = 64"):
        build_model("nin_bireal", cfg=[64, 48, 48, 48, 48, 48, 128, 128])


@pytest.mark.parametrize("name,adds", [("resnet20", 9), ("resnet56", 27), ("mobilenetv2", 10)])
def test_residual_adds_are_modules(name, adds):
    m = build_model(name)
    assert sum(isinstance(x, Add) for x in m.modules()) == adds


class _LeafTracer(fx.Tracer):
    # ChannelBias adds a parameter, not another activation, and ChannelRepeat joins copies of one tensor (same
    # grid): neither is a join a quantizer must observe, and each is itself a module it sees whole
    def is_leaf_module(self, m, qualname):
        return (isinstance(m, (Add, Concat, ChannelShuffle, ChannelBias, ChannelRepeat))
                or super().is_leaf_module(m, qualname))


@pytest.mark.parametrize("name", MODELS)
def test_no_functional_ops_hidden_in_forward(name):
    """Every add, relu, cat and flatten is a module call, so module-swapping quantizers see it."""
    graph = _LeafTracer().trace(build_model(name))
    hidden = {operator.add, operator.iadd, torch.add, torch.relu, F.relu, F.relu6, torch.cat, torch.flatten}
    assert [n.target for n in graph.nodes if n.op == "call_function" and n.target in hidden] == []
    assert [n.target for n in graph.nodes if n.op == "call_method" and n.target in {"relu", "relu_", "add", "add_"}] == []


def test_unknown_model_name():
    with pytest.raises(ModelConfigError) as e:
        build_model("resnet18")
    msg = str(e.value)
    assert "resnet18" in msg and all(n in msg for n in MODELS)
    with pytest.raises(ModelConfigError, match="lenet"):
        default_cfg("lenett")


def test_cfg_wrong_length():
    with pytest.raises(ModelConfigError, match=r"must have 8 channel counts \(got 7\)"):
        build_model("nin", cfg=[192] * 7)
    with pytest.raises(ModelConfigError, match=r"resnet20 must have 12"):
        build_model("resnet20", cfg=[16] * 30)


def test_cfg_bad_values():
    with pytest.raises(ModelConfigError, match="non-positive"):
        build_model("lenet", cfg=[10, 0, 50])
    with pytest.raises(ModelConfigError, match="list of integers"):
        build_model("lenet", cfg=[10, 20.5, 50])
    with pytest.raises(ModelConfigError, match="num_classes"):
        build_model("lenet", num_classes=0)


def test_nin_gc_divisibility():
    cfg = list(default_cfg("nin_gc"))
    cfg[2] = 100  # feeds conv 3 (groups 16)
    with pytest.raises(ModelConfigError, match=r"cfg\[2\] = 100 .*multiple of 16.*groups=16.*96 or 112"):
        build_model("nin_gc", cfg=cfg)
    cfg = list(default_cfg("nin_gc"))
    cfg[5] = 500  # feeds conv 6 (groups 32)
    with pytest.raises(ModelConfigError, match=r"multiple of 32"):
        build_model("nin_gc", cfg=cfg)
    cfg = list(default_cfg("nin_gc"))
    cfg[0] = 3
    with pytest.raises(ModelConfigError, match=r"multiple of 2"):
        build_model("nin_gc", cfg=cfg)
    # the original README's pruned cfg fits
    build_model("nin_gc", cfg=[154, 162, 144, 304, 320, 320, 608, 584])


def test_mobilenetv2_unexpanded_block_width():
    cfg = list(default_cfg("mobilenetv2"))
    cfg[8] = 40
    with pytest.raises(ModelConfigError, match=r"cfg\[8\] = 40 .*set cfg\[8\] = 32"):
        build_model("mobilenetv2", cfg=cfg)


@pytest.mark.parametrize("name", MODELS)
def test_arch_round_trip(name):
    model = build_model(name, num_classes=5, in_channels=1, cfg=SMALL_CFG[name])
    arch = model_arch(model)
    assert arch == ModelArch(name, 5, 1, tuple(SMALL_CFG[name]))
    back = ModelArch.from_json(json.loads(json.dumps(arch.to_json())))
    assert back == arch
    rebuilt = build_model(**back.kwargs())
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a)
    assert back.build().arch == arch


def test_default_arch_is_resolved():
    assert build_model("resnet20").arch.cfg == tuple(default_cfg("resnet20"))
    assert len(default_cfg("resnet56")) == 30 and len(default_cfg("mobilenetv2")) == 26


def test_model_arch_through_wrappers():
    m = build_model("lenet")
    assert model_arch(nn.DataParallel(m)) == m.arch
    with pytest.raises(ModelConfigError, match="build_model"):
        model_arch(nn.Linear(2, 2))


@pytest.mark.parametrize("bad,match", [
    ([1, 2], "JSON object"),
    ({"name": "nin", "num_classes": 10, "in_channels": 3}, "missing"),
    ({"name": "nin", "num_classes": 10, "in_channels": 3, "cfg": [], "x": 1}, "unknown"),
    ({"name": 3, "num_classes": 10, "in_channels": 3, "cfg": []}, "name"),
    ({"name": "nin", "num_classes": "10", "in_channels": 3, "cfg": []}, "num_classes"),
    ({"name": "nin", "num_classes": 10, "in_channels": True, "cfg": []}, "in_channels"),
    ({"name": "nin", "num_classes": 10, "in_channels": 3, "cfg": [1.5]}, "cfg"),
])
def test_arch_from_json_validates(bad, match):
    with pytest.raises(ModelConfigError, match=match):
        ModelArch.from_json(bad)


def test_register_model():
    name = "tiny_test_model"
    try:
        register_model(name, lambda k, c, cfg: nn.Sequential(nn.Conv2d(c, cfg[0], 3), nn.AdaptiveAvgPool2d(1),
                                                              nn.Flatten(), nn.Linear(cfg[0], k)), [4])
        m = build_model(name, num_classes=3, in_channels=1, cfg=[6])
        assert m.arch == ModelArch(name, 3, 1, (6,))
        assert name in list_models()
        with pytest.raises(ModelConfigError, match="already registered"):
            register_model(name, lambda k, c, cfg: nn.Identity(), [4])
    finally:
        _REGISTRY.pop(name, None)


def test_initialisation():
    torch.manual_seed(0)
    m = build_model("resnet20")
    assert all((bn.weight == 1).all() and (bn.bias == 0).all() for bn in m.modules() if isinstance(bn, nn.BatchNorm2d))
    assert (m.fc.bias == 0).all() and abs(m.fc.weight.std().item() - 0.01) < 0.003
    conv = m.layer3[0].conv2  # fan_out = 64·9: std = sqrt(2 / 576)
    assert abs(conv.weight.std().item() - (2 / 576) ** 0.5) < 0.01


def test_seed_net_aliases():
    from micronet.models import nin, nin_gc

    assert nin.Net().arch.name == "nin"
    assert nin_gc.Net(cfg=[154, 162, 144, 304, 320, 320, 608, 584]).arch.cfg[0] == 154


def test_add_and_concat():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    assert torch.equal(Add()(a, a), a + a)
    cat = Concat()
    assert torch.equal(cat(a, b), torch.cat([a, b], 1))
    assert torch.equal(cat([a, b]), torch.cat([a, b], 1))
    assert torch.equal(Concat(dim=0)((a, a)), torch.cat([a, a], 0))
    from micronet.base_module import op

    assert op.__all__ == ["Add", "Concat"]
