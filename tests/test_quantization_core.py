"""The quantization mechanism against references: torch's fake-quant kernels, hand-computed observer
statistics, STE masks, mode rules (observers never update in eval or frozen mode) and bad inputs."""


import pytest
import torch
from torch import nn

from micronet.compression.quantization.core import (
    FROZEN,
    AffineQuantizer,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    QuantizerSpec,
    affine_qparams,
    calibrate,
    freeze,
    prepare,
    quant_range,
    quantizers,
)
from micronet.compression.quantization.core.modules import default_scheme
from micronet.compression.quantization.wqaq.iao.quantize import iao_scheme
from micronet.errors import QuantizationError

torch.manual_seed(0)


def _affine(bits=8, symmetric=True, per_channel=False, channels=None, signed=None, narrow=False, observer=None):
    obs = observer or MinMaxObserver(0 if per_channel else None, channels if per_channel else None)
    q = AffineQuantizer(bits, obs, symmetric=symmetric, signed=signed, narrow_range=narrow)
    q.train()
    return q


# ------------------------------------------------------------------------------------ ranges, qparams
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_code_ranges(bits):
    assert quant_range(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert quant_range(bits, True, narrow_range=True) == (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1)
    assert quant_range(bits, False) == (0, 2**bits - 1)


@pytest.mark.parametrize("bits", [0, 1, 17, 32])
def test_impossible_bit_widths_are_refused(bits):
    with pytest.raises(QuantizationError, match="bits"):
        iao_scheme(w_bits=bits).weight.build(0, 4)


def test_symmetric_scale_maps_the_largest_magnitude_to_the_largest_code():
    scale, zp = affine_qparams(torch.tensor(-2.54), torch.tensor(1.0), -127, 127, symmetric=True)
    assert scale.item() == pytest.approx(2.54 / 127) and zp.item() == 0


def test_asymmetric_range_always_contains_zero_exactly():
    q = _affine(symmetric=False, signed=False)
    x = torch.tensor([2.0, 3.0, 5.0])  # zero not in the data
    q(x)
    assert q.zero_point.item() == 0  # 0.0 is the lowest code
    assert q(torch.zeros(3)).abs().max().item() == 0.0
    q2 = _affine(symmetric=False, signed=True)
    q2(torch.tensor([-3.0, -1.0]))
    assert q2(torch.zeros(1)).item() == 0.0


def test_non_negative_activations_get_unsigned_codes():
    q = _affine(symmetric=True)
    q(torch.relu(torch.randn(1000)))
    assert q.quant_min_max == (0, 255) and q.zero_point.item() == 0
    q(torch.randn(1000))  # a negative value appears: signed codes from now on
    assert q.quant_min_max == (-128, 127)


# ------------------------------------------------------------------------------ fake-quant vs torch
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_per_tensor_fake_quant_is_bit_identical_to_torch(symmetric, bits):
    q = _affine(bits=bits, symmetric=symmetric)
    x = torch.randn(64, 16) * 3
    out = q(x)
    lo, hi = q.quant_min_max
    ref = torch.fake_quantize_per_tensor_affine(x, q.scale.item(), int(q.zero_point.item()), lo, hi)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_fake_quant_is_bit_identical_to_torch(symmetric):
    w = torch.randn(8, 4, 3, 3) * torch.linspace(0.01, 4, 8).view(8, 1, 1, 1)
    q = _affine(symmetric=symmetric, per_channel=True, channels=8, signed=True, narrow=symmetric)
    out = q(w)
    lo, hi = q.quant_min_max
    ref = torch.fake_quantize_per_channel_affine(w, q.scale, q.zero_point, 0, lo, hi)
    assert torch.equal(out, ref)
    # exact hand computation for the symmetric case: scale = max|w_c| / 127
    if symmetric:
        expected = w.abs().amax(dim=(1, 2, 3)) / 127
        assert torch.allclose(q.scale, expected)


def test_rounding_is_half_to_even():
    q = _affine(symmetric=True, signed=True)
    q(torch.tensor([-12.7, 12.7]))  # scale 0.1
    out = q(torch.tensor([0.05, 0.15, 0.25, -0.05, -0.15]))
    assert torch.allclose(out, torch.tensor([0.0, 0.2, 0.2, 0.0, -0.2]))


@pytest.mark.parametrize("x", [torch.zeros(10), torch.full((10,), 3.0), torch.full((10,), -2.0)])
def test_all_zero_and_constant_tensors(x):
    for symmetric in (True, False):
        q = _affine(symmetric=symmetric)
        out = q(x)
        assert torch.isfinite(out).all() and q.scale.item() > 0
        assert torch.allclose(out, x, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_rejected(bad):
    q = _affine()
    q.qualified_name = "features.0.input_quantizer"
    x = torch.randn(10)
    x[3] = bad
    with pytest.raises(QuantizationError, match="features.0.input_quantizer"):
        q(x)


def test_ste_gradient_is_masked_to_the_clipping_range():
    q = _affine(symmetric=True, signed=True)
    q(torch.tensor([-1.0, 1.0]))
    q.mode.fill_(FROZEN)  # keep the range of [-1, 1]
    x = torch.tensor([-3.0, -1.008, -0.5, 0.0, 0.7, 1.0, 1.004, 2.0], requires_grad=True)
    q(x).sum().backward()
    scale = 1 / 127
    inside = ((torch.round(x.detach() / scale) >= -128) & (torch.round(x.detach() / scale) <= 127)).float()
    assert torch.equal(x.grad, inside)
    # -1.008/s = -128.0 is the lowest code; 1.004/s = 127.5 rounds to 128, one past the top
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0, 0]


# ----------------------------------------------------------------------------------------- observers
def test_minmax_observer_running_and_current():
    running, current = MinMaxObserver(running=True), MinMaxObserver(running=False)
    for obs in (running, current):
        obs(torch.tensor([-1.0, 2.0]))
        obs(torch.tensor([0.5, 1.0]))
    assert (running.min_val.item(), running.max_val.item()) == (-1.0, 2.0)
    assert (current.min_val.item(), current.max_val.item()) == (0.5, 1.0)


def test_per_channel_minmax_for_conv_and_linear_weights():
    w = torch.randn(6, 3, 2, 2)
    obs = MinMaxObserver(0, 6)
    obs(w)
    assert torch.equal(obs.min_val, w.flatten(1).min(1).values)
    assert torch.equal(obs.max_val, w.flatten(1).max(1).values)
    t = torch.randn(3, 5, 2, 2)  # transposed-conv layout: channels on axis 1
    obs1 = MinMaxObserver(1, 5)
    obs1(t)
    assert torch.equal(obs1.max_val, t.transpose(0, 1).flatten(1).max(1).values)


def test_moving_average_observer():
    obs = MovingAverageMinMaxObserver(momentum=0.1)
    obs(torch.tensor([-1.0, 1.0]))
    obs(torch.tensor([-3.0, 5.0]))
    assert obs.min_val.item() == pytest.approx(0.9 * -1 + 0.1 * -3)
    assert obs.max_val.item() == pytest.approx(0.9 * 1 + 0.1 * 5)


def test_percentile_observer_is_the_mean_of_batch_quantiles():
    obs = PercentileObserver(percentile=0.99)
    a, b = torch.arange(1000.0), torch.arange(1000.0) * 2
    obs(a)
    obs(b)
    hi_a, hi_b = a.kthvalue(990).values, b.kthvalue(990).values
    lo_a, lo_b = a.kthvalue(11).values, b.kthvalue(11).values
    assert obs.max_val.item() == pytest.approx((hi_a + hi_b).item() / 2)
    assert obs.min_val.item() == pytest.approx((lo_a + lo_b).item() / 2)


@pytest.mark.parametrize("p", [0.0, 1.5, -0.1])
def test_percentile_outside_unit_interval_is_refused(p):
    with pytest.raises(QuantizationError, match="percentile"):
        PercentileObserver(percentile=p)
    with pytest.raises(QuantizationError, match="percentile"):
        iao_scheme(ptq=True, percentile=p)


def test_histogram_observer_memory_is_bounded_and_it_clips_outliers():
    obs = HistogramObserver(bins=512)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(10_000, generator=generator)
        x[0] = 60.0  # a rare outlier
        obs(x)
    assert obs.histogram.numel() == 512 and obs.histogram.sum().item() == 200_000
    lo, hi = obs.range(-8, 7, symmetric=True)  # 4 bits: rounding error dominates, clipping pays off
    assert hi.item() < 20.0  # the L2-optimal range gives up the rare outliers
    # and the chosen range gives a lower error than the full min/max range on the same data
    data = torch.randn(50_000, generator=generator)
    def mse(bound):
        s = bound / 7
        return ((torch.clamp(torch.round(data / s), -8, 7) * s - data) ** 2).mean().item()
    assert mse(max(abs(lo.item()), hi.item())) < mse(60.0)


def test_histogram_rebins_when_the_range_grows():
    obs = HistogramObserver(bins=64)
    obs(torch.linspace(0, 1, 1000))
    obs(torch.linspace(0, 4, 1000))
    assert obs.min_val.item() == 0.0 and obs.max_val.item() == 4.0
    assert obs.histogram.sum().item() == 2000


def _rounding_error(weight, bound, bits=8):
    """Squared error of symmetric narrow-range quantization of ``weight`` onto [-bound, bound], per row
    (``bound`` one value per row of ``weight``)."""
    quant_min, quant_max = quant_range(bits, True, True)
    rows = weight.reshape(weight.shape[0], -1)
    scale = (bound / quant_max).reshape(-1, 1)
    return ((torch.clamp(torch.round(rows / scale), quant_min, quant_max) * scale - rows) ** 2).sum(1)


def _best_on_a_fine_grid(weight, bits):
    """Brute force: the least per-row error over 2,000 clipping ratios of each row's largest magnitude."""
    extremes = weight.reshape(weight.shape[0], -1).abs().amax(1)
    return torch.stack([_rounding_error(weight, extremes * ratio, bits)
                        for ratio in torch.linspace(0.0005, 1.0, 2000)]).amin(0)


def _heavy_tailed_weight(rows):
    """Student-t (3 degrees of freedom) weights: tails like trained layers', a different size per row."""
    sizes = torch.linspace(0.01, 0.2, rows).reshape(-1, 1, 1, 1)
    return torch.distributions.StudentT(3.0).sample((rows, 16, 3, 3)) * sizes


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_observer_finds_the_least_rounding_error_range_per_tensor(bits):
    torch.manual_seed(bits)
    weight = _heavy_tailed_weight(32)
    mse = MSEObserver()
    mse(weight)
    quant_min, quant_max = quant_range(bits, True, True)
    lo, hi = mse.range(quant_min, quant_max, True)
    whole = weight.reshape(1, -1)
    extremes = whole.abs().max().reshape(1)
    assert lo.item() == -hi.item() and 0 < hi.item() < extremes.item()
    searched = _rounding_error(whole, hi.reshape(1), bits)
    assert searched <= _rounding_error(whole, extremes, bits)
    assert searched <= 1.01 * _best_on_a_fine_grid(whole, bits)  # 100 candidates: within 1% of the optimum
    if bits == 4:  # coarse grids pay most for spending their range on rare large weights
        assert searched < 0.5 * _rounding_error(whole, extremes, bits)
    # the searched range is stored, so a checkpoint (state dict) reproduces it without the tensor
    reloaded = MSEObserver()
    reloaded.load_state_dict(mse.state_dict())
    assert torch.equal(reloaded.range(quant_min, quant_max, True)[1], hi)


def test_mse_observer_per_channel_finds_each_rows_least_error_range():
    torch.manual_seed(3)
    weight = _heavy_tailed_weight(12)
    mse = MSEObserver(ch_axis=0, num_channels=12)
    mse(weight)
    extremes = weight.reshape(12, -1).abs().amax(1)
    lo, hi = mse.range(-7, 7, True)
    assert torch.equal(lo, -hi) and torch.all(hi <= extremes) and torch.all(hi > 0)
    searched = _rounding_error(weight, hi, bits=4)
    assert torch.all(searched <= _rounding_error(weight, extremes, bits=4))
    assert torch.all(searched <= 1.01 * _best_on_a_fine_grid(weight, 4))


def test_mse_weight_range_is_for_post_training_quantization_only():
    assert iao_scheme(ptq=True, weight_range="mse").weight.observer == "mse"
    with pytest.raises(QuantizationError, match="post-training"):
        iao_scheme(weight_range="mse")
    with pytest.raises(QuantizationError, match="post-training"):
        iao_scheme(ptq=True, weight_range="mse", weight_observer=1)
    with pytest.raises(QuantizationError, match="weight_range must be one of minmax, mse"):
        iao_scheme(ptq=True, weight_range="entropy")


# ----------------------------------------------------------------------------------- modes and flow
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.bn(self.conv(x))))))


