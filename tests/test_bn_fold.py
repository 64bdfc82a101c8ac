"""Tests for QuantBNFuseConv2d (BN folding for QAT): fold equivalence against an unfolded conv→BN.

With both quantizers disabled the folded module must be conv→BN exactly (outputs, gradients, running
statistics) in every mode; with them enabled it must stay within a few quantization steps of it.
"""

from __future__ import annotations

import copy
import importlib
import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from micronet.compression.quantization.core.bn_fold import (
    QuantBNFuseConv2d,
    freeze_bn_statistics,
    unfreeze_bn_statistics,
)
from micronet.compression.quantization.core.modules import default_scheme
from micronet.compression.quantization.core.quantizers import FROZEN
from micronet.errors import QuantizationError

CHANNELS = 8
# Negative, exactly zero and near-zero γ entries: folding must not divide by γ or assume its sign.
GAMMA = torch.tensor([-1.5, 0.8, 1e-4, -1e-6, 2.0, 0.0, -0.3, 1.1])
GRID = list(itertools.product([True, False], [1, 4, 8], [1, 2], [1e-5, 0.1]))  # bias, groups, stride, eps
GRID_IDS = [f"bias{int(b)}-g{g}-s{s}-eps{e:g}" for b, g, s, e in GRID]


def make_pair(bias=True, groups=1, stride=1, eps=1e-5, momentum=0.1, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(CHANNELS, CHANNELS, 3, stride=stride, padding=1, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(CHANNELS, eps=eps, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(GAMMA)
        bn.bias.normal_()
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(7)
    return conv, bn


def scheme(**changes):
    return replace(default_scheme(), **changes)


def fused(conv, bn, quantize=False, **scheme_changes):
    m = QuantBNFuseConv2d.from_conv_bn(conv, bn, scheme(**scheme_changes))
    if not quantize:
        m.input_quantizer.enabled.fill_(0)
        m.weight_quantizer.enabled.fill_(0)
    return m


def reference(conv, bn):
    return nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn))


def pairs(ref, m):
    """(reference parameter, folded-module parameter) in matching order."""
    conv, bn = ref
    out = [(conv.weight, m.weight), (bn.weight, m.bn_weight), (bn.bias, m.bn_bias)]
    if conv.bias is not None:
        out.append((conv.bias, m.bias))
    return out


def assert_stats_equal(bn, m):
    torch.testing.assert_close(m.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(m.num_batches_tracked) == int(bn.num_batches_tracked)


def assert_grad_close(grad, ref_grad, scale=None):
    """Relative 1e-4 element-wise, plus float32 rounding relative to the tensor's largest entry."""
    scale = ref_grad.abs().max() if scale is None else scale
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=float(1e-5 * scale) + 1e-7)


def train_steps_match(ref, m, steps=3, lr=1e-3):
    """Run ``steps`` forward/backward/SGD steps on both and check outputs, gradients and BN statistics."""
    torch.manual_seed(123)
    for _ in range(steps):
        x = torch.randn(4, CHANNELS, 9, 9)
        x_ref, x_m = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y = ref(x_ref), m(x_m)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
        g = torch.randn_like(y_ref)
        (y_ref * g).sum().backward()
        (y * g).sum().backward()
        assert_grad_close(x_m.grad, x_ref.grad)
        for p_ref, p in pairs(ref, m):
            if p_ref is ref[0].bias:  # BN cancels a conv bias: both gradients are 0 up to rounding
                assert_grad_close(p.grad, p_ref.grad, scale=ref[0].weight.grad.abs().max())
            else:
                assert_grad_close(p.grad, p_ref.grad)
        assert_stats_equal(ref[1], m)
        with torch.no_grad():
            for p_ref, p in pairs(ref, m):
                p_ref -= lr * p_ref.grad
                p -= lr * p.grad
                p_ref.grad = p.grad = None


# ---------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("method", ["one_conv", "batch"])
@pytest.mark.parametrize("bias,groups,stride,eps", GRID, ids=GRID_IDS)
def test_train_fold_matches_conv_bn(bias, groups, stride, eps, method):
    conv, bn = make_pair(bias, groups, stride, eps)
    ref, m = reference(conv, bn).train(), fused(conv, bn, bn_fold_method=method).train()
    train_steps_match(ref, m, steps=3)


@pytest.mark.parametrize("bias,groups,stride,eps", GRID, ids=GRID_IDS)
def test_eval_fold_matches_conv_bn(bias, groups, stride, eps):
    conv, bn = make_pair(bias, groups, stride, eps)
    ref, m = reference(conv, bn).eval(), fused(conv, bn).eval()
    x = torch.randn(3, CHANNELS, 9, 9)
    y = m(x)
    torch.testing.assert_close(y, ref(x), rtol=0, atol=1e-5)
    assert_stats_equal(bn, m)  # eval never touches the statistics
    w_f, b_f = m.folded_weight_and_bias()
    plain = F.conv2d(x, w_f, b_f, stride=stride, padding=1, groups=groups)
    torch.testing.assert_close(plain, y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias,groups,stride,eps", GRID[::3], ids=GRID_IDS[::3])
def test_train_running_fold_matches_conv_bn(bias, groups, stride, eps):
    conv, bn = make_pair(bias, groups, stride, eps)
    ref, m = reference(conv, bn).train(), fused(conv, bn, bn_fold_method="running").train()
    train_steps_match(ref, m, steps=3)


def test_conv_options_are_kept():
    """dilation, padding_mode and non-square kernels come over from the conv."""
    _, bn = make_pair()
    torch.manual_seed(3)
    conv = nn.Conv2d(CHANNELS, CHANNELS, (3, 1), padding=(2, 1), dilation=2, padding_mode="reflect", bias=False)
    ref, m = reference(conv, bn).train(), fused(conv, bn).train()
    assert (m.kernel_size, m.dilation, m.padding_mode) == ((3, 1), (2, 2), "reflect")
    train_steps_match(ref, m, steps=2)
    with torch.no_grad():  # drop the float32 drift the two SGD steps left between them
        for p_ref, p in pairs(ref, m):
            p_ref.copy_(p)
    ref.eval(), m.eval()
    x = torch.randn(2, CHANNELS, 9, 9)
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-5)


def test_cumulative_momentum_none():
    conv, bn = make_pair(momentum=None)
    ref, m = reference(conv, bn).train(), fused(conv, bn).train()
    assert m.momentum is None
    train_steps_match(ref, m, steps=3)


def test_bn_without_affine():
    conv, _ = make_pair()
    bn = nn.BatchNorm2d(CHANNELS, affine=False)
    ref, m = reference(conv, bn).train(), fused(conv, bn).train()
    assert not m.bn_weight.requires_grad and not m.bn_bias.requires_grad
    x = torch.randn(4, CHANNELS, 6, 6)
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-5)
    assert_stats_equal(ref[1], m)


