"""prune(): a zoo of topologies, exact equivalence with a zero-masked float model, sizes, record replay, errors."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from micronet.base_module.op import Add
from micronet.compression.pruning import apply_channel_record, channel_record, plan_pruning, prune
from micronet.errors import PruningError
from micronet.models import build_model


def randomize_bn(model, seed=0):
    """Distinct random γ (no ties), β and statistics, so selection and the equivalence test mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.05
            m.bias.data = torch.randn(n, generator=g) * 0.5
            m.running_mean.data = torch.randn(n, generator=g) * 0.2
            m.running_var.data = torch.rand(n, generator=g) + 0.5
    return model.eval()


def masked_reference(model, x, **options):
    """The original model, where every conv/linear reads zeros in place of the channels pruning removes."""
    graph, selection = plan_pruning(model, x, **options)
    ref = copy.deepcopy(model)
    masked = 0
    for path, (keep_in, _) in selection.plan().items():
        use = graph.uses[path]
        if use.kind in ("conv", "linear") and len(keep_in) < len(use.in_elems):
            mask = torch.zeros(len(use.in_elems))
            mask[keep_in] = 1

            def hook(mod, args, mask=mask):
                x = args[0]
                return (x * mask.view(1, -1, *([1] * (x.dim() - 2))),)

            ref.get_submodule(path).register_forward_pre_hook(hook)
            masked += 1
    assert masked > 0, "nothing was pruned: the equivalence check would be empty"
    return ref


class ConcatNet(nn.Module):
    """Two branches of different widths concatenated along channels, then a conv reading both."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(20, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.c(y), 1), 1))


class FunctionalNet(nn.Module):
    """Functional ops only (x + y, torch.cat, F.relu, F.adaptive_avg_pool2d, torch.flatten), a linear head on 4×4 maps."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.conv4, self.bn4 = nn.Conv2d(14, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10)
        self.fc = nn.Linear(10 * 4 * 4, 7)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        s = F.relu(a + self.bn2(self.conv2(a)))
        c = F.relu(self.bn3(self.conv3(x)))
        y = F.relu(self.bn4(self.conv4(torch.cat([s, c], 1))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 4), 1))


class GroupResidual(nn.Module):
    """ResNet-style blocks whose residual branch ends in a groups=4 conv (the case Torch-Pruning skipped)."""

    def __init__(self, width=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleDict({
                "conv1": nn.Conv2d(width, width, 1, bias=False), "bn1": nn.BatchNorm2d(width),
                "conv2": nn.Conv2d(width, width, 3, padding=1, groups=4, bias=False), "bn2": nn.BatchNorm2d(width),
                "add": Add()}))
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            y = b["bn2"](b["conv2"](F.relu(b["bn1"](b["conv1"](x)))))
            x = F.relu(b["add"](y, x))
        return self.fc(x.mean((2, 3)))


def _zoo():
    return {
        "nin": (lambda: build_model("nin"), (2, 3, 32, 32), 0.30),
        "nin_gc": (lambda: build_model("nin_gc"), (2, 3, 32, 32), 0.65),
        "resnet20": (lambda: build_model("resnet20"), (2, 3, 32, 32), 0.45),
        "resnet56": (lambda: build_model("resnet56"), (1, 3, 16, 16), 0.50),
        "mobilenetv2": (lambda: build_model("mobilenetv2"), (1, 3, 32, 32), 0.40),
        "concat": (ConcatNet, (2, 3, 16, 16), 0.60),
        "functional": (FunctionalNet, (2, 3, 16, 16), 0.60),
        "group_residual": (GroupResidual, (2, 3, 16, 16), 0.45),
    }


ZOO = _zoo()


@pytest.mark.parametrize("name", list(ZOO))
def test_pruned_model_equals_the_zero_masked_original(name):
    factory, shape, max_param_ratio = ZOO[name]
    torch.manual_seed(0)
    model = randomize_bn(factory())
    x = torch.randn(*shape)
    before = copy.deepcopy(model.state_dict())
    pruned = prune(model, x, percent=0.5)
    report = pruned.pruning_report

    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        out, original, reference = pruned.eval()(x), model(x), masked_reference(model, x, percent=0.5)(x)
    assert out.shape == original.shape
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert (out - original).abs().max() > 1e-4  # pruning did change the function: the check above can fail

    assert report.params_after < max_param_ratio * report.params_before
    assert report.flops_after < max_param_ratio * report.flops_before
    assert report.params_after == sum(p.numel() for p in pruned.parameters())
    assert any(r.out_after < r.out_before for r in report.layers)
    json.dumps(report.to_json())
    assert "params:" in report.table() and "FLOPs:" in report.table()


