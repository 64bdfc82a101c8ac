"""Tests for micronet.graph: modularize() turns functional calls into modules and reports the rest."""

from __future__ import annotations

import copy
import operator
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from micronet.base_module.op import Add, Concat
from micronet.graph import MicronetTracer, ModularizeReport, modularize
from micronet.models import build_model, list_models
from micronet.models.layers import ChannelShuffle

# ------------------------------------------------------------------------------------------- helpers


def module_counts(model: nn.Module, report: ModularizeReport) -> Counter:
    """Types of the modules modularize created, by class name."""
    return Counter(type(model.get_submodule(name)).__name__ for name, _ in report.converted)


def outputs(model: nn.Module, *inputs: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)  # same dropout masks for both models
    with torch.no_grad():
        return model(*(x.clone() for x in inputs))


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert torch.equal(a, b)
    else:
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)


def assert_equivalent(original: nn.Module, converted: nn.Module, *inputs: torch.Tensor) -> None:
    """Identical outputs in train and in eval mode, same state_dict, and a deep copy still identical."""
    assert list(converted.state_dict()) == list(original.state_dict())
    for key, value in original.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    for mode in (True, False):
        original.train(mode)
        converted.train(mode)
        assert_same(outputs(original, *inputs), outputs(converted, *inputs))
    duplicate = copy.deepcopy(converted)
    assert_same(outputs(original, *inputs), outputs(duplicate, *inputs))
    assert list(duplicate.state_dict()) == list(original.state_dict())