# ---------------------------------------------------------------------------------------------- statistics
def test_first_batch_copies_statistics_when_not_from_model():
    conv, bn = make_pair(groups=4)
    m = fused(conv, bn, bn_stats_from_model=False).train()
    assert int(m.bn_stats_initialized) == 0
    torch.testing.assert_close(m.running_mean, bn.running_mean)  # eval before training uses the BN's
    x = torch.randn(4, CHANNELS, 7, 7)
    m(x)
    y0 = conv(x).detach()
    torch.testing.assert_close(m.running_mean, y0.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var, y0.var(dim=(0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-6)
    assert int(m.bn_stats_initialized) == 1 and int(m.num_batches_tracked) == int(bn.num_batches_tracked) + 1

    # later batches: the usual momentum update, as a BN started from those statistics
    ref_bn = nn.BatchNorm2d(CHANNELS, momentum=bn.momentum).train()
    ref_bn.running_mean.copy_(m.running_mean)
    ref_bn.running_var.copy_(m.running_var)
    x2 = torch.randn(4, CHANNELS, 7, 7)
    ref_bn(conv(x2))
    m(x2)
    torch.testing.assert_close(m.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-6)


def test_stats_from_model_keeps_bn_statistics():
    conv, bn = make_pair()
    ref, m = reference(conv, bn).train(), fused(conv, bn, bn_stats_from_model=True).train()
    assert int(m.bn_stats_initialized) == 1
    x = torch.randn(4, CHANNELS, 7, 7)
    ref(x), m(x)
    assert_stats_equal(ref[1], m)  # an EMA step from the BN's statistics, not a copy of the batch


def test_freeze_bn_statistics():
    conv, bn = make_pair(bias=True)
    model = nn.Sequential(fused(conv, bn), nn.ReLU(), fused(*make_pair(seed=1)))
    model.train()
    assert freeze_bn_statistics(model) == 2
    m = model[0]
    before = {k: v.clone() for k, v in m.state_dict().items() if k in ("running_mean", "running_var", "num_batches_tracked")}
    x = torch.randn(4, CHANNELS, 7, 7)
    y = m(x)
    torch.testing.assert_close(y, reference(conv, bn).eval()(x), rtol=0, atol=1e-5)  # running statistics
    for key, value in before.items():
        assert torch.equal(m.state_dict()[key], value), key
    y.square().sum().backward()  # W, b, γ and β still train
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (m.weight, m.bias, m.bn_bias))

    assert unfreeze_bn_statistics(model) == 2
    m(x)
    assert int(m.num_batches_tracked) == int(before["num_batches_tracked"]) + 1
    assert freeze_bn_statistics(nn.Sequential(nn.Conv2d(1, 1, 1))) == 0


def test_frozen_quantizers_fold_with_running_statistics():
    """QAFT: a FROZEN weight quantizer means running statistics in training too, and no updates."""
    conv, bn = make_pair()
    m = fused(conv, bn).train()
    for q in m.quantizers().values():
        q.set_mode(FROZEN)
    x = torch.randn(4, CHANNELS, 7, 7)
    torch.testing.assert_close(m(x), reference(conv, bn).eval()(x), rtol=0, atol=1e-5)
    assert_stats_equal(bn, m)


# ---------------------------------------------------------------------------------------------- quantized
def step_bound(m, x):
    """Per-channel error allowed: one full input step through ‖W_f‖₁ plus one full weight step through
    the largest input patch — twice the worst-case rounding error of both quantizers (no clipping)."""
    w_f = m.folded_weight_and_bias()[0].detach()
    s_x = m.input_quantizer.scale.detach()
    s_w = m.weight_quantizer.scale.detach()
    fan_in = w_f[0].numel()
    bound = s_x * w_f.abs().flatten(1).sum(1) + s_w * fan_in * x.abs().max()
    return bound.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("method", ["one_conv", "batch", "running"])
def test_quantized_close_to_float_and_inputs_untouched(method):
    conv, bn = make_pair(bias=True, groups=4)
    float_state = lambda: [(f"conv.{k}", t) for k, t in conv.state_dict().items()] + [  # noqa: E731
        (f"bn.{k}", t) for k, t in bn.state_dict().items()]
    originals = {name: t.detach().clone() for name, t in float_state()}
    ref = reference(conv, bn).train()
    m = fused(conv, bn, quantize=True, bn_fold_method=method).train()
    for a, b in itertools.chain(zip(conv.parameters(), m.parameters()), [(bn.weight, m.bn_weight), (bn.running_var, m.running_var)]):
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    assert int(m.weight_quantizer.bits) == 8 and int(m.input_quantizer.bits) == 8

    torch.manual_seed(5)
    x = torch.randn(8, CHANNELS, 9, 9)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    for _ in range(4):
        y, y_ref = m(x), ref(x)
        err = (y - y_ref).abs()
        assert not torch.allclose(y, y_ref, atol=1e-6)  # fake quantization is really on
        assert (err <= step_bound(m, x)).all()
        opt.zero_grad()
        y.square().mean().backward()
        opt.step()
        with torch.no_grad():  # keep the reference's parameters equal to the trained ones
            for p_ref, p in pairs(ref, m):
                p_ref.copy_(p)
    if method == "batch":  # the recommended end of batch-fold QAT: learn the weight scale on W·γ/σ_R
        freeze_bn_statistics(m)
        m(x)
    m.eval(), ref.eval()
    y, y_ref = m(x), ref(x)
    assert (y - y_ref).abs().max() > 0
    assert ((y - y_ref).abs() <= step_bound(m, x)).all()

    for name, t in float_state():
        assert torch.equal(t, originals[name]), name


@pytest.mark.parametrize("method", ["one_conv", "batch", "running"])
def test_weight_observer_sees_folded_weight(method):
    conv, bn = make_pair(bias=False)
    m = fused(conv, bn, quantize=True, bn_fold_method=method).train()
    x = torch.randn(4, CHANNELS, 7, 7)
    with torch.no_grad():  # one_conv quantizes with σ_R from before the step, folding γ = 0 channels with γ = 1
        inv_std_r = torch.rsqrt(m.running_var + m.eps)
        fold = torch.where(m.bn_weight == 0, inv_std_r, m.bn_weight * inv_std_r)
        w_before = conv.weight * fold.reshape(-1, 1, 1, 1)
    m(x)
    obs = m.weight_quantizer.observer
    seen = obs.max_val.clone(), obs.min_val.clone()  # what the training forward observed
    m.eval()  # from here on nothing observes (leaving training re-observes the deployed weight once, checked below)
    with torch.no_grad():
        if method == "one_conv":
            w_f = w_before
        elif method == "running":
            w_f = m.folded_weight_and_bias()[0]
        else:
            y0 = conv(m.input_quantizer(x))  # the batch statistics of conv(x̂)
            std_b = torch.sqrt(y0.var(dim=(0, 2, 3), unbiased=False) + m.eps)
            w_f = conv.weight * (m.bn_weight / std_b).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen[0], w_f.flatten(1).amax(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(seen[1], w_f.flatten(1).amin(1), rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # in eval the range is that of the deployed weight W·γ/σ_R, after the step's statistics
        deployed = m.folded_weight_and_bias()[0]
    torch.testing.assert_close(obs.max_val, deployed.flatten(1).amax(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(obs.min_val, deployed.flatten(1).amin(1), rtol=1e-5, atol=1e-7)


def test_state_dict_round_trip():
    conv, bn = make_pair(bias=True, groups=4)
    m = fused(conv, bn, quantize=True, bn_stats_from_model=False).train()
    for _ in range(3):
        m(torch.randn(4, CHANNELS, 7, 7))
    freeze_bn_statistics(m)

    other = fused(*make_pair(bias=True, groups=4, seed=9), quantize=True, bn_stats_from_model=False)
    assert int(other.bn_stats_initialized) == 0 and int(other.freeze_bn_stats) == 0
    other.load_state_dict(m.state_dict())
    assert int(other.bn_stats_initialized) == 1 and int(other.freeze_bn_stats) == 1
    m.eval(), other.eval()
    x = torch.randn(2, CHANNELS, 7, 7)
    assert torch.equal(m(x), other(x))

    # the "first batch copies" state is a buffer: a loaded module does not copy the next batch again
    unfreeze_bn_statistics(m), unfreeze_bn_statistics(other)
    m.train(), other.train()
    x = torch.randn(4, CHANNELS, 7, 7)
    m(x), other(x)
    assert torch.equal(m.running_var, other.running_var)


# ---------------------------------------------------------------------------------------------- errors / integration
def test_invalid_inputs():
    conv, bn = make_pair()
    with pytest.raises(QuantizationError):
        QuantBNFuseConv2d.from_conv_bn(conv, nn.BatchNorm2d(CHANNELS, track_running_stats=False), default_scheme())
    with pytest.raises(QuantizationError):
        QuantBNFuseConv2d.from_conv_bn(conv, nn.BatchNorm2d(CHANNELS + 1), default_scheme())
    with pytest.raises(QuantizationError):
        QuantBNFuseConv2d.from_float(conv, default_scheme())
    m = fused(conv, bn).train()
    with pytest.raises(ValueError):
        m(torch.randn(1, CHANNELS, 1, 1))


def test_prepare_folds_conv_bn(monkeypatch):
    # the package re-exports the function ``prepare`` under the submodule's name
    prepare_module = importlib.import_module("micronet.compression.quantization.core.workflow")

    # the functional-op rewrite (micronet.graph) is not what this test is about: leave the model as is
    monkeypatch.setattr(prepare_module, "_modularize", lambda model, report: model)
    prepare = prepare_module.prepare

    conv, bn = make_pair()
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Conv2d(CHANNELS, 4, 1))
    prepared = prepare(model, scheme(fold_bn=True))
    layers = dict(prepared.named_modules())
    assert sum(isinstance(m, QuantBNFuseConv2d) for m in layers.values()) == 1
    assert sum(isinstance(m, nn.BatchNorm2d) for m in layers.values()) == 0
    assert len(prepared.quantization_report.folded_bn) == 1
    assert model[0] is conv and torch.equal(model[1].weight, GAMMA)  # the float model is untouched


def test_freeze_bn_hook_switches_at_the_requested_epoch():
    from micronet.compression.quantization.core.schedule import FreezeBNStatistics
    from micronet.compression.quantization.wqaq.iao.quantize import prepare as iao_prepare
    from micronet.data import BatchLoader, load_dataset
    from micronet.engine import Hook, TrainConfig, fit
    from micronet.models import build_model

    splits = load_dataset("synthetic", val_fraction=0.0, num_train=128)
    model = iao_prepare(build_model("nin", 10, 1, cfg=[8] * 8), bn_fuse=True)
    snapshots = {}

    class Snapshot(Hook):
        def on_epoch_start(self, trainer, epoch):
            snapshots[epoch] = trainer.model.features[0].conv.running_mean.clone()

    fit(model, TrainConfig(epochs=3, lr=0.01), BatchLoader(splits.train, 32, shuffle=True),
        hooks=[FreezeBNStatistics(after_epochs=1), Snapshot()])
    folded = [m for m in model.modules() if isinstance(m, QuantBNFuseConv2d)]
    assert len(folded) == 9 and all(int(m.freeze_bn_stats) == 1 for m in folded)
    assert not torch.equal(snapshots[0], snapshots[1])  # epoch 0 still updated the statistics
    assert torch.equal(snapshots[1], snapshots[2])  # frozen from epoch 1 on
    assert torch.equal(snapshots[2], model.features[0].conv.running_mean)
