"""The channel dependency graph: which channels are tied, offset, repeated or blocked, and why."""

import pytest
import torch
from torch import nn

from micronet.compression.pruning import build_channel_graph, plan_pruning, prune
from micronet.models import build_model


def _space(graph, name):
    return next(s for s in graph.spaces if s.name == name)


def _comp(graph, name):
    return graph.component(_space(graph, name).id)


def test_resnet20_residual_stages_are_one_group_each():
    model = build_model("resnet20")
    g = build_channel_graph(model, torch.randn(1, 3, 32, 32))
    stage1 = ["conv1"] + [f"layer1.{b}.conv2" for b in range(3)]
    stage2 = ["layer2.0.shortcut.0"] + [f"layer2.{b}.conv2" for b in range(3)]
    assert len({_comp(g, n) for n in stage1}) == 1 and len({_comp(g, n) for n in stage2}) == 1
    assert _comp(g, "conv1") != _comp(g, "layer2.0.conv2")
    for b in range(3):  # the inner width of a block is its own group
        assert _comp(g, f"layer1.{b}.conv1") not in {_comp(g, n) for n in stage1}
    conv_comps = {g.component(s.id) for s in g.spaces if s.kind in ("conv", "linear")}
    assert len(conv_comps) == 3 + 9 + 1  # three stages, nine inner widths, the classifier
    # one unit per channel of the stage: channel c of every layer in the stage is the same unit
    for c in range(16):
        assert len({g.units.find(_space(g, n).first + c) for n in stage1}) == 1
    assert g.component_reasons()[_comp(g, "fc")] == ["network output (its channel count is the model's output shape)"]


def test_concat_maps_each_producer_to_an_offset_slice():
    from test_pruning_api import ConcatNet

    g = build_channel_graph(ConcatNet(), torch.randn(1, 3, 8, 8))
    a, b = _space(g, "a.0"), _space(g, "b.0")
    assert g.uses["c.0"].in_elems == list(a.elements()) + list(b.elements())
    assert _comp(g, "a.0") != _comp(g, "b.0")  # concat does not tie its inputs
    pruned = prune(ConcatNet(), torch.randn(1, 3, 8, 8), percent=0.5)
    assert pruned.c[0].in_channels == pruned.a[0].out_channels + pruned.b[0].out_channels


def test_flatten_repeats_each_channel_over_its_spatial_block():
    from test_pruning_api import FunctionalNet

    g = build_channel_graph(FunctionalNet(), torch.randn(1, 3, 16, 16))
    conv4 = _space(g, "conv4")
    assert g.uses["fc"].in_elems == [e for e in conv4.elements() for _ in range(16)]
    # a + b ties conv1 and conv2 channel by channel; torch.cat places conv3 after them
    assert all(g.units.find(_space(g, "conv1").first + c) == g.units.find(_space(g, "conv2").first + c)
               for c in range(8))
    assert g.uses["conv4"].in_elems[8:] == list(_space(g, "conv3").elements())


def test_channel_shuffle_permutes_and_ties_its_blocks():
    g = build_channel_graph(build_model("nin_gc"), torch.randn(1, 3, 32, 32))
    src = _space(g, "features.1.conv")  # 256 channels, then shuffle(2) before features.2.conv
    seen = g.uses["features.2.conv"].in_elems
    n = src.size // 2
    assert seen[:4] == [src.first, src.first + n, src.first + 1, src.first + n + 1]
    assert all(g.units.find(src.first + j) == g.units.find(src.first + n + j) for j in range(n))
    assert [(c.path, c.side, c.groups) for c in g.constraints[:2]] == [("features.1.conv", "input", 2),
                                                                       ("features.1.conv", "output", 2)]


def test_depthwise_conv_follows_its_producer():
    g = build_channel_graph(build_model("mobilenetv2"), torch.randn(1, 3, 32, 32))
    use = g.uses["features.2.depthwise.conv"]
    assert use.kind == "depthwise" and use.out_space is None
    assert use.in_elems == list(_space(g, "features.2.expand.conv").elements())
    pruned = prune(build_model("mobilenetv2"), torch.randn(1, 3, 32, 32), percent=0.5)
    dw = pruned.features[2].depthwise.conv
    assert dw.groups == dw.in_channels == dw.out_channels == pruned.features[2].expand.conv.out_channels < 144


class _HardCodedView(nn.Module):
    """A hard-coded reshape reads conv2's channels: pruning must leave conv2 whole and say why."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.view(-1, 256))


def test_unknown_op_blocks_its_producer_with_a_reason():
    model = _HardCodedView()
    with pytest.warns(UserWarning, match="view"):
        pruned = prune(model, torch.randn(2, 3, 8, 8), percent=0.5)
    assert pruned.conv2.out_channels == 4 and pruned.conv1.out_channels < 8
    group = next(u for u in pruned.pruning_report.unprunable if "conv2" in u.layers)
    assert group.channels == 4 and any("the operation view" in r for r in group.reasons)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.shared = nn.Conv2d(6, 6, 1)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.head(self.bn2(self.shared(self.shared(y))))


def test_module_called_twice_is_left_whole():
    g = build_channel_graph(_Shared(), torch.randn(1, 3, 4, 4))
    reasons = [r for rs in g.component_reasons().values() for r in rs]
    assert any("called 2 times" in r for r in reasons)
    assert "shared" not in g.uses


class _ConcatIntoGroups(nn.Module):
    """Two sources concatenated into a groups=2 conv: each source feeds one group only."""

    def __init__(self):
        super().__init__()
        self.a, self.bna = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.b, self.bnb = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.g, self.bng = nn.Conv2d(16, 16, 1, groups=2, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        y = torch.cat([self.bna(self.a(x)), self.bnb(self.b(x))], 1)
        return self.head(torch.relu(self.bng(self.g(y))))


def test_grouped_conv_that_cannot_stay_equal_is_listed_not_skipped():
    model = _ConcatIntoGroups()
    with pytest.warns(UserWarning, match="groups=2"):
        pruned = prune(model, torch.randn(1, 3, 4, 4), percent=0.5)
    assert pruned.a.out_channels == 8 and pruned.b.out_channels == 8
    assert pruned.g.out_channels < 16 and pruned.g.out_channels % 2 == 0 and pruned.g.groups == 2
    listed = {name for u in pruned.pruning_report.unprunable for name in u.layers}
    assert {"a", "b"} <= listed


def test_plan_does_not_modify_the_model_and_matches_prune():
    torch.manual_seed(0)
    model = build_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    graph, selection = plan_pruning(model, x, percent=0.3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    pruned = prune(model, x, percent=0.3)
    for path, (_keep_in, keep_out) in selection.plan().items():
        m = pruned.get_submodule(path)
        width = m.out_channels if hasattr(m, "out_channels") else getattr(m, "out_features", None)
        assert (width or m.num_features) == len(keep_out)


def test_depthwise_with_multiplier_is_listed_with_its_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 8, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 2, 1))
    with pytest.warns(UserWarning, match="one channel per group"):
        pruned = prune(model, torch.randn(1, 3, 6, 6), percent=0.5)
    assert pruned[0].out_channels == 4  # its consumer has one input channel per group
    assert pruned[3].out_channels in (4, 8) and pruned[3].groups == 4 and pruned[3].out_channels < 8