def test_group_conv_inside_residual_is_pruned_per_group():
    torch.manual_seed(0)
    model = randomize_bn(GroupResidual())
    pruned = prune(model, torch.randn(1, 3, 16, 16), percent=0.5, normal_regular=8)
    widths = {pruned.stem[0].out_channels}
    for b in pruned.blocks:
        conv2 = b["conv2"]
        assert conv2.groups == 4 and conv2.in_channels % 4 == 0 and conv2.out_channels % 4 == 0
        widths.add(conv2.out_channels)
        assert b["conv1"].out_channels % 8 == 0 and b["conv1"].out_channels < 32
    assert len(widths) == 1 and widths.pop() in (8, 16, 24)  # the residual stage shrank as one, to a multiple of 8
    assert pruned.pruning_report.unprunable[0].layers == ["fc"]
    assert pruned.pruning_report.flops_after < 0.5 * pruned.pruning_report.flops_before


@pytest.mark.parametrize("name,n", [("nin", 8), ("mobilenetv2", 8), ("resnet20", 4), ("nin_gc", 8)])
def test_normal_regular_gives_multiples_of_n(name, n):
    torch.manual_seed(0)
    model = randomize_bn(build_model(name))
    x = torch.randn(1, 3, 32, 32)
    pruned = prune(model, x, percent=0.5, normal_regular=n)
    changed = 0
    for row in pruned.pruning_report.layers:
        if row.out_after != row.out_before:
            assert row.out_after % n == 0, row
            changed += 1
    assert changed >= 5
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), masked_reference(model, x, percent=0.5, normal_regular=n)(x),
                                   atol=1e-5, rtol=1e-5)


def test_nin_gc_keeps_every_grouped_conv_and_shuffle_divisible():
    torch.manual_seed(0)
    model = randomize_bn(build_model("nin_gc"))
    pruned = prune(model, torch.randn(1, 3, 32, 32), percent=0.4)
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert [c.groups for c in convs] == [1, 2, 2, 16, 4, 4, 32, 8, 1]
    for c in convs:
        assert c.in_channels % c.groups == 0 and c.out_channels % c.groups == 0
    assert list(pruned.arch.cfg) != list(build_model("nin_gc").arch.cfg)
    build_model("nin_gc", cfg=pruned.arch.cfg)  # the registry's own divisibility check accepts it


def test_exact_counts_threshold_and_min_channels():
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    net[1].weight.data = torch.tensor([0.1, 0.2, 0.3, 0.4])
    net[4].weight.data = torch.tensor([0.8, 0.5, 0.7, 0.6])
    x = torch.randn(1, 3, 4, 4)
    # 8 units, percent 0.5 removes the 4 smallest (all of layer 0); min_channels=1 keeps its best one.
    p = prune(net, x, percent=0.5)
    assert (p[0].out_channels, p[3].in_channels, p[3].out_channels) == (1, 1, 4)
    assert torch.equal(p[1].weight.data, torch.tensor([0.4]))
    p = prune(net, x, percent=0.5, min_channels=2)
    assert p[0].out_channels == 2 and torch.equal(p[1].weight.data, torch.tensor([0.3, 0.4]))
    p = prune(net, x, percent=0.375)  # floor(8 * 0.375) = 3 removed: 0.1, 0.2, 0.3
    assert (p[0].out_channels, p[3].out_channels) == (1, 4)
    p = prune(net, x, percent=0.0)  # the original's sorted-index threshold removed one channel here
    assert (p[0].out_channels, p[3].out_channels) == (4, 4)
    net[4].weight.data = torch.tensor([0.1, 0.1, 0.1, 0.1])  # ties: earlier channels go first
    net[1].weight.data = torch.tensor([0.9, 0.9, 0.9, 0.9])
    p = prune(net, x, percent=0.25)
    assert p[3].out_channels == 2 and torch.equal(p[8].weight.data, net[8].weight.data[:, 2:])


