"""Learned step size (LSQ) quantizer: initialisation, gradients, eval equality with torch, checkpoints."""

import math

import pytest
import torch

from micronet.compression.quantization.core import QuantizerSpec, freeze, prepare
from micronet.compression.quantization.core.learned import LearnedScaleQuantizer
from micronet.compression.quantization.wqaq.iao.quantize import iao_scheme
from micronet.errors import QuantizationError
from micronet.models import build_model


def lsq(bits=4, per_channel=False, channels=None, observer="minmax", **options):
    spec = QuantizerSpec(family="lsq", bits=bits, per_channel=per_channel, narrow_range=per_channel,
                         signed=True if per_channel else None, observer=observer,
                         observer_options=options)
    return spec.build(ch_axis=0 if per_channel else None, num_channels=channels)


def test_first_batch_initialises_then_scale_is_learnt_not_observed():
    q = lsq(bits=4).train()
    x = torch.rand(1000) * 3.0  # non-negative: unsigned codes 0..15
    q(x)
    assert isinstance(q, LearnedScaleQuantizer) and isinstance(q.scale, torch.nn.Parameter)
    assert not bool(q.signed) and q.quant_min_max == (0, 15)
    torch.testing.assert_close(q.scale.detach(), x.max() / 15)
    before = q.scale.detach().clone()
    q(x * 10)  # a wider batch no longer moves the scale: only gradients do
    assert torch.equal(q.scale.detach(), before)


def test_scale_gradient_is_lsq_rule():
    """d out / d s = round(x/s) − x/s inside the range, quant_max (or quant_min) where clipped, times g."""
    q = lsq(bits=3).train()
    q(torch.tensor([-4.0, 3.5]))  # signed, scale = 4/3 → set explicitly below
    with torch.no_grad():
        q.scale.fill_(0.5)
    x = torch.tensor([0.3, 0.74, -1.1, 5.0, -9.0])
    y = q(x)
    y.sum().backward()
    s, (qmin, qmax) = 0.5, q.quant_min_max
    v = x / s
    expected = torch.where(v < qmin, torch.tensor(float(qmin)),
                           torch.where(v > qmax, torch.tensor(float(qmax)), torch.round(v) - v))
    g = 1.0 / math.sqrt(x.numel() * qmax)
    torch.testing.assert_close(q.scale.grad, expected.sum() * g)
    torch.testing.assert_close(y, torch.clamp(torch.round(v), qmin, qmax) * s)


def test_eval_output_equals_torch_fake_quant_and_frozen_scale_gets_no_gradient():
    q = lsq(bits=4, per_channel=True, channels=6).train()
    w = torch.randn(6, 3, 3, 3)
    q(w)
    with torch.no_grad():
        q.scale.mul_(0.8)
    q.eval()
    ref = torch.fake_quantize_per_channel_affine(w, q.scale.detach(), torch.zeros(6, dtype=torch.int32), 0, -7, 7)
    assert torch.equal(q(w), ref)
    q.train()
    assert torch.equal(q(w).detach(), ref)  # the training path gives the same values
    q.set_mode(2)  # FROZEN
    w.requires_grad_(True)
    q(w).sum().backward()
    assert q.scale.grad is None


def test_lsq_qat_trains_scales_and_reloads():
    torch.manual_seed(0)
    model = prepare(build_model("lenet", num_classes=10, in_channels=1), iao_scheme(4, 4, learned_scale=True, bn_fuse=True))
    scales = {n: p for n, p in model.named_parameters() if n.endswith(".scale")}
    assert len(scales) >= 4
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    model.train()
    model(x)  # initialise
    start = {n: p.detach().clone() for n, p in scales.items()}
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert any(not torch.equal(p.detach(), start[n]) for n, p in scales.items())
    model.eval()
    out = model(x)
    fresh = prepare(build_model("lenet", num_classes=10, in_channels=1), iao_scheme(4, 4, learned_scale=True, bn_fuse=True))
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert torch.equal(fresh(x), out)
    freeze(fresh)
    assert all(int(q.mode) == 2 for q in fresh.modules() if isinstance(q, LearnedScaleQuantizer))


def test_asymmetric_lsq_is_refused():
    with pytest.raises(QuantizationError, match="symmetric"):
        iao_scheme(4, 4, q_type=1, learned_scale=True)
    with pytest.raises(QuantizationError, match="symmetric"):
        QuantizerSpec(family="lsq", bits=4, symmetric=False).build()