def image(channels: int = 3, size: int = 8, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------- the zoo


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return F.relu(out)


class ResidualNet(nn.Module):
    """Stem + two functional residual blocks + head: 2 Add, 5 ReLU, 1 AdaptiveAvgPool2d, 1 Flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = BasicBlock(8, 8)
        self.block2 = BasicBlock(8, 16, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.block2(self.block1(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class ConcatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = torch.cat([a, b], 1)
        z = torch.cat([a, a], 1)  # the same tensor twice
        w = torch.concat((y, z), dim=-3)
        return w.relu()


class ViewNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        self.fc2 = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        x = self.conv(x)
        y = self.fc(x.view(x.size(0), -1))
        return y + self.fc2(x.reshape(x.shape[0], -1))


class PoolNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        m = F.max_pool2d(x, 3, 2, 1, ceil_mode=True)
        a = F.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False, divisor_override=7)
        g = F.adaptive_avg_pool2d(m, 1)
        return m, a, g


class ActivationNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        return (F.leaky_relu(x, 0.2), F.relu6(x * 4), F.hardtanh(x, -0.5, 0.25), torch.sigmoid(x), F.sigmoid(x),
                F.hardswish(x * 3))


class ConstantAddNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x) + 1.0


class MatmulNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 6)
        self.k = nn.Linear(6, 6)

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        attn = torch.matmul(q, k.transpose(-2, -1)).softmax(-1)
        return F.relu(attn @ x)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return F.relu(x)


class WrapsDataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = DataDependent()

    def forward(self, x):
        return F.relu(self.body(x)) + x.mean()


# --------------------------------------------------------------------------------- the brief's cases


def test_residual_blocks_become_add_and_relu_modules():
    model = ResidualNet().eval()
    converted, report = modularize(model)
    assert report.traced and report.trace_error is None
    assert module_counts(converted, report) == {"Add": 2, "ReLU": 5, "AdaptiveAvgPool2d": 1, "Flatten": 1}
    assert report.left_functional == []
    assert ("add", "operator.add") in report.converted
    assert ("relu", "torch.relu") in report.converted
    assert converted.get_submodule("flatten").start_dim == 1
    assert converted.get_submodule("adaptive_avg_pool2d").output_size == 1
    assert isinstance(converted, fx.GraphModule) and type(converted).__name__ == "ResidualNet"
    assert not any(n.op in ("call_function", "call_method") for n in converted.graph.nodes)
    assert_equivalent(model, converted, image())


def test_concat_same_tensor_twice_and_dims():
    model = ConcatNet()
    converted, report = modularize(model)
    assert module_counts(converted, report) == {"Concat": 3, "ReLU": 1}
    assert [converted.get_submodule(n).dim for n, what in report.converted if what.startswith("torch.cat")] == [1, 1]
    assert converted.get_submodule("cat_2").dim == -3
    twice = next(n for n in converted.graph.nodes if n.op == "call_module" and n.target == "cat_1")
    assert twice.args[0] is twice.args[1]  # cat([a, a]) keeps both inputs
    assert [what for _, what in report.converted] == ["torch.cat", "torch.cat", "torch.concat", "Tensor.relu"]
    assert_equivalent(model, converted, image())


def test_view_batch_flatten_becomes_flatten_module():
    model = ViewNet()
    converted, report = modularize(model)
    assert module_counts(converted, report) == {"Flatten": 2, "Add": 1}
    assert [what for _, what in report.converted] == ["Tensor.view", "Tensor.reshape", "operator.add"]
    for name in ("flatten", "flatten_1"):
        assert (converted.get_submodule(name).start_dim, converted.get_submodule(name).end_dim) == (1, -1)
    assert report.left_functional == []  # the x.size(0) / x.shape[0] that fed them are gone too
    assert not any(n.op in ("call_function", "call_method") for n in converted.graph.nodes)
    assert_equivalent(model, converted, image())


def test_other_views_stay_functional():
    class Reshapes(nn.Module):
        def forward(self, x):
            return x.view(-1, 3 * 8 * 8), x.view(x.size(0), 3, -1), x.reshape(x.size(1), -1)

    converted, report = modularize(Reshapes())
    assert report.converted == []
    assert [what for _, what in report.left_functional] == ["Tensor.view", "Tensor.view", "Tensor.reshape"]


def test_pools_keep_every_argument():
    model = PoolNet()
    converted, report = modularize(model)
    assert module_counts(converted, report) == {"MaxPool2d": 1, "AvgPool2d": 1, "AdaptiveAvgPool2d": 1}
    mp = converted.get_submodule("max_pool2d")
    assert (mp.kernel_size, mp.stride, mp.padding, mp.dilation, mp.ceil_mode, mp.return_indices) == \
        (3, 2, 1, 1, True, False)
    ap = converted.get_submodule("avg_pool2d")
    assert (ap.kernel_size, ap.stride, ap.padding, ap.ceil_mode, ap.count_include_pad, ap.divisor_override) == \
        (3, 2, 1, True, False, 7)
    assert converted.get_submodule("adaptive_avg_pool2d").output_size == 1
    out = converted(image())
    assert out[0].shape[-1] == 5  # ceil_mode: 8x8 -> 5x5 (4x4 with floor)
    assert_equivalent(model, converted, image())


def test_pool_with_computed_kernel_stays_functional():
    class GlobalMax(nn.Module):
        def forward(self, x):
            return F.max_pool2d(x, x.size(2)), F.max_pool2d(x, 2)

    converted, report = modularize(GlobalMax())
    assert module_counts(converted, report) == {"MaxPool2d": 1}
    (name, what), = report.left_functional
    assert what == "torch.nn.functional.max_pool2d"
    assert "kernel_size" in report.reasons[name] and "kernel_size" in report.summary()
    assert_equivalent(GlobalMax(), converted, image())


def test_activations_keep_their_arguments():
    model = ActivationNet()
    converted, report = modularize(model)
    assert module_counts(converted, report) == {"LeakyReLU": 1, "ReLU6": 1, "Hardtanh": 1, "Sigmoid": 2,
                                                "Hardswish": 1}
    assert converted.get_submodule("leaky_relu").negative_slope == 0.2
    ht = converted.get_submodule("hardtanh")
    assert (ht.min_val, ht.max_val) == (-0.5, 0.25)
    assert not any(getattr(m, "inplace", False) for m in converted.modules())
    # x * 4 and x * 3 have no module form: listed, never dropped
    assert [what for _, what in report.left_functional] == ["operator.mul", "operator.mul"]
    assert_equivalent(model, converted, image())


def test_constant_add_is_listed_not_converted():
    model = ConstantAddNet()
    converted, report = modularize(model)
    assert report.traced and report.converted == []
    assert report.left_functional == [("add", "operator.add")]
    assert "constant" in report.reasons["add"]
    assert "add" in report.summary() and "operator.add" in report.summary()
    assert type(converted) is ConstantAddNet and converted is not model  # nothing to convert: a plain copy
    assert_equivalent(model, converted, image())


def test_matmul_and_softmax_are_listed():
    model = MatmulNet()
    converted, report = modularize(model)
    assert module_counts(converted, report) == {"ReLU": 1}
    assert [what for _, what in report.left_functional] == ["Tensor.transpose", "torch.matmul", "Tensor.softmax",
                                                            "operator.matmul"]
    x = torch.randn(2, 6, 6)
    assert_equivalent(model, converted, x)


def test_untraceable_model_is_returned_unchanged():
    model = DataDependent()
    converted, report = modularize(model)
    assert report.traced is False and report.converted == [] and report.left_functional == []
    assert "control flow" in report.trace_error
    assert "if x.sum() > 0" in report.trace_error and "DataDependent" in report.trace_error
    assert "returned unchanged" in report.summary()
    assert type(converted) is DataDependent and converted is not model
    assert not any(k.startswith("_tensor_constant") for k in vars(converted))
    x = image()
    assert torch.equal(converted(x), model(x)) and torch.equal(converted(-x), model(-x))
    same, _ = modularize(model, inplace=True)
    assert same is model


def test_untraceable_submodule_is_named_and_can_be_made_a_leaf():
    model = WrapsDataDependent()
    converted, report = modularize(model)
    assert not report.traced
    assert "'body'" in report.trace_error and "leaf_modules=(DataDependent,)" in report.trace_error
    converted, report = modularize(model, leaf_modules=(DataDependent,))
    assert report.traced and module_counts(converted, report) == {"ReLU": 1, "Add": 1}
    assert isinstance(converted.get_submodule("body"), DataDependent)  # not traced into: F.relu inside stays
    assert_equivalent(model, converted, image())


@pytest.mark.parametrize("name", list_models())
def test_registry_models_have_nothing_to_convert(name):
    model = build_model(name, 10, 1)
    converted, report = modularize(model)
    assert report.traced, report.trace_error
    assert report.converted == [] and report.left_functional == []
    assert type(converted) is type(model) and converted.arch == model.arch
    assert_equivalent(model, converted, torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------------------------ further rules


def test_torch_add_alpha_and_method_add():
    class Adds(nn.Module):
        def forward(self, x, y):
            return torch.add(x, y), torch.add(x, y, alpha=1), torch.add(x, y, alpha=2), x.add(y), operator.add(x, y)

    converted, report = modularize(Adds())
    assert module_counts(converted, report) == {"Add": 4}
    (name, what), = report.left_functional
    assert what == "torch.add" and "alpha=2" in report.reasons[name]
    assert_equivalent(Adds(), converted, image(), image() * 2)


def test_shape_arithmetic_and_tuple_concatenation_are_not_adds():
    class Shapes(nn.Module):
        def forward(self, x):
            n = x.size(0) + x.size(1)
            parts = x.chunk(2, 1) + x.split(1, 1)
            a, b = x.chunk(2, 2)
            return x.new_zeros(n), torch.cat(parts, 1), a + b

    model = Shapes()
    converted, report = modularize(model)
    assert module_counts(converted, report) == {"Add": 1, "Concat": 1}
    assert converted.get_submodule("cat").dim == 1
    listed = [what for _, what in report.left_functional]
    assert "Tensor.size" not in listed  # shape queries are not tensor computations
    assert listed.count("operator.add") == 1  # the tuple concatenation
    x = torch.randn(2, 4, 6, 6)
    assert_equivalent(model, converted, x)


def test_inplace_activation_converted_only_when_safe():
    class Inplace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.bn_in = nn.BatchNorm2d(3)

        def forward(self, x):
            y = F.relu(self.bn(self.conv(x)), inplace=True)  # nobody else sees bn's output: safe
            z = self.conv(x)
            w = z.relu_()  # z is read again below: converting would change that read
            v = F.relu(x, inplace=True)  # the model input: stays in-place
            h = self.bn_in(x)
            part = (h.chunk(2, 1) + (h,))[0]  # a view of h, through a tuple concatenation
            u = torch.relu_(part)  # h is read again below
            return y, w, z * 2, v, u, h * 3

    model = Inplace()
    converted, report = modularize(model)
    assert module_counts(converted, report) == {"ReLU": 1}
    reasons = {what: report.reasons[name] for name, what in report.left_functional}
    assert "read again" in reasons["Tensor.relu_"] and "read again" in reasons["torch.relu_"]
    assert "model input" in reasons["torch.nn.functional.relu"]
    assert_equivalent(model, converted, image())


def test_augmented_add_is_traced_as_add():
    class IAdd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            out = self.conv(x)
            out += x  # fx proxies have no __iadd__: recorded as out + x
            out = operator.iadd(out, x)  # same
            return out

    model = IAdd()
    converted, report = modularize(model)
    assert report.converted == [("add", "operator.add"), ("add_1", "operator.add")]
    assert_equivalent(model, converted, image())


def test_iadd_node_rule_checks_aliasing():
    # operator.iadd nodes only occur in hand-built graphs; check the rule on one directly.
    from micronet.graph.modularize import _Analysis, _plan_all

    root = nn.Module()
    root.conv = nn.Conv2d(3, 3, 1)
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_module("conv", (x,))
    b = graph.call_module("conv", (x,))
    safe = graph.call_function(operator.iadd, (a, x))  # a is read by nobody else
    view = graph.call_method("view", (b, -1))
    unsafe = graph.call_function(operator.iadd, (b, x))  # b is read again through its earlier view
    graph.output((safe, unsafe, view))
    plans, reasons = _plan_all(graph, _Analysis(graph, root))
    assert [p.node for p in plans] == [safe]
    assert "read again" in reasons[unsafe.name]


def test_training_mode_dependence_is_refused():
    class Drop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return F.relu(F.dropout(self.conv(x), 0.5, self.training))

    model = Drop()
    converted, report = modularize(model)
    assert not report.traced and "training" in report.trace_error
    assert type(converted) is Drop
    assert_equivalent(model, converted, image())


def test_names_are_unique_and_state_dict_is_preserved():
    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relu = nn.ReLU()
            self.add = nn.Linear(4, 4)  # a submodule already called "add"
            self.unused = nn.Conv2d(1, 1, 1)  # never called in forward: must survive
            self.register_buffer("scale", torch.tensor(2.0))
            self.register_buffer("scratch", torch.zeros(1), persistent=False)
            self.tag = "keep me"

        def forward(self, x):
            y = self.relu(self.add(x))
            offset = torch.tensor([0.5, 0.25, 0.0, 1.0])  # fx lifts it into a _tensor_constant attribute
            return F.relu(y + x) * self.scale + offset, torch.relu(x) + self.scratch

    model = Named()
    converted, report = modularize(model)
    assert [name for name, _ in report.converted] == ["add_1", "relu_1", "add_2", "relu_2", "add_3"]
    assert "_tensor_constant0" not in converted.state_dict()
    assert isinstance(converted.add, nn.Linear) and isinstance(converted.unused, nn.Conv2d)
    assert list(converted.state_dict()) == list(model.state_dict())
    assert converted.tag == "keep me" and copy.deepcopy(converted).tag == "keep me"
    assert_equivalent(model, converted, torch.randn(3, 4))


def test_nested_containers_keep_paths_and_training_flags():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BasicBlock(4, 4), nn.Dropout(0.5))
    model[1].shortcut.eval()
    converted, report = modularize(model)
    assert module_counts(converted, report) == {"ReLU": 2, "Add": 1}
    assert set(converted.state_dict()) == set(model.state_dict())
    assert converted.get_submodule("1.shortcut").training is False
    assert_equivalent(model, converted, image())


def test_leaf_modules_and_micronet_modules_are_not_traced_into():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = BasicBlock(3, 3)
            self.shuffle = ChannelShuffle(3)  # a micronet module: its flatten() is its own business
            self.add = Add()
            self.cat = Concat(1)

        def forward(self, x):
            y = self.shuffle(self.block(x))
            return F.relu(self.cat(self.add(y, x), x))

    model = Holder()
    converted, report = modularize(model, leaf_modules=(BasicBlock,))
    assert module_counts(converted, report) == {"ReLU": 1}
    assert isinstance(converted.block, BasicBlock) and isinstance(converted.shuffle, ChannelShuffle)
    tracer = MicronetTracer((BasicBlock,))
    assert tracer.is_leaf_module(model.shuffle, "shuffle") and tracer.is_leaf_module(model.block, "block")
    assert not tracer.is_leaf_module(nn.Sequential(), "s")
    assert_equivalent(model, converted, image())
    inner, inner_report = modularize(model)
    assert module_counts(inner, inner_report) == {"ReLU": 3, "Add": 1}  # now traced into BasicBlock


def test_modularize_is_idempotent_and_inplace_shares_modules():
    model = ResidualNet().eval()
    once, report = modularize(model, inplace=True)
    assert once.get_submodule("stem") is model.stem  # shared, not copied
    again, report2 = modularize(once)
    assert report2.traced and report2.converted == [] and report2.left_functional == []
    x = image()
    assert torch.equal(again(x), model(x))


def test_argument_checks():
    with pytest.raises(TypeError, match="nn.Module"):
        modularize(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="leaf_modules"):
        modularize(nn.ReLU(), leaf_modules=(int,))


def test_summary_lists_everything():
    _, report = modularize(MatmulNet())
    text = report.summary()
    assert "1 functional call(s) converted" in text and "4 left functional" in text
    assert "relu" in text and "torch.matmul" in text and "no module equivalent" in text