def test_observers_never_update_in_eval_mode_or_when_frozen():
    model = prepare(_Tiny(), default_scheme())
    model.train()
    model(torch.randn(4, 1, 8, 8))
    snapshot = {k: v.clone() for k, v in model.state_dict().items() if "observer" in k or "scale" in k}
    model.eval()
    model(torch.randn(4, 1, 8, 8) * 10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())
    freeze(model).train()
    model(torch.randn(4, 1, 8, 8) * 10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


def test_evaluating_before_any_observation_is_an_error():
    model = prepare(_Tiny(), default_scheme()).eval()
    with pytest.raises(QuantizationError, match="calibrate"):
        model(torch.randn(1, 1, 8, 8))


def test_calibrate_observes_exactly_n_batches_in_eval_mode_then_freezes():
    model = prepare(_Tiny(), iao_scheme(ptq=True, percentile=0.999))
    bn_before = model.bn.running_mean.clone()
    consumed = []

    def data():
        for i in range(10):
            consumed.append(i)
            yield torch.randn(8, 1, 8, 8), torch.zeros(8)

    calibrate(model, data(), num_batches=3)
    assert len(consumed) == 4  # the 4th batch is drawn, seen to be over the budget, and not used
    assert torch.equal(model.bn.running_mean, bn_before)  # eval mode: BN statistics untouched
    assert all(int(q.mode) == FROZEN for _, q in quantizers(model))
    assert model.training  # the caller's mode is restored
    assert model.conv.input_quantizer.observer.batches.item() == 3


def test_calibrate_with_empty_data_and_unprepared_models():
    with pytest.raises(QuantizationError, match="empty"):
        calibrate(prepare(_Tiny(), default_scheme()), [])
    with pytest.raises(QuantizationError, match="prepare"):
        calibrate(_Tiny(), [torch.randn(1, 1, 8, 8)])
    with pytest.raises(QuantizationError, match="prepare"):
        freeze(_Tiny())


def test_prepare_twice_is_refused():
    model = prepare(_Tiny(), default_scheme())
    with pytest.raises(QuantizationError, match="already prepared"):
        prepare(model, default_scheme())


def test_prepare_does_not_touch_the_float_model():
    float_model = _Tiny()
    before = {k: v.clone() for k, v in float_model.state_dict().items()}
    q = prepare(float_model, default_scheme())
    q.train()
    q(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in float_model.state_dict().items())
    assert type(float_model.conv) is nn.Conv2d


def test_checkpoint_bits_are_never_silently_overridden():
    eight = prepare(_Tiny(), iao_scheme(w_bits=8))
    four = prepare(_Tiny(), iao_scheme(w_bits=4))
    with pytest.raises(QuantizationError, match="8-bit .* prepared with 4 bits"):
        four.load_state_dict(eight.state_dict())


def test_reloaded_model_continues_with_its_statistics():
    model = prepare(_Tiny(), default_scheme())
    model.train()
    for _ in range(3):
        model(torch.randn(4, 1, 8, 8))
    copy_ = prepare(_Tiny(), default_scheme())
    copy_.load_state_dict(model.state_dict())
    x = torch.randn(4, 1, 8, 8) * 5
    model(x), copy_(x)  # one more training step on both: the moving average blends, not restarts
    for (name, a), (_, b) in zip(quantizers(model), quantizers(copy_)):
        assert torch.equal(a.scale, b.scale), name
    model.eval(), copy_.eval()
    assert torch.equal(model(x), copy_(x))


def test_loading_a_qat_checkpoint_keeps_a_frozen_model_frozen():
    qat = prepare(_Tiny(), default_scheme())
    qat.train()
    qat(torch.randn(4, 1, 8, 8))
    qaft = freeze(prepare(_Tiny(), default_scheme()))
    qaft.load_state_dict(qat.state_dict())
    assert all(int(q.mode) == FROZEN for _, q in quantizers(qaft))


def test_report_lists_float_layers():
    model = prepare(_Tiny(), default_scheme())
    report = model.quantization_report
    assert report.count("QuantConv2d") == 1 and report.count("QuantLinear") == 1
    assert ("bn", "BatchNorm2d not folded") in report.kept_float
    assert "QuantConv2d: 1" in report.summary()


def test_unsupported_layers_are_reported_not_skipped_silently():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, idx):
            return self.fc(self.emb(idx))

    with pytest.warns(UserWarning, match="emb"):
        model = prepare(WithEmbedding(), default_scheme())
    assert model.quantization_report.unsupported == [("emb", "Embedding")]


