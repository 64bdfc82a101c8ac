"""The fused straight-through activations (one autograd node each) against the unfused autograd
expressions they replace: forward values and gradients must be bit-identical, and so must the weights
after a few training steps of each preset."""

import pytest
import torch
import torch.nn.functional as F

from micronet.compression.quantization.core import lowbit
from micronet.compression.quantization.core import native as native_kernels
from micronet.compression.quantization.core.lowbit import DoReFaActivationQuantizer, SignActivation, round_half_away
from micronet.compression.quantization.wbwtab import quantize as wbwtab
from micronet.compression.quantization.wqaq.dorefa import quantize as dorefa
from micronet.models import build_model


class _Straight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _reference_sign(x):
    """The unfused hardtanh STE: sign with 0 → +1, gradient × (|x| < 1)."""
    hard = torch.clamp(x, -1.0, 1.0)
    sign = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    return torch.where(x.abs() < 1, hard, hard.detach()) + (sign - hard).detach()


def _reference_dorefa(x, pre_scale, bits, rounding):
    levels = 2**bits - 1
    clipped = torch.clamp(x * pre_scale, 0.0, 1.0)
    return _Straight.apply(clipped * levels, rounding) / levels


def _probe(seed=0):
    """Random values plus the edges: exact 0, ±1, the clip points, ties of the rounding, ±inf, large."""
    g = torch.Generator().manual_seed(seed)
    edges = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0, 1 / 3, 0.5, 1.5, 2.5, -2.5, 1e6, -1e6, float("inf"), float("-inf")])
    return torch.cat([torch.randn(4000, generator=g) * 3, edges])


