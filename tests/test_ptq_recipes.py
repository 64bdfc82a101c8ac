"""Post-training recipes: cross-layer equalization, bias correction, AdaRound, post_training_quantize.

Toy models and synthetic data: every test runs in seconds. Accuracy on trained models is measured by
bench/ptq_accuracy.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from micronet.base_module.op import Add
from micronet.compression.quantization import post_training_quantize
from micronet.compression.quantization.core.integer_bias import folded_channel_scale
from micronet.compression.quantization.ptq import AdaRoundOptions, equalize, output_shift
from micronet.compression.quantization.ptq.adaround import reconstruction_steps, rectified_sigmoid
from micronet.compression.quantization.ptq.layers import layer_units
from micronet.errors import QuantizationError


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Conv output channels and BatchNorm scales spread over three decades: the range imbalance CLE is for."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data *= (10 ** (torch.rand(m.out_channels, generator=g) * 3 - 2)).reshape(-1, 1, 1, 1)
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 10 ** (torch.rand(n, generator=g) * 3 - 2)
            m.bias.data = torch.randn(n, generator=g) * 0.5
            m.running_mean = torch.randn(n, generator=g) * 0.2
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model.eval()


def _toy(seed: int = 0) -> nn.Module:
    """conv → BN → ReLU → depthwise conv → BN → ReLU → 1×1 conv → BN → ReLU → pool → linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )
    return _randomize_bn(model, seed)


def _data(n_batches: int, seed: int, batch: int = 32, shape=(3, 10, 10)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g) for _ in range(n_batches)]


