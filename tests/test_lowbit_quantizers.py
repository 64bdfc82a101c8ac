"""Low-bit quantizer families against hand-computed values: binary, ternary and DoReFa weights, DoReFa,
sign and float activations, their straight-through gradients, integer codes and bad settings."""

import pytest
import torch

from micronet.compression.quantization.core import QuantizerSpec
from micronet.compression.quantization.core.lowbit import (
    BinaryWeightQuantizer,
    DoReFaActivationQuantizer,
    DoReFaWeightQuantizer,
    SignActivation,
    TernaryWeightQuantizer,
    _ternary,
    round_half_away,
)
from micronet.errors import QuantizationError


def _weight(quantizer, w):
    quantizer.train()
    return quantizer(w)


# ------------------------------------------------------------------------------------------ binary
def test_binary_is_sign_times_per_channel_mean_magnitude():
    w = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-0.5, 0.5, -1.0, 1.0]])
    out = _weight(BinaryWeightQuantizer(ch_axis=0), w)
    expected = torch.tensor([[1.5, -1.5, 1.5, 1.5], [-0.75, 0.75, -0.75, 0.75]])  # sign(0) = +1
    assert torch.equal(out, expected)


def test_binary_per_tensor_when_there_is_no_channel_axis():
    w = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    assert torch.equal(_weight(BinaryWeightQuantizer(ch_axis=None), w), torch.tensor([[1.5, -1.5], [1.5, 1.5]]))


@pytest.mark.parametrize("ch_axis", [0, 1])
def test_binary_takes_exactly_two_levels_per_channel(ch_axis):
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3)
    out = _weight(BinaryWeightQuantizer(ch_axis=ch_axis), w)
    dims = tuple(d for d in range(4) if d != ch_axis)
    alpha = w.abs().mean(dim=dims).half().float()  # α is kept on the float16 grid (exactly packable)
    for c in range(w.shape[ch_axis]):
        values = set(out.select(ch_axis, c).flatten().tolist())
        assert values == {alpha[c].item(), -alpha[c].item()}