def test_skip_and_first_last_policy():
    model = prepare(_Tiny(), default_scheme(), skip=["fc"])
    assert type(model.fc) is nn.Linear and ("fc", "skipped") in model.quantization_report.kept_float
    from dataclasses import replace

    scheme = replace(default_scheme(), keep_first_float=True, keep_last_float=True)
    model = prepare(_Tiny(), scheme)
    assert type(model.conv) is nn.Conv2d and type(model.fc) is nn.Linear


def test_quantizer_spec_round_trips_through_json():
    spec = QuantizerSpec(bits=4, symmetric=False, per_channel=True, observer="moving_average", observer_options={"momentum": 0.2})
    assert QuantizerSpec.from_json(spec.to_json()) == spec
    scheme = iao_scheme(w_bits=4, a_bits=6, q_type=1, bn_fuse=True)
    assert type(scheme).from_json(scheme.to_json()) == scheme


@pytest.mark.parametrize("kind", ["minmax", "moving_average", "percentile", "histogram"])
def test_observing_several_tensors_equals_observing_their_concatenation(kind):
    """Add/Concat inputs are observed together without copying them into one tensor first."""
    from micronet.compression.quantization.core import build_observer

    torch.manual_seed(3)
    batches = [(torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5) * 2 + 1) for _ in range(3)]
    together, joined = build_observer(kind), build_observer(kind)
    for a, b in batches:
        together((a, b))
        joined(torch.cat([a.flatten(), b.flatten()]))
    assert torch.equal(together.min_val, joined.min_val) and torch.equal(together.max_val, joined.max_val)