# ------------------------------------------------------------------------------------------ equalization
def test_equalization_keeps_the_function_and_balances_the_ranges():
    model = _toy()
    x = torch.cat(_data(2, 1))
    equalized, report = equalize(model, absorb_high_bias=False)
    with torch.no_grad():
        reference, got = model(x), equalized(x)
    assert (got - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert report.folded_bn == 3 and len(report.pairs) == 2  # conv→depthwise, depthwise→1×1 (ReLU in between)
    layers = dict(equalized.named_modules())
    for first, second in report.pairs:  # both sides of every pair end with the same per-channel ranges
        r1 = layers[first].weight.abs().flatten(1).amax(1)
        w2 = layers[second].weight
        r2 = w2.abs().amax(dim=(1, 2, 3)) if layers[second].groups > 1 else w2.abs().transpose(0, 1).flatten(1).amax(1)
        assert torch.allclose(r1, r2, rtol=1e-3), (first, second)
    # the depthwise layer's channel ranges were spread over ~3 decades by the BatchNorms, and no longer are
    def spread(w: torch.Tensor) -> float:
        ranges = w.detach().abs().flatten(1).amax(1)
        return float(ranges.max() / ranges.min())

    from micronet.compression.fusion import fuse

    folded = dict(fuse(model)[0].named_modules())
    assert spread(layers["3"].weight) < spread(folded["3"].weight) / 10
    assert not any(isinstance(m, nn.BatchNorm2d) for m in equalized.modules())
    assert equalized.fusion_record is not None  # checkpoints rebuild the folded structure


def test_equalization_lowers_the_error_of_per_tensor_weights():
    model = _toy()
    calibration, held_out = _data(4, 2), torch.cat(_data(2, 3))
    with torch.no_grad():
        reference = model(held_out)
    errors = {}
    for flag in (False, True):
        quantized = post_training_quantize(model, calibration, w_bits=8, a_bits=8, num_batches=4, equalize=flag, q_level=1)
        with torch.no_grad():
            errors[flag] = float(((quantized.eval()(held_out) - reference) ** 2).mean())
    assert errors[True] < errors[False] / 4, errors


def _rounding_noise(model: nn.Module, x: torch.Tensor, layer_name: str, w_bits: int = 4) -> float:
    """Output error of ``layer_name`` with 4-bit per-channel weights and 8-bit per-tensor inputs, over its
    output power (bias left out: the rounding of products is what equalization moves)."""
    layer, seen = dict(model.named_modules())[layer_name], {}
    handle = layer.register_forward_pre_hook(lambda _m, inputs: seen.update(x=inputs[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    inputs, weight = seen["x"], layer.weight.detach()
    w_step = weight.abs().flatten(1).amax(1).reshape(-1, 1, 1, 1) / (2 ** (w_bits - 1) - 1)
    low = min(float(inputs.min()), 0.0)
    a_step = (float(inputs.max()) - low) / 255
    conv = lambda v, w: nn.functional.conv2d(v, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)  # noqa: E731
    reference = conv(inputs, weight)
    rounded = conv(torch.round((inputs - low) / a_step) * a_step + low, torch.round(weight / w_step) * w_step)
    return float((rounded - reference).pow(2).sum() / reference.pow(2).sum())


@pytest.mark.parametrize("seed", range(4))
def test_equalization_for_per_channel_weights_lowers_the_rounding_noise_classic_scales_raise(seed):
    """Per-channel weights: only the 1×1 layer's columns feel the depthwise→1×1 scales. Classic scales even
    out weight ranges (and here mostly raise the 1×1 layer's noise); the scales for the scheme lower it."""
    from micronet.compression.fusion import fuse
    from micronet.compression.quantization.wqaq.iao.quantize import iao_scheme

    model, calibration, held_out = _toy(seed), _data(4, 2), torch.cat(_data(2, 3))
    scheme = iao_scheme(a_bits=8, w_bits=4, ptq=True, q_level=0)
    by_noise, report = equalize(model, absorb_high_bias=False, calibration=calibration, scheme=scheme)
    with torch.no_grad():
        reference = model(held_out)
        assert (by_noise(held_out) - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert report.objective == "noise" and report.pairs == [("0", "3"), ("3", "6")]
    noise = {"identity": _rounding_noise(fuse(model)[0], held_out, "6"),
             "classic": _rounding_noise(equalize(model, absorb_high_bias=False)[0], held_out, "6"),
             "for the scheme": _rounding_noise(by_noise, held_out, "6")}
    assert noise["for the scheme"] <= 0.5 * min(noise["identity"], noise["classic"]), noise


def test_post_training_quantize_keeps_the_equalization_with_the_least_output_error():
    """Candidates: classic scales, noise scales (per-channel weights only) and none; the one kept leaves the
    least output error on the calibration data, so equalizing never does worse there than plain PTQ."""
    from micronet.compression.quantization.ptq.recipe import output_error
    from micronet.compression.quantization.wqaq.iao.quantize import iao_scheme

    model, calibration = _toy(), _data(2, 2)
    for q_level, candidates in ((0, {"ranges", "noise", "none"}), (1, {"ranges", "none"})):
        quantized = post_training_quantize(model, calibration, w_bits=4, a_bits=8, num_batches=2, equalize=True,
                                           q_level=q_level)
        record = quantized.ptq_recipe["equalization"]
        errors = record["output_errors"]
        assert set(errors) == candidates and errors[record["chosen"]] == min(errors.values())
        plain = post_training_quantize(model, calibration, w_bits=4, a_bits=8, num_batches=2, q_level=q_level)
        got = output_error(quantized, model, calibration, 2)
        assert got == pytest.approx(errors[record["chosen"]], rel=1e-4)
        assert got <= output_error(plain, model, calibration, 2) * (1 + 1e-6)
        assert "chosen by the quantized model's output error" in quantized.equalization_report.summary()
    with pytest.raises(QuantizationError, match="calibration"):
        equalize(model, scheme=iao_scheme(w_bits=4, ptq=True, q_level=0))


# ------------------------------------------------------------------------------------------ range search
def _heavy_tailed(model: nn.Module, seed: int = 0) -> nn.Module:
    """A few weights of each conv 20x the rest: the outliers that make min/max weight ranges coarse."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.view(-1)[torch.randint(0, m.weight.numel(), (2,), generator=g)] *= 20
    return model


@pytest.mark.parametrize("q_level", [1, 0])
def test_range_search_keeps_the_setting_with_the_least_output_error(q_level):
    """Four settings (activations percentile / histogram, weights min/max / MSE); the one kept leaves the least
    output error on the calibration data, never more than plain PTQ's, and the model is that setting's."""
    from micronet.compression.quantization.ptq.recipe import output_error

    model, calibration = _heavy_tailed(_toy(1), 1), _data(2, 3)
    quantized = post_training_quantize(model, calibration, w_bits=4, a_bits=4, num_batches=2, range_search=True,
                                       q_level=q_level)
    record = quantized.ptq_recipe["ranges"]
    errors = record["output_errors"]
    assert len(errors) == 4 and errors[record["chosen"]] == min(errors.values())
    got = output_error(quantized, model, calibration, 2)
    assert got == pytest.approx(errors[record["chosen"]], rel=1e-4)
    plain = post_training_quantize(model, calibration, w_bits=4, a_bits=4, num_batches=2, q_level=q_level)
    assert errors["activations percentile, weights minmax"] == pytest.approx(output_error(plain, model, calibration, 2),
                                                                              rel=1e-4)
    assert got <= output_error(plain, model, calibration, 2) * (1 + 1e-6)
    activation, weight = record["chosen"].removeprefix("activations ").split(", weights ")
    kinds = {type(q.observer).__name__ for name, q in quantized.named_modules() if name.endswith("weight_quantizer")}
    assert kinds == {"MSEObserver" if weight == "mse" else "MinMaxObserver"}
    assert "range search: kept" in quantized.range_search_report.summary()


def test_range_search_tries_only_what_the_options_leave_open():
    model, calibration = _toy(), _data(2, 4)
    quantized = post_training_quantize(model, calibration, w_bits=8, num_batches=2, range_search=True,
                                       activation_observer="histogram")
    assert set(quantized.ptq_recipe["ranges"]["output_errors"]) == {"activations histogram, weights minmax",
                                                                    "activations histogram, weights mse"}
    quantized = post_training_quantize(model, calibration, w_bits=8, num_batches=2, range_search=True,
                                       activation_observer="minmax", weight_range="mse")
    assert list(quantized.ptq_recipe["ranges"]["output_errors"]) == ["activations minmax, weights mse"]


def test_mse_weight_ranges_survive_a_checkpoint(tmp_path):
    from micronet.engine import load_checkpoint, save_checkpoint
    from micronet.models import build_model

    torch.manual_seed(2)
    nin = build_model("nin", num_classes=10, in_channels=1, cfg=[8, 8, 8, 8, 8, 8, 16, 16])
    model, calibration = _heavy_tailed(_randomize_bn(nin), 2), _data(2, 5, shape=(1, 16, 16))
    quantized = post_training_quantize(model, calibration, w_bits=4, a_bits=8, num_batches=2, q_level=1,
                                       weight_range="mse", activation_observer="histogram")
    clipped = [unit.layer.weight_quantizer for unit in layer_units(quantized)]
    extremes = [float(unit.layer.weight.detach().abs().max()) / 7 for unit in layer_units(quantized)]
    assert any(float(q.scale) < 0.9 * bound for q, bound in zip(clipped, extremes))  # outliers clipped
    save_checkpoint(tmp_path / "ckpt", quantized)
    checkpoint = load_checkpoint(tmp_path / "ckpt")
    reloaded = checkpoint.load_into(checkpoint.build_model()).eval()
    x = torch.cat(_data(2, 6, shape=(1, 16, 16)))
    with torch.no_grad():
        assert torch.equal(reloaded(x), quantized.eval()(x))


def test_high_bias_absorption_moves_the_bias_and_keeps_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6, momentum=1.0), nn.ReLU(), nn.Conv2d(6, 5, 1))
    x = torch.randn(256, 4, 6, 6)
    model.train()
    with torch.no_grad():
        model[1].weight.fill_(1.0)
        model[1].bias.copy_(torch.linspace(4, 8, 6))  # every channel's mean is ≥ 4σ above zero
        model(x)  # running statistics = these data's
    model.eval()
    equalized, report = equalize(model)
    assert report.absorbed == [("0", "3")]
    with torch.no_grad():
        reference, got = model(x), equalized(x)
        first_bias = dict(equalized.named_modules())["0"].bias
    assert float((got - reference).abs().mean()) <= 1e-3 * float(reference.abs().mean())
    unabsorbed, _ = equalize(model, absorb_high_bias=False)
    plain = dict(unabsorbed.named_modules())
    assert bool((first_bias < plain["0"].bias - 0.1).all())  # c = β − 3γ (in equalized units) taken out of every channel
    assert bool((dict(equalized.named_modules())["3"].bias > plain["3"].bias).any())


def test_relu6_pairs_are_equalized_without_moving_the_clip():
    """conv → BN → ReLU6 → depthwise → BN → ReLU6 → 1×1, BatchNorm statistics those of the data; channels 0,
    1 (β ≥ 7) and 7 (β + 3γ = 7.5) reach the clip, the others' scales spread over two decades."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8, momentum=1.0), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8, momentum=1.0), nn.ReLU6(),
        nn.Conv2d(8, 6, 1))
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        model[1].weight.copy_(10 ** torch.linspace(-2, 0.3, 8))
        model[1].bias.copy_(torch.tensor([7.0, 7.5, 0.5, 1.0, 0.2, 2.0, 0.1, 1.5]))
        model[3].weight.mul_((10 ** torch.linspace(1, -1.5, 8)).reshape(-1, 1, 1, 1))
        model.train()(x)  # running statistics = these data's
    model.eval()
    equalized, report = equalize(model, absorb_high_bias=False)
    assert report.pairs == [("0", "3"), ("3", "6")] and report.held_by_clip[0] == ("0", 3)
    with torch.no_grad():
        reference, got = model(x), equalized(x)
    assert float((got - reference).abs().mean()) <= 1e-3 * float(reference.abs().mean())
    from micronet.compression.fusion import fuse

    folded, layers = dict(fuse(model)[0].named_modules()), dict(equalized.named_modules())
    clipped = [0, 1, 7]
    assert torch.equal(layers["0"].weight[clipped], folded["0"].weight[clipped])  # channels at the clip keep their scale
    spread = lambda w: float(w.detach().abs().flatten(1).amax(1).max() / w.detach().abs().flatten(1).amax(1).min())  # noqa: E731
    assert spread(layers["3"].weight) < spread(folded["3"].weight) / 4  # measured 14.1 → 2.3


def test_relu6_bounds_come_from_calibration_data_when_batchnorm_statistics_understate_them():
    """BatchNorm statistics of narrow data, inputs 4× wider: β + 3γ understates the pre-activations, so
    scaling by it alone moves the ReLU6 clip; the maxima seen on calibration data keep the function."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8, momentum=1.0), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8, momentum=1.0), nn.ReLU6(),
        nn.Conv2d(8, 6, 1))
    with torch.no_grad():
        model[1].weight.copy_(10 ** torch.linspace(-1, 0, 8))
        model[1].bias.fill_(0.5)
        model[3].weight.mul_((10 ** torch.linspace(1, -1.5, 8)).reshape(-1, 1, 1, 1))
        model.train()(torch.randn(64, 3, 8, 8))
    model.eval()
    x = 4 * torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        reference = model(x)
        data_free = equalize(model, absorb_high_bias=False)[0](x)
        bounded_model, report = equalize(model, absorb_high_bias=False, calibration=[x[:32], x[32:]])
        bounded = bounded_model(x)
    assert report.pairs == [("0", "3"), ("3", "6")]
    scale = float(reference.abs().mean())
    assert float((data_free - reference).abs().mean()) > 1e-2 * scale  # the clip moved
    assert float((bounded - reference).abs().mean()) <= 1e-5 * scale


def test_relu6_pairs_without_batchnorm_are_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), nn.Conv2d(4, 4, 1))
    equalized, report = equalize(model)
    assert report.pairs == [] and any(name == "0" and "ReLU6" in why for name, why in report.skipped)
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(equalized(x), model(x))


# ------------------------------------------------------------------------------------------ bias correction
def _grid(unit) -> torch.Tensor:
    """The int32 bias grid of a unit's output (per channel), in the unit's output units."""
    s_x = unit.layer.input_quantizer.scale.reshape(())
    if unit.bn is None:
        return (s_x * unit.layer.weight_quantizer.scale).double().reshape(-1)
    factor = unit.bn.integer_shift()[0]
    return (s_x * folded_channel_scale(unit.layer.weight_quantizer.scale, factor)).double()


def test_bias_correction_zeroes_the_mean_shift_on_the_calibration_data():
    model, data = _toy(1), _data(4, 4)
    plain = post_training_quantize(model, data, w_bits=4, a_bits=8, num_batches=4)
    corrected = post_training_quantize(model, data, w_bits=4, a_bits=8, num_batches=4, bias_correction=True)
    float_model = _toy(1)  # the same float model: the same module names as the quantized ones

    worst_before, worst_after = 0.0, 0.0
    for before, after in zip(layer_units(plain.eval()), layer_units(corrected.eval())):
        shift_before = output_shift(plain, float_model, before, data)
        shift_after = output_shift(corrected, float_model, after, data)
        grid = _grid(after)
        assert bool((shift_after.abs() <= grid / 2 + 1e-6).all()), (after.name, shift_after, grid)
        worst_before = max(worst_before, float((shift_before.abs() / grid).max()))
        worst_after = max(worst_after, float((shift_after.abs() / grid).max()))
    assert len(layer_units(corrected)) == 4  # three convs with BatchNorm, the linear layer with its own bias
    assert worst_before > 4 * worst_after, (worst_before, worst_after)  # in grid steps


# ------------------------------------------------------------------------------------------ AdaRound
def test_rectified_sigmoid_reaches_zero_and_one():
    v = torch.tensor([-20.0, 0.0, 20.0])
    assert rectified_sigmoid(v).tolist() == [0.0, 0.5, 1.0]


def _layer_pair() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()


def _correlated(n_batches: int, seed: int) -> list[torch.Tensor]:
    """Smooth 8-channel images mixed from 3 sources: inputs with the correlations AdaRound exploits (for
    white noise nearest rounding is already optimal)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(8, 3, generator=torch.Generator().manual_seed(99))
    out = []
    for _ in range(n_batches):
        z = torch.nn.functional.interpolate(torch.randn(32, 3, 4, 4, generator=g), size=(8, 8), mode="bilinear")
        out.append(torch.einsum("oc,bchw->bohw", mix, z) + 0.1 * torch.randn(32, 8, 8, 8, generator=g))
    return out


def test_adaround_lowers_the_held_out_error_and_only_rounds_up_or_down():
    model = _layer_pair()
    calibration, held_out = _correlated(4, 5), torch.cat(_correlated(4, 6))
    nearest = post_training_quantize(model, calibration, w_bits=3, a_bits=8, num_batches=4)
    learned = post_training_quantize(model, calibration, w_bits=3, a_bits=8, num_batches=4, adaround=True,
                                     adaround_iterations=120, progress=False)
    with torch.no_grad():
        reference = model[0](held_out)
        errors = [float(((m.eval()[0](held_out) - reference) ** 2).mean()) for m in (nearest, learned)]
    assert errors[1] < 0.8 * errors[0], errors
    changed = 0
    for name in ("0", "2"):
        float_weight = dict(model.named_modules())[name].weight
        layer = dict(learned.named_modules())[name]
        scale = layer.weight_quantizer.scale.reshape(-1, 1, 1, 1)
        codes = layer.weight / scale
        assert torch.allclose(codes, codes.round(), atol=1e-4)  # the weight holds its codes exactly
        assert bool(((codes.round() - float_weight / scale).abs() < 1).all())  # rounded up or down, never further
        changed += int((codes.round() != torch.round(float_weight / scale)).sum())
    assert changed > 0
    rows = learned.ptq_recipe["adaround_layers"]
    assert [r["layer"] for r in rows] == ["0", "2"] and all(r["error_learned"] <= r["error_nearest"] for r in rows)


class _Residual(nn.Module):
    """conv → BN → ReLU → conv → BN, plus the input, then ReLU: a residual block of two quantized layers
    (its conv called twice when ``shared``; ``functional``: torch.relu, which ``prepare`` rewrites as a graph)."""

    def __init__(self, channels: int, shared: bool = False, functional: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = torch.relu if functional else nn.ReLU()
        self.conv2 = self.conv1 if shared else nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.add = Add()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.add(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))), x))


class _TwoInputs(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 1)
        self.add = Add()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.add(self.conv2(self.relu(self.conv1(x))), skip)


class _ConvTwice(nn.Module):
    """Two layers, the first called twice: no single input to reconstruct it from."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(self.relu(self.conv1(x)))))


class _ResidualNet(nn.Module):
    def __init__(self, shared: bool = False, functional: bool = False) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.block = _Residual(8, shared, functional)
        self.pair = _TwoInputs(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        return self.head(self.flatten(self.pool(self.pair(self.block(x), x))))


def _steps(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[str | None, list[str]]]:
    quantized = post_training_quantize(model, _data(1, 0, batch=4, shape=shape), w_bits=4, num_batches=1)
    return [(step.block, [unit.name for unit in step.units])
            for step in reconstruction_steps(quantized, torch.randn(2, *shape), blocks=True)]


def test_block_reconstruction_groups_the_layers_of_each_residual_block():
    from micronet.models import build_model

    resnet = build_model("resnet20", 10, 1, cfg=[8, 8, 8] + [4] * 9).eval()
    assert _steps(resnet, (1, 12, 12)) == [(None, ["conv1"])] + [
        (f"layer{stage}.{k}", [f"layer{stage}.{k}.conv1", f"layer{stage}.{k}.conv2"]
         + ([f"layer{stage}.{k}.shortcut.0"] if k == 0 and stage > 1 else []))
        for stage in (1, 2, 3) for k in range(3)] + [(None, ["fc"])]
    mobilenet = build_model("mobilenetv2", 10, 1).eval()
    steps = _steps(mobilenet, (1, 16, 16))
    blocks = [(block, layers) for block, layers in steps if block is not None]
    assert len(blocks) == 17 and all(len(layers) in (2, 3) for _, layers in blocks)
    assert [len(layers) for block, layers in steps if block is None] == [1, 1, 1]  # stem, last conv, classifier
    nin = build_model("nin", 10, 1, cfg=[8] * 8).eval()
    assert all(block is None for block, _ in _steps(nin, (1, 12, 12)))
    # a block taking two tensors, a layer called twice, or a block prepare rewrote as a graph: layer by layer
    layer_by_layer = [(None, [name]) for name in ("stem", "block.conv1", "block.conv2", "pair.conv1", "pair.conv2", "head")]
    assert _steps(_ResidualNet(functional=True).eval(), (8, 8, 8)) == layer_by_layer
    assert _steps(_ResidualNet(shared=True).eval(), (8, 8, 8)) == [step for step in layer_by_layer
                                                                     if step[1] != ["block.conv2"]]
    twice = nn.Sequential(nn.Conv2d(8, 8, 1), _ConvTwice(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    assert _steps(twice.eval(), (8, 8, 8)) == [(None, [name]) for name in ("0", "1.conv1", "1.conv2", "4")]
    assert _steps(_ResidualNet().eval(), (8, 8, 8)) == [
        (None, ["stem"]), ("block", ["block.conv1", "block.conv2"]), (None, ["pair.conv1"]), (None, ["pair.conv2"]),
        (None, ["head"])]


def test_block_adaround_lowers_the_held_out_block_error_and_only_rounds_up_or_down():
    model = _ResidualNet().eval()
    calibration, held_out = _correlated(4, 5), torch.cat(_correlated(4, 6))
    options = dict(w_bits=3, a_bits=8, num_batches=4, skip=["stem"])
    nearest = post_training_quantize(model, calibration, **options)
    learned = post_training_quantize(model, calibration, **options, adaround=True, adaround_iterations=150,
                                     adaround_blocks=True, progress=False)

    def block_output(m: nn.Module) -> torch.Tensor:
        return m.eval().block(m.relu(m.stem(held_out)))

    with torch.no_grad():
        reference = block_output(model)
        errors = [float(((block_output(m) - reference) ** 2).mean()) for m in (nearest, learned)]
    assert errors[1] < 0.8 * errors[0], errors
    for name in ("block.conv1", "block.conv2"):
        float_weight = model.get_submodule(name).weight
        layer = learned.get_submodule(name)
        scale = layer.weight_quantizer.scale.reshape(-1, 1, 1, 1)
        codes = layer.weight / scale
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert bool(((codes.round() - float_weight / scale).abs() < 1).all())
    rows = learned.ptq_recipe["adaround_layers"]
    assert [(r["layer"], r.get("block_layers")) for r in rows] == [
        ("block", ["conv1", "conv2"]), ("pair.conv1", None), ("pair.conv2", None), ("head", None)]
    assert rows[0]["error_learned"] < rows[0]["error_nearest"]
    assert learned.ptq_recipe["adaround_options"]["blocks"] is True
    assert "block (block of conv1, conv2)" in learned.adaround_report.summary()


def test_bias_correction_leaves_the_layers_learned_with_their_block():
    model = _ResidualNet().eval()
    learned = post_training_quantize(model, _correlated(2, 5), w_bits=4, num_batches=2, adaround=True,
                                     adaround_iterations=5, adaround_blocks=True, bias_correction=True, progress=False)
    corrected = learned.ptq_recipe["bias_corrected"]
    assert [name for name, _ in corrected["corrected"]] == ["stem", "pair.conv1", "pair.conv2", "head"]
    reason = "learned with their block by AdaRound, which matched the block's output"
    assert corrected["skipped"] == [[name, reason] for name in ("block.conv1", "block.conv2")]
    assert f"not corrected ({reason}): block.conv1, block.conv2" in learned.bias_correction_report.summary()


@pytest.mark.parametrize(("arch", "cfg", "blocks"), [("nin", [8, 8, 8, 8, 8, 8, 16, 16], False),
                                                     ("resnet20", [8, 8, 8] + [4] * 9, True)])
def test_adaround_codes_survive_a_checkpoint_and_run_in_onnxruntime(tmp_path, arch, cfg, blocks):
    import onnxruntime as ort

    from micronet.deploy.onnx import GraphView, export, load_model
    from micronet.engine import load_checkpoint, save_checkpoint
    from micronet.models import build_model

    torch.manual_seed(0)
    float_model = _randomize_bn(build_model(arch, num_classes=10, in_channels=1, cfg=cfg))
    data = _data(2, 7, shape=(1, 16, 16))
    model = post_training_quantize(float_model, data, w_bits=4, a_bits=8, num_batches=2, equalize=True,
                                   bias_correction=True, adaround=True, adaround_iterations=10,
                                   adaround_blocks=blocks, progress=False)
    save_checkpoint(tmp_path / "ckpt", model, extra={"ptq": model.ptq_recipe})
    checkpoint = load_checkpoint(tmp_path / "ckpt")
    reloaded = checkpoint.load_into(checkpoint.build_model()).eval()
    assert checkpoint.meta["extra"]["ptq"]["adaround"] is True
    x = torch.cat(_data(2, 8, shape=(1, 16, 16)))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model.eval()(x))
    codes = {}
    for unit, again in zip(layer_units(model), layer_units(reloaded)):
        a = unit.layer.weight_quantizer.weight_codes(unit.layer.weight)
        b = again.layer.weight_quantizer.weight_codes(again.layer.weight)
        assert torch.equal(a.codes, b.codes)
        codes[unit.name] = (a.codes - a.zero_point.to(torch.int64)).numpy()

    report = export(model, tmp_path / "m.onnx", x[:1], exporter="legacy")
    view = GraphView(load_model(report.path))
    onnx_codes = [view.constant(dq.input[0]) for dq in view.nodes("DequantizeLinear")]
    onnx_codes = [c for c in onnx_codes if c is not None and c.ndim >= 2]
    for name, expected in codes.items():  # the file holds exactly the learned codes (4-bit values in int8)
        assert any(c.shape == expected.shape and np.array_equal(c.astype(np.int64), expected) for c in onnx_codes), name
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    step = float(np.abs(expected).max()) / 127
    assert np.abs(got - expected).max() <= step


# ------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_raise_one_line_errors():
    model, data = _toy(), _data(2, 9)
    with pytest.raises(QuantizationError, match="no conv or linear layer"):
        post_training_quantize(nn.Sequential(nn.ReLU(), nn.Flatten()), data, num_batches=2)
    with pytest.raises(QuantizationError, match="one-shot iterator"):
        post_training_quantize(model, iter(data), num_batches=2)
    with pytest.raises(QuantizationError, match="draws 32 calibration images per iteration but only 16"):
        post_training_quantize(model, [d[:8] for d in data], num_batches=2, adaround=True, adaround_iterations=5,
                               progress=False)
    with pytest.raises(QuantizationError, match="at least 1 iteration"):
        post_training_quantize(model, data, adaround=True, adaround_options=AdaRoundOptions(iterations=0))
    with pytest.raises(QuantizationError, match="set adaround=True or drop it"):
        post_training_quantize(model, data, adaround_blocks=True)
    with pytest.raises(QuantizationError, match="already quantized"):
        post_training_quantize(post_training_quantize(model, data, num_batches=1), data)


def test_cli_refuses_recipes_it_cannot_apply(tmp_path, cli_fails):
    from micronet.engine import save_checkpoint
    from micronet.models import build_model

    save_checkpoint(tmp_path / "lenet", build_model("lenet", 10, 1))
    base = ["quantize", "iao", "--checkpoint", str(tmp_path / "lenet"), "--data", "synthetic", "--out", str(tmp_path / "q")]
    cli_fails(base + ["--adaround"], "post-training recipes (--adaround) calibrate instead of training: add --ptq")
    cli_fails(base + ["--ptq", "--adaround", "--qaft"], "drop --qaft and pass the float checkpoint")
    cli_fails(["quantize", "dorefa", *base[2:], "--ptq", "--adaround"], "post-training recipes (--adaround) work "
                                                                        "on IAO's integer weights, not dorefa")
    cli_fails(base + ["--ptq", "--adaround", "--adaround-iters", "0"], "--adaround-iters must be at least 1")
    cli_fails(base + ["--ptq", "--adaround-iters", "5"], "add --adaround")
    cli_fails(base + ["--ptq", "--adaround-blocks"], "--adaround-blocks reconstructs blocks with AdaRound: add --adaround")
    cli_fails(base + ["--ptq", "--adaround", "--lsq"], "drop one")
    cli_fails(base + ["--range-search"], "post-training recipes (--range-search) calibrate instead of training")
    cli_fails(base + ["--weight-range", "mse"], "weight_range 'mse' searches the range of trained weights once")
    cli_fails(base + ["--ptq", "--adaround", "--ptq_batch", "1", "--batch-size", "8", "--no-progress"],
              "AdaRound draws 32 calibration images per iteration but only 8")
    assert not (tmp_path / "q").exists()


def test_a_pipeline_quantize_step_takes_the_recipes(tmp_path):
    from micronet.pipeline import load_config
    from micronet.pipeline.config import step_argv

    path = tmp_path / "p.yaml"
    path.write_text("""name: p
data: {data: fashion-mnist, train_subset: 256}
steps:
  - name: fp32
    run: train
    args: {model: lenet, epochs: 1}
  - name: ptq_w4a8
    run: quantize
    from: fp32
    args: {method: iao, ptq: true, w_bits: 4, range-search: true, equalize: true, bias-correction: true, adaround: true,
           adaround-iters: 300}
    row: W4A8 PTQ + recipes
""")
    config = load_config(path)
    argv = step_argv(config, next(step for step in config.steps if step.name == "ptq_w4a8"))
    for words in (["--range-search"], ["--equalize"], ["--bias-correction"], ["--adaround"], ["--adaround-iters", "300"]):
        assert any(argv[i:i + len(words)] == words for i in range(len(argv))), argv