def test_binary_center_and_clip_act_on_a_copy():
    w = torch.tensor([[3.0, -1.0], [0.5, 2.5]])
    before = w.clone()
    out = _weight(BinaryWeightQuantizer(ch_axis=0, center=True, clip=True), w)
    # row 0: centred [2, -2] → clipped [1, -1] → α = 1; row 1: centred [-1, 1] → α = 1
    assert torch.equal(out, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    assert torch.equal(w, before)


def test_binary_centring_leaves_depthwise_filters_alone():
    """A filter with one input channel would be all zeros after centring (α = 0, a dead layer)."""
    w = torch.tensor([[[[0.5, -0.2], [0.1, 0.3]]], [[[-0.4, 0.2], [0.6, -0.1]]]])  # (2, 1, 2, 2): depthwise
    centred = _weight(BinaryWeightQuantizer(ch_axis=0, center=True), w)
    assert torch.equal(centred, _weight(BinaryWeightQuantizer(ch_axis=0), w))
    alpha = torch.tensor(0.275).half().float()  # mean|w| of filter 0, on the float16 grid α is stored on
    assert torch.equal(centred[0, 0], alpha * torch.tensor([[1.0, -1.0], [1.0, 1.0]]))


def test_binary_centres_conv_transpose_weights_over_their_input_axis():
    w = torch.zeros(2, 3, 1, 1)  # (in, out, kH, kW): the output-channel axis is 1, the input axis 0
    w[:, :, 0, 0] = torch.tensor([[4.0, 1.0, 0.0], [2.0, -1.0, 2.0]])
    out = _weight(BinaryWeightQuantizer(ch_axis=1, center=True), w)
    # centred over dim 0: [[1, 1, -1], [-1, -1, 1]], α = 1 for every output channel
    assert torch.equal(out[:, :, 0, 0], torch.tensor([[1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]]))


def test_binary_gradient_is_identity_ste_plus_the_alpha_term():
    w = torch.tensor([[1.0, -2.0, 0.0, 3.0]], requires_grad=True)
    _weight(BinaryWeightQuantizer(ch_axis=0), w).sum().backward()
    # ∂/∂w_i = α + Σ_j sign(w_j) · sign(w_i) / N = 1.5 + 0.5·sign(w_i); |w|'s gradient at 0 is 0
    assert torch.allclose(w.grad, torch.tensor([[2.0, 1.0, 1.5, 2.0]]))


def test_binary_clip_masks_the_gradient_of_clipped_weights():
    w = torch.tensor([[3.0, 0.5]], requires_grad=True)
    _weight(BinaryWeightQuantizer(ch_axis=0, clip=True), w).sum().backward()
    # clamp → [1, 0.5], α = 0.75; w0 is clipped (no gradient), w1: α + (1 + 1)/2 = 1.75
    assert torch.allclose(w.grad, torch.tensor([[0.0, 1.75]]))


# ------------------------------------------------------------------------------------------ ternary
def test_ternary_hand_computed():
    w = torch.tensor([[0.1, -1.0, 2.0, -0.3]])
    # mean|w| = 0.85, Δ = 0.595: -1 and 2 survive, α = (1 + 2) / 2
    assert torch.equal(_weight(TernaryWeightQuantizer(ch_axis=0), w), torch.tensor([[0.0, -1.5, 1.5, 0.0]]))


def test_ternary_threshold_edge_is_zero():
    delta = torch.tensor(0.5)
    assert torch.equal(_ternary(torch.tensor([-0.6, -0.5, 0.5, 0.50001, 0.2]), delta),
                       torch.tensor([-1.0, 0.0, 0.0, 1.0, 0.0]))


def test_ternary_levels_and_alpha_per_channel():
    torch.manual_seed(1)
    w = torch.randn(5, 4, 3, 3)
    out = _weight(TernaryWeightQuantizer(ch_axis=0), w)
    for c in range(5):
        wc = w[c].flatten()
        delta = 0.7 * wc.abs().mean()
        alpha = wc.abs()[wc.abs() > delta].mean()
        level = out[c].abs().max()
        assert set(out[c].flatten().tolist()) == {-level.item(), 0.0, level.item()}
        assert level.item() == alpha.half().float().item()  # α on the float16 grid (exactly packable)
        assert torch.equal(out[c].flatten() != 0, wc.abs() > delta)


def test_ternary_all_zero_channel_gives_zero_not_nan():
    w = torch.zeros(2, 3)
    w[1] = torch.tensor([1.0, -2.0, 3.0])
    out = _weight(TernaryWeightQuantizer(ch_axis=0), w)
    assert torch.equal(out[0], torch.zeros(3)) and torch.isfinite(out).all()


def test_ternary_gradient():
    w = torch.tensor([[0.1, -1.0, 2.0, -0.3]], requires_grad=True)
    out = _weight(TernaryWeightQuantizer(ch_axis=0), w)
    out.backward(torch.tensor([[1.0, 1.0, 2.0, 1.0]]))
    # g_i·α (identity STE through T) + (Σ g_j T_j) · [|w_i| > Δ] · sign(w_i) / 2, with Σ g_j T_j = 1
    assert torch.allclose(w.grad, torch.tensor([[1.5, 1.0, 3.5, 1.5]]))


# ------------------------------------------------------------------------------------------ DoReFa weights
def test_dorefa_two_bit_levels():
    torch.manual_seed(2)
    out = _weight(DoReFaWeightQuantizer(2), torch.randn(64, 32))
    assert torch.equal(out.unique(), torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))


def test_dorefa_hand_computed():
    w = torch.tensor([0.0, 0.5, -2.0, 1.0])
    # tanh / (2·tanh 2) + 0.5 = [0.5, 0.7397, 0, 0.8950]; ×3 = [1.5, 2.22, 0, 2.68] → codes [2, 2, 0, 3]
    out = _weight(DoReFaWeightQuantizer(2), w)
    assert torch.equal(out, torch.tensor([1 / 3, 1 / 3, -1.0, 1.0]))
    t = torch.tanh(w)
    reference = 2 * torch.round((t / (2 * t.abs().max()) + 0.5) * 255) / 255 - 1
    assert torch.allclose(_weight(DoReFaWeightQuantizer(8), w), reference, atol=1e-6)


def test_dorefa_one_bit_is_sign_times_mean_magnitude():
    w = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    assert torch.equal(_weight(DoReFaWeightQuantizer(1), w), torch.tensor([[1.5, -1.5], [1.5, 1.5]]))