def test_l1_importance_prunes_a_model_without_batchnorm():
    torch.manual_seed(0)
    model = build_model("lenet", in_channels=1).eval()
    x = torch.randn(2, 1, 28, 28)
    with pytest.warns(UserWarning, match="importance='l1'"):
        untouched = prune(model, x, percent=0.5)
    assert untouched.pruning_report.params_after == untouched.pruning_report.params_before
    pruned = prune(model, x, percent=0.5, importance="l1")
    assert pruned.conv1.out_channels < 10 and pruned.conv2.out_channels < 20 and pruned.fc1.out_features < 50
    assert pruned.fc1.in_features == 16 * pruned.conv2.out_channels  # flatten: one 4×4 block per channel
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked_reference(model, x, percent=0.5, importance="l1")(x),
                                   atol=1e-6, rtol=1e-5)
    assert list(pruned.arch.cfg) == [pruned.conv1.out_channels, pruned.conv2.out_channels, pruned.fc1.out_features]


@pytest.mark.parametrize("name", ["nin", "resnet20", "mobilenetv2", "concat", "group_residual"])
def test_record_replays_onto_a_fresh_model(name):
    factory, shape, _ = ZOO[name]
    torch.manual_seed(0)
    model = randomize_bn(factory())
    x = torch.randn(*shape)
    pruned = prune(model, x, percent=0.5).eval()
    record = json.loads(json.dumps(pruned.channel_record))
    assert record == channel_record(pruned) and record["version"] == 1
    fresh = apply_channel_record(factory(), record)
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))
    if hasattr(model, "arch"):  # the registry rebuilds it directly from the updated cfg
        assert record["cfg"] == list(pruned.arch.cfg) != list(model.arch.cfg)
        rebuilt = build_model(**pruned.arch.kwargs())
        rebuilt.load_state_dict(pruned.state_dict())
        assert tuple(fresh.arch.cfg) == pruned.arch.cfg
    else:
        assert record["cfg"] is None


def test_record_errors():
    pruned = prune(randomize_bn(ConcatNet()), torch.randn(1, 3, 8, 8), percent=0.5)
    record = pruned.channel_record
    with pytest.raises(PruningError, match="version"):
        apply_channel_record(ConcatNet(), {**record, "version": 99})
    with pytest.raises(PruningError, match="does not have"):
        apply_channel_record(ConcatNet(), {**record, "modules": {"nope": {"type": "Conv2d"}}})
    with pytest.raises(PruningError, match="is a Linear"):
        apply_channel_record(ConcatNet(), {**record, "modules": {"a.0": record["modules"]["fc"]}})


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


@pytest.mark.parametrize("kwargs,match", [
    ({"percent": 1.0}, "percent"), ({"percent": -0.1}, "percent"), ({"percent": "0.5"}, "percent"),
    ({"normal_regular": 0}, "normal_regular"), ({"normal_regular": 64}, "larger than layer"),
    ({"importance": "taylor"}, "importance"), ({"min_channels": 0}, "min_channels"),
    ({"ignored_layers": ["no.such"]}, "does not have"),
])
def test_bad_options_raise_pruning_error(kwargs, match):
    model = build_model("resnet20")
    with pytest.raises(PruningError, match=match):
        prune(model, torch.randn(1, 3, 32, 32), **{"percent": 0.5, **kwargs})


def test_untraceable_and_quantized_models_are_refused():
    with pytest.raises(PruningError, match="torch.fx could not trace"):
        prune(_Untraceable(), torch.randn(1, 3, 8, 8))
    from micronet.compression.quantization import prepare
    from micronet.compression.quantization.core.modules import default_scheme

    quantized = prepare(build_model("lenet", in_channels=1), default_scheme())
    with pytest.raises(PruningError, match="prune first, then quantize"):
        prune(quantized, torch.randn(1, 1, 28, 28))


def test_ignored_layers_stay_whole():
    torch.manual_seed(0)
    model = randomize_bn(build_model("nin"))
    pruned = prune(model, torch.randn(1, 3, 32, 32), percent=0.5, ignored_layers=["features.1", model.features[4].conv])
    assert pruned.features[1].conv.out_channels == 160 and pruned.features[4].conv.out_channels == 192
    assert pruned.features[2].conv.out_channels < 96
    reasons = [r for g in pruned.pruning_report.unprunable for r in g.reasons]
    assert any("'features.1.conv' is in ignored_layers" in r for r in reasons)