def test_sign_activation_matches_the_unfused_expression_bit_for_bit():
    x = _probe().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    out, ref = SignActivation()(x), _reference_sign(x_ref)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert torch.equal(out, ref)
    assert torch.equal(x.grad, x_ref.grad)
    assert set(out.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("bits,pre_scale,rounding", [(4, 0.33, "half_even"), (2, 0.1, "half_away"), (8, 1.0, "half_even")])
def test_dorefa_activation_matches_the_unfused_expression_bit_for_bit(bits, pre_scale, rounding):
    x = _probe(bits).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    quantizer = DoReFaActivationQuantizer(bits, pre_scale=pre_scale, rounding=rounding)
    out = quantizer(x)
    ref = _reference_dorefa(x_ref, pre_scale, bits, torch.round if rounding == "half_even" else round_half_away)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert torch.equal(out, ref)
    assert torch.equal(x.grad, x_ref.grad)


def test_nan_inputs_get_no_gradient_in_either_activation():
    x = torch.tensor([float("nan"), 0.5], requires_grad=True)
    DoReFaActivationQuantizer(4)(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0]


def _train(model, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32, generator=g) * 2, torch.randint(0, 10, (8,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("preset", ["binary", "dorefa"])
def test_training_steps_match_the_unfused_expressions(preset, monkeypatch):
    def prepared():
        torch.manual_seed(0)
        model = build_model("nin", 10, 3, [16, 16, 8, 16, 16, 16, 16, 16])
        if preset == "binary":
            return wbwtab.prepare(model, W=2, A=2)
        return dorefa.prepare(model, a_bits=4, w_bits=4, pre_scale=0.33)

    fused = _train(prepared())
    monkeypatch.setattr(lowbit, "sign_ste", _reference_sign)
    monkeypatch.setattr(DoReFaActivationQuantizer, "quantize",
                        lambda self, x: _reference_dorefa(x, self.pre_scale, int(self.bits), self._round))
    reference = _train(prepared())
    assert fused.keys() == reference.keys()
    differing = [k for k in fused if not torch.equal(fused[k], reference[k])]
    assert differing == []
    assert any(not torch.equal(fused[k], prepared().state_dict()[k]) for k in fused if k.endswith("weight"))


def test_approx_sign_has_the_same_values_and_the_bireal_gradient():
    x = torch.tensor([-2.0, -1.0, -0.75, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5], requires_grad=True)
    approx = SignActivation(gradient="approx")
    out = approx(x)
    out.sum().backward()
    assert torch.equal(out, SignActivation()(x.detach()))
    assert x.grad.tolist() == [0.0, 0.0, 0.5, 1.5, 2.0, 1.5, 1.0, 0.0, 0.0]


def test_unknown_sign_gradient_is_refused():
    from micronet.errors import QuantizationError

    with pytest.raises(QuantizationError, match="unknown sign gradient 'box'"):
        SignActivation(gradient="box")


def test_a_model_trained_with_the_approx_gradient_exports_to_onnx_like_the_default(tmp_path):
    """The gradient option changes training only: after a few steps the model exports, and ONNX Runtime's
    outputs match PyTorch's (sign values are exact, the float layers agree to float32 rounding)."""
    import numpy as np
    import onnxruntime as ort

    from micronet.deploy.onnx import export

    torch.manual_seed(0)
    model = wbwtab.prepare(build_model("nin", 10, 3, [16, 16, 8, 16, 16, 16, 16, 16]), W=2, A=2)
    from micronet.compression.quantization.core.workflow import prepare

    torch.manual_seed(0)
    approx = prepare(build_model("nin", 10, 3, [16, 16, 8, 16, 16, 16, 16, 16]), wbwtab.wbwtab_scheme(sign_gradient="approx"))
    assert all(m.gradient == "approx" for m in approx.modules() if isinstance(m, SignActivation))
    trained_default, trained_approx = _train(model), _train(approx)
    assert any(not torch.equal(trained_default[k], trained_approx[k]) for k in trained_default)  # training differs
    approx.eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    export(approx, tmp_path / "approx.onnx", x[:1], exporter="legacy")
    session = ort.InferenceSession(str(tmp_path / "approx.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        reference = approx(x).numpy()
    assert np.abs(got - reference).max() <= 1e-4 * max(np.abs(reference).max(), 1.0)


def _layouts():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 6, 7, generator=g) * 2
    x.view(-1)[:8] = torch.tensor([0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 0.9999999])
    return {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last), "flat": x.reshape(-1)}


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "flat"])
def test_native_sign_kernel_gives_torchs_sign_and_mask_in_the_inputs_layout(layout):
    assert native_kernels.activation_kernels() is not None, "the C++ sign kernel did not build (g++ and ninja are in the base image)"
    x = _layouts()[layout]
    out, inside = lowbit.sign_and_mask(x)
    assert torch.equal(out, lowbit._sign(x)) and torch.equal(inside, x.abs() < 1)
    assert out.stride() == x.stride() and inside.stride() == x.stride()
    assert out.dtype == torch.float32 and inside.dtype == torch.bool


def test_without_a_compiler_the_torch_sign_runs_after_one_warning(monkeypatch):
    import torch.utils.cpp_extension as cpp

    from micronet.native import NativeKernelWarning

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    x = _layouts()["channels_last"]
    native = lowbit.sign_and_mask(x)
    monkeypatch.setattr(cpp, "load", broken)
    native_kernels.activation_kernels.cache_clear()
    try:
        with pytest.warns(NativeKernelWarning, match="running the pure-torch activations") as caught:
            fallback = lowbit.sign_and_mask(x)
            lowbit.sign_and_mask(x)
        assert len(caught) == 1
        assert all(torch.equal(a, b) for a, b in zip(native, fallback))
        monkeypatch.setenv(native_kernels.NATIVE_ACTIVATIONS_ENV, "0")
        native_kernels.activation_kernels.cache_clear()
        assert native_kernels.activation_kernels() is None  # switched off: no build attempted, no warning
    finally:
        native_kernels.activation_kernels.cache_clear()


@pytest.mark.parametrize("rounding", ["half_even", "half_away"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_native_dorefa_kernel_gives_the_torch_paths_values_and_gradients(layout, rounding, monkeypatch):
    assert native_kernels.activation_kernels() is not None
    quantizer = DoReFaActivationQuantizer(3, pre_scale=0.37, rounding=rounding)
    x = _layouts()["nchw"] * 2
    x.view(-1)[-4:] = torch.tensor([0.5 / 0.37, 2.5 / 7 / 0.37, -0.0, 1 / 0.37])  # ties and the clip points
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    native = quantizer(x)
    (native * upstream).sum().backward()
    native_grad, x.grad = x.grad, None
    monkeypatch.setenv(native_kernels.NATIVE_ACTIVATIONS_ENV, "0")
    native_kernels.activation_kernels.cache_clear()
    try:
        assert native_kernels.activation_kernels() is None
        reference = quantizer(x)
        (reference * upstream).sum().backward()
    finally:
        native_kernels.activation_kernels.cache_clear()
    torch.testing.assert_close(native, reference, rtol=0, atol=0, equal_nan=True)  # bit-identical; NaN in, NaN out
    assert native.stride() == x.stride()
    assert torch.equal(native_grad, x.grad)


@pytest.mark.parametrize("zero_point", [None, 3.0])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_native_affine_fake_quant_gives_the_torch_chains_values_and_gradients(layout, zero_point, monkeypatch):
    from micronet.compression.quantization.core.affine import fake_quantize

    assert native_kernels.activation_kernels() is not None
    scale, zp = torch.tensor([0.05]), None if zero_point is None else torch.tensor([zero_point])
    x = _layouts()["nchw"] * 4
    x.view(-1)[-3:] = torch.tensor([0.025, 0.075, 127.5 * 0.05])  # ties of the rounding and the top code
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    upstream.view(-1)[:2] = torch.tensor([float("inf"), float("nan")])  # × a zero mask: NaN, as torch's grad * mask
    if layout == "channels_last":
        upstream = upstream.contiguous(memory_format=torch.channels_last)

    def run():
        out = fake_quantize(x, scale, zp, -128, 127, None)
        (grad,) = torch.autograd.grad(out, x, upstream)
        return out, grad

    native = run()
    monkeypatch.setenv(native_kernels.NATIVE_ACTIVATIONS_ENV, "0")
    native_kernels.activation_kernels.cache_clear()
    try:
        reference = run()
    finally:
        native_kernels.activation_kernels.cache_clear()
    for ours, theirs in zip(native, reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    assert native[0].stride() == x.stride()


def _observed_state(quantizer, batches, shared):
    outputs = []
    for batch in batches:
        outputs += quantizer.forward_shared(batch, batch * -0.5 + 1) if shared else [quantizer(batch)]
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    return state, outputs


@pytest.mark.parametrize("observer,options", [("moving_average", {"momentum": 0.1}), ("minmax", {"running": True}),
                                              ("minmax", {"running": False})])
@pytest.mark.parametrize("symmetric,signed", [(True, None), (False, None), (True, False), (False, True)])
@pytest.mark.parametrize("shared", [False, True])
def test_native_per_tensor_observation_gives_the_tensor_paths_state_bit_for_bit(observer, options, symmetric, signed,
                                                                                 shared, monkeypatch):
    """Per-tensor observers take the batch extremes from one C++ pass and update in float32 scalars: every
    buffer (range, scale, zero point, signedness) and every output equals the tensor path's, over batches
    that widen, shrink and change sign (odd sizes exercise the kernel's tail)."""
    from micronet.compression.quantization.core.observers import build_observer
    from micronet.compression.quantization.core.quantizers import AffineQuantizer

    assert native_kernels.activation_kernels() is not None
    g = torch.Generator().manual_seed(7)
    batches = [torch.rand(3, 5, 7, 11, generator=g) * 3, torch.randn(1013, generator=g) * 0.7 - 0.2,
               torch.rand(2, 3, 9, 9, generator=g) + 0.5, torch.tensor([-0.0, 0.0, 1e-30, 2.5]),
               torch.randn(4, 16, 6, 6, generator=g).contiguous(memory_format=torch.channels_last) * 40]

    def run():
        torch.manual_seed(0)
        quantizer = AffineQuantizer(8, build_observer(observer, **options), symmetric=symmetric, signed=signed).train()
        return _observed_state(quantizer, batches, shared)

    assert build_observer(observer, **options).observe_extremes(batches[0]) is not None  # the native path runs
    native_state, native_out = run()
    monkeypatch.setenv(native_kernels.NATIVE_ACTIVATIONS_ENV, "0")
    native_kernels.activation_kernels.cache_clear()
    try:
        assert build_observer(observer, **options).observe_extremes(batches[0]) is None
        torch_state, torch_out = run()
    finally:
        native_kernels.activation_kernels.cache_clear()
    assert native_state.keys() == torch_state.keys()
    for key in native_state:
        assert torch.equal(native_state[key], torch_state[key]), key
    assert all(torch.equal(a, b) for a, b in zip(native_out, torch_out))


@pytest.mark.parametrize("bad,kind", [(float("nan"), "NaN"), (float("inf"), "infinite"), (float("-inf"), "infinite")])
def test_native_observation_names_non_finite_inputs(bad, kind):
    from micronet.compression.quantization.core.observers import build_observer
    from micronet.compression.quantization.core.quantizers import AffineQuantizer
    from micronet.errors import QuantizationError

    quantizer = AffineQuantizer(8, build_observer("moving_average")).train()
    quantizer.qualified_name = "features.3.input_quantizer"
    x = torch.randn(2, 4, 5, 5)
    quantizer(x)
    x.view(-1)[37] = bad
    with pytest.raises(QuantizationError, match=rf"features\.3\.input_quantizer received {kind} values"):
        quantizer(x)
    *_, finite = native_kernels.activation_kernels().min_max(x)
    assert finite is False


def _channel_steps(quantizer, weights, upstream):
    outputs, grads = [], []
    for w in weights:
        w = w.clone().requires_grad_(True)
        out = quantizer(w)
        (grad,) = torch.autograd.grad(out, w, upstream[: w.numel()].view_as(w))
        outputs.append(out.detach())
        grads.append(grad)
    with torch.no_grad():
        outputs.append(quantizer(weights[-1] * 1.5))  # and without autograd
    return {k: v.clone() for k, v in quantizer.state_dict().items()}, outputs, grads


@pytest.mark.parametrize("bits,narrow", [(8, False), (4, True), (2, False)])
@pytest.mark.parametrize("symmetric,signed", [(True, None), (False, None), (True, True), (False, False)])
@pytest.mark.parametrize("running", [False, True])
def test_native_per_channel_weight_step_gives_the_tensor_paths_state_bit_for_bit(bits, narrow, symmetric, signed,
                                                                                running, monkeypatch):
    """A per-channel min/max weight quantizer observes, derives its parameters and fake-quantizes in one C++
    call: outputs, gradients and every buffer equal the tensor path's over weights that change sign, have
    an all-zero channel, odd sizes (the kernel's tail) or are all non-negative (auto-signed turns unsigned)."""
    from micronet.compression.quantization.core.observers import MinMaxObserver
    from micronet.compression.quantization.core.quantizers import AffineQuantizer

    g = torch.Generator().manual_seed(bits + 2 * running)
    first = torch.randn(6, 5, 3, 3, generator=g) * 0.2
    first[2] = 0.0  # a dead channel: the scale's EPS floor
    weights = [first, first * 1.3 - 0.05, torch.rand(6, 5, 3, 3, generator=g) * 0.4]  # the last: no negatives
    upstream = torch.randn(6 * 5 * 9, generator=g)

    def run():
        quantizer = AffineQuantizer(bits, MinMaxObserver(0, 6, running=running), symmetric=symmetric, signed=signed,
                                    narrow_range=narrow).train()
        return quantizer, _channel_steps(quantizer, weights, upstream)

    quantizer, native = run()
    assert quantizer._observes_channels_in_one_call(weights[0])
    monkeypatch.setenv(native_kernels.NATIVE_ACTIVATIONS_ENV, "0")
    native_kernels.activation_kernels.cache_clear()
    try:
        quantizer, reference = run()
        assert not quantizer._observes_channels_in_one_call(weights[0])
    finally:
        native_kernels.activation_kernels.cache_clear()
    native_state, native_out, native_grads = native
    torch_state, torch_out, torch_grads = reference
    assert native_state.keys() == torch_state.keys()
    for key in native_state:
        assert torch.equal(native_state[key], torch_state[key]), key
    for ours, theirs in zip(native_out + native_grads, torch_out + torch_grads):
        assert torch.equal(ours, theirs)
    if signed is None:  # the last weights are non-negative: unsigned unless the running extremes kept a negative
        assert int(native_state["signed"]) == int(running)


def test_native_per_channel_weight_step_names_non_finite_weights():
    from micronet.compression.quantization.core.observers import MinMaxObserver
    from micronet.compression.quantization.core.quantizers import AffineQuantizer
    from micronet.errors import QuantizationError

    quantizer = AffineQuantizer(8, MinMaxObserver(0, 4, running=False)).train()
    quantizer.qualified_name = "layer1.0.conv1.weight_quantizer"
    w = torch.randn(4, 3, 3, 3)
    quantizer(w)
    before = quantizer.scale.clone()
    w[1, 0, 0, 0] = float("nan")
    with pytest.raises(QuantizationError, match=r"layer1\.0\.conv1\.weight_quantizer received NaN values"):
        quantizer(w)
    assert torch.equal(quantizer.scale, before)  # nothing half-updated
    with pytest.raises(QuantizationError, match="expects 4 channels"):
        quantizer(torch.randn(5, 3, 3, 3))