def test_dorefa_gradient_flows_through_tanh_and_the_maximum():
    w = torch.tensor([0.3, -1.2, 0.8], requires_grad=True)
    _weight(DoReFaWeightQuantizer(4), w).sum().backward()
    ref = w.detach().clone().requires_grad_(True)
    t = torch.tanh(ref)
    (2 * (t / (2 * t.abs().max()) + 0.5)).sum().backward()  # the same map without rounding (identity STE)
    assert torch.allclose(w.grad, ref.grad)


def test_dorefa_all_zero_weights_stay_finite():
    assert torch.isfinite(_weight(DoReFaWeightQuantizer(3), torch.zeros(4, 4))).all()


# ------------------------------------------------------------------------------------------ activations
def test_dorefa_activation_with_the_original_pre_scale():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.3, 5.0, 6.7, 10.0, 20.0])
    out = DoReFaActivationQuantizer(2, pre_scale=0.1)(x)
    assert torch.equal(out * 3, torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 3.0, 3.0]))


def test_dorefa_activation_gradient_is_masked_to_the_clamp_range():
    x = torch.tensor([-1.0, 0.5, 5.0, 20.0], requires_grad=True)
    DoReFaActivationQuantizer(3, pre_scale=0.1)(x).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.0, 0.1, 0.1, 0.0]))


def test_rounding_modes():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert torch.equal(round_half_away(x), torch.tensor([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0]))
    half = torch.tensor([0.5, 0.25])
    assert torch.equal(DoReFaActivationQuantizer(1)(half), torch.tensor([0.0, 0.0]))  # half-to-even
    assert torch.equal(DoReFaActivationQuantizer(1, rounding="half_away")(half), torch.tensor([1.0, 0.0]))


def test_sign_activation_values_and_hardtanh_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    out = SignActivation()(x)
    out.sum().backward()
    assert torch.equal(out, torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))


def test_float_family_is_the_identity():
    x = torch.randn(5)
    assert QuantizerSpec("float", 32).build()(x) is x


# ------------------------------------------------------------------------------------------ codes
_WEIGHT_FAMILIES = [("binary", 1, {}), ("binary", 1, {"center": True, "clip": True}), ("ternary", 2, {})] + [
    ("dorefa", bits, {}) for bits in range(1, 9)
]


@pytest.mark.parametrize("family,bits,options", _WEIGHT_FAMILIES)
@pytest.mark.parametrize("layout", ["conv", "conv_transpose", "per_tensor"])
def test_weight_codes_dequantize_bit_exactly(family, bits, options, layout):
    torch.manual_seed(bits)
    w = torch.randn(8, 6, 3, 3) * 0.3
    ch_axis = {"conv": 0, "conv_transpose": 1, "per_tensor": None}[layout]
    spec = QuantizerSpec(family, bits, per_channel=ch_axis is not None, options=options)
    quantizer = spec.build(ch_axis, None if ch_axis is None else w.shape[ch_axis])
    out = _weight(quantizer, w)
    codes = quantizer.weight_codes(w)
    assert codes.bits == bits and codes.codes.dtype == torch.int64
    assert codes.codes.min() >= 0 and codes.codes.max() < 2**bits
    assert torch.equal(codes.dequantize(), out)
    assert len(codes.codes.unique()) <= (3 if family == "ternary" else 2**bits)


# ------------------------------------------------------------------------------------------ bad settings
@pytest.mark.parametrize("family,bits,fragment", [
    ("binary", 2, "1 bit"), ("ternary", 1, "2 bits"), ("dorefa", 0, "1 to 16"), ("dorefa", 17, "1 to 16"),
    ("dorefa_activation", 0, "1 to 16"), ("dorefa_activation", 17, "1 to 16"), ("sign", 2, "1 bit"),
    ("float", 8, "32 bits"),
])
def test_impossible_bit_widths(family, bits, fragment):
    with pytest.raises(QuantizationError, match=fragment):
        QuantizerSpec(family, bits).build()


@pytest.mark.parametrize("family,bits,options,fragment", [
    ("binary", 1, {"scale": 2}, "no option scale"),
    ("ternary", 2, {"center": True}, "no option center"),
    ("dorefa", 4, {"pre_scale": 0.1}, "no option pre_scale"),
    ("dorefa_activation", 4, {"pre_scale": 0.0}, "positive"),
    ("dorefa_activation", 4, {"rounding": "up"}, "unknown rounding"),
])
def test_bad_options(family, bits, options, fragment):
    with pytest.raises(QuantizationError, match=fragment):
        QuantizerSpec(family, bits, options=options).build()
