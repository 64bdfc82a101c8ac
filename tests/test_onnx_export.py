"""ONNX export: FP32 and QDQ files run in ONNX Runtime and compute what the micronet model computes.

"One output step" is the step of a symmetric 8-bit quantizer over the observed output range, max|y| / 127
(what an int8 runtime returning int8 logits would resolve). Agreement is measured on 256 real
Fashion-MNIST test images, ONNX Runtime with all graph optimisations on (its int8 kernels), files written
for the default ``portable`` target (the presets below quantize weights to 8 bits, which that target writes
as uint8 with zero point 128: exact on every CPU; its own 7-bit int8 weights are checked separately).

What holds on every x86 CPU. ONNX Runtime (MLAS) picks its kernels by CPU class. Its int8 convolutions
and GEMMs sum exactly in int32 with VNNI (AVX-512 VNNI, AVX-VNNI: vpdpbusd); on AVX2 and on AVX-512
without VNNI its u8s8 kernels add pairs of uint8×int8 products in saturating int16 first (vpmaddubsw:
exact only while 2·255·|w| ≤ 32767, weight codes within ±64) and its u8u8 kernels (uint8 weights)
zero-extend to int16 (vpmaddwd: exact). The exporter writes weights that the CPU's kernels sum exactly.
What follows the int32 sum is the same float32 arithmetic on every class: ``round_half_even(fl32(acc)
· fl32(scale))`` (QLinearConv, QGemm), QLinearAdd's float32 multiply-adds. ONNX Runtime's float kernels
(the convs of sign / ternary nets) and torch's kernels sum in a CPU-dependent order (8- or 16-wide
blocks), so even the model that 40 training steps give differs in its last bits from CPU to CPU.

Hence the assertions, none of them a figure measured on one CPU:

* int8 paths (IAO W8A8, with and without BN folding): ONNX Runtime computes exactly the integer network
  the file describes — every code of every QuantizeLinear equals micronet's integer reference with
  ``rounding="onnxruntime"`` (no tolerance: a saturating kernel is off by up to 64 codes), and the float
  output after the last codes agrees within float32 summation error (1e-5 of the range).
* against the fake-quant model (float32 in torch): each layer differs from the exact integer layer only
  where a value lies within float32 rounding of a code boundary (about 1e-6 of the codes of a layer,
  ``test_integer_reference.py``). Such a one-code flip propagates, and deep nets amplify it: the largest
  output difference is a property of the trained net and the CPU's summation order (ResNet-56 W8A8:
  1.47 steps on an AVX-512 VNNI EPYC, 5.24 on an AVX-512 Xeon without VNNI), not of the export, and is
  not asserted. Asserted: top-1 agreement ≥ 99% and ≥ 99% of the outputs within one step — floors an
  export error (a wrong scale, zero point, bias or fold moves every image's logits by many steps) cannot
  meet, far from what rounding flips reach (measured ≥ 99.5% within a step for every net and preset but
  the sign nets).
* sign activations (binary W/A): see :func:`_assert_sign_flips_are_rounding`.

ResNet-56 runs only with ``-m slow``: it is ResNet-20's code (the same BasicBlock, residual adds and
quantizer placement) three times deeper, so ResNet-20 proves every export path it takes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx_probes import with_clipped_code_outputs, with_quantized_outputs, with_sign_outputs

from micronet.compression.quantization.core.lowbit import DoReFaActivationQuantizer, SignActivation
from micronet.compression.quantization.core.workflow import calibrate, convert
from micronet.compression.quantization.wbwtab import quantize as wbwtab
from micronet.compression.quantization.wqaq.dorefa import quantize as dorefa
from micronet.compression.quantization.wqaq.iao import quantize as iao
from micronet.data import BatchLoader, load_dataset
from micronet.deploy.integer import IntegerModel
from micronet.deploy.onnx import GraphView, export, export_form, load_model
from micronet.deploy.onnxruntime import int8_coverage
from micronet.errors import DeployError
from micronet.models import build_model, list_models

TRAIN_STEPS = 40
TEST_IMAGES = 256


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    splits = load_dataset("fashion-mnist", train_subset=TRAIN_STEPS * 32, test_subset=TEST_IMAGES)
    train = [(x, y) for x, y in BatchLoader(splits.train, 32)]
    test = torch.cat([x for x, _ in BatchLoader(splits.test, TEST_IMAGES)])
    return {"train": torch.cat([x for x, _ in train]), "labels": torch.cat([y for _, y in train]), "test": test}


_TRAINED: dict[str, dict[str, torch.Tensor]] = {}


def _float_model(name: str, images: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A registry model after a few SGD steps on real images: realistic activation ranges and logits with
    real margins (an untrained net's near-equal logits would make any float difference flip its top-1)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=1)
    if name not in _TRAINED:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for x, y in zip(images["train"].split(32), images["labels"].split(32)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        _TRAINED[name] = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(_TRAINED[name])
    return model.eval()


PRESETS = {
    "iao_w8a8": lambda m: iao.prepare(m, a_bits=8, w_bits=8),
    "iao_w8a8_bn_fold": lambda m: iao.prepare(m, a_bits=8, w_bits=8, bn_fuse=True, pretrained_model=True),
    "dorefa_w4a4": lambda m: dorefa.prepare(m, a_bits=4, w_bits=4, pre_scale=0.25),
    "ternary_w3a32": lambda m: wbwtab.prepare(m, W=3, A=32),
    "binary_w2a2": lambda m: wbwtab.prepare(m, W=2, A=2),
}
MIN_TOP1, MIN_WITHIN_ONE_STEP = 0.99, 0.99


def _quantized(name: str, preset: str, images) -> torch.nn.Module:
    model = PRESETS[preset](_float_model(name, images))
    if preset.startswith("iao"):
        calibrate(model, images["train"][:512].split(128))
    return model.eval()


def _ort_outputs(path, x: torch.Tensor, batch: int) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": part.numpy()})[0] for part in x.split(batch)])


def _agreement(model, path, x: torch.Tensor, batch: int) -> tuple[float, float, float, float]:
    """(max |difference|, output step, top-1 agreement, share of outputs within one step)."""
    with torch.no_grad():
        reference = model(x).numpy()
    got = _ort_outputs(path, x, batch)
    step = float(np.abs(reference).max()) / 127
    top1 = float((got.argmax(1) == reference.argmax(1)).mean())
    difference = np.abs(got - reference)
    return float(difference.max()), step, top1, float((difference <= step).mean())


def _assert_runs_the_integer_network(path, x: torch.Tensor) -> None:
    """ONNX Runtime's int8 kernels compute, code for code, the integer network the file describes (see the
    module docstring): every QuantizeLinear's codes equal micronet's integer reference with ONNX Runtime's
    float32 requantization. The graph output (a float op over the last codes: average pool, Gemm) differs
    only by float32 summation order, ≤ K·2^-24 of the sum's magnitude for K ≤ 1,280 terms: < 1e-4 of the
    output range. Checked on AVX2 too, with ONNX Runtime 1.32 under QEMU's Haswell CPU model (user-mode
    emulation reports no AVX-512 or VNNI to MLAS): a ResNet-20 W8A8 export with uint8 weights (``auto``'s
    choice there) gave the integer reference's codes in all 32 quantized tensors; with 8-bit int8 weights,
    1.84 million codes differed, by up to 133 (vpmaddubsw saturation), which this check reports."""
    graph = onnx.load(str(path))
    session = ort.InferenceSession(with_quantized_outputs(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = dict(zip([out.name for out in session.get_outputs()], session.run(None, {"input": x.numpy()})))
    integer = IntegerModel.from_onnx(graph, rounding="onnxruntime")
    ours = integer.run_codes(x.numpy())
    for name in integer.quantized:
        differ = int((ours[name] != theirs[name]).sum())
        assert differ == 0, f"{name}: {differ} of {ours[name].size} codes differ from the integer network"
    output = integer(x.numpy())
    assert np.abs(output - theirs["output"]).max() <= 1e-4 * np.abs(theirs["output"]).max()


def _sign_activations(model, x: torch.Tensor) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The model's output and (input, ±1 output) of each sign activation, in call order."""
    captured = []
    hooks = [m.register_forward_hook(lambda m, i, o: captured.append((i[0].numpy(), o.numpy())))
             for m in model.modules() if isinstance(m, SignActivation)]
    try:
        with torch.no_grad():
            output = model(x).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return output, captured


def _max_pool(node: onnx.NodeProto):
    """The ONNX MaxPool ``node`` as a numpy → numpy function (symmetric pads, as torch writes them)."""
    assert node.op_type == "MaxPool", node.op_type
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    pads = list(attributes.get("pads", [0, 0, 0, 0]))
    assert pads[:2] == pads[2:], pads
    kernel, stride = list(attributes["kernel_shape"]), list(attributes.get("strides", [1, 1]))
    return lambda t: torch.nn.functional.max_pool2d(torch.from_numpy(t), kernel, stride, pads[:2],
                                                    ceil_mode=bool(attributes.get("ceil_mode", 0))).numpy()


SIGN_ROUNDING = 1e-4  # of a layer's pre-sign range: float32 sums of K ≤ 10^4 terms in any order, see below


def _assert_sign_flips_are_rounding(model, path, x: torch.Tensor) -> None:
    """Sign nets: ONNX Runtime's signs differ from the fake-quant model's only where float rounding decides.

    Both compute each pre-sign value v with float32 sums (the export also folds BatchNorm into the conv) in
    CPU-dependent orders; fed the same inputs they differ by far less than ``SIGN_ROUNDING`` of the layer's
    range (float32 sums of K ≤ 10^4 terms err by ≲ √K·2^-24 ≈ 6e-6 of the summed magnitude). A value that
    close to 0 may get the other sign, which changes one ±1 input of the next layers: after such a flip the
    two runs no longer see the same inputs, and nothing about later layers or the outputs is implied (one
    flip early in MobileNetV2 moved its logits by 9 output steps here, 16.9 on a CPU without VNNI). So, per
    image: in the first layer where any sign differs, every differing sign is a value within the bound of
    0 (the export may scale pre-sign values by a positive factor, σ/|γ| when it folds BatchNorm into a sign
    threshold, so their values are not compared across runtimes, only their signs); an image with no differing sign
    has outputs within float32 error (1e-4 of the range) of the model's. An export error (a wrong fold,
    bias or threshold) moves pre-sign values by far more than 1e-4 of their range on every image."""
    reference, torch_signs = _sign_activations(model, x)
    graph, pairs = with_sign_outputs(onnx.load(str(path)))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [out.name for out in session.get_outputs()]
    runs = [dict(zip(names, session.run(None, {"input": part.numpy()}))) for part in x.split(64)]
    theirs = {name: np.concatenate([run[name] for run in runs]) for name in names}
    assert len(pairs) == len(torch_signs) > 0
    producer = GraphView(graph).producer
    for layer, ((pre, sign), (torch_pre, torch_sign)) in enumerate(zip(pairs, torch_signs)):
        if theirs[sign].shape != torch_sign.shape:  # the export moved this sign after the max pool reading it
            pool = _max_pool(producer[pre])
            torch_signs[layer] = pool(torch_pre), pool(torch_sign)  # max of signs = sign of the max
            assert theirs[sign].shape == torch_signs[layer][1].shape
    for image in range(len(x)):
        for layer, ((_, sign), (torch_pre, torch_sign)) in enumerate(zip(pairs, torch_signs)):
            bound = SIGN_ROUNDING * np.abs(torch_pre[image]).max()
            flipped = theirs[sign][image] != torch_sign[image]
            if flipped.any():
                far = np.abs(torch_pre[image][flipped]).max()
                assert far <= bound, f"image {image}, sign layer {layer}: a sign of a value {far:.3g} from 0 differs"
                break
        else:
            difference = np.abs(theirs["output"][image] - reference[image]).max()
            assert difference <= 1e-4 * np.abs(reference).max(), f"image {image}: no sign differs, outputs do"


def _assert_code_flips_are_ties(model, path, x: torch.Tensor) -> None:
    """DoReFa nets: ONNX Runtime's activation codes differ from the fake-quant model's only at rounding ties.

    DoReFa's grids are rational (steps 1/(2^k − 1), pre_scale 1/4), so a layer's pre-activations lie on a
    lattice whose points can fall exactly on the next quantizer's rounding ties (x·p·n = k + ½); torch's
    float32 sums put such a value a rounding error above or below the tie, in a CPU- and thread-dependent
    way, and ONNX Runtime's requantization rounds it its own way. So, per image, as for signs: in the first
    quantizer where any code differs, every differing code is one code off at a value within
    ``SIGN_ROUNDING`` of the layer's range of a tie (an export error moves values far from ties, on every
    image); an image with no differing code has outputs within float32 error of the model's."""
    quantizers = [(name, q) for name, q in model.named_modules() if isinstance(q, DoReFaActivationQuantizer)]
    captured: dict[str, np.ndarray] = {}
    hooks = [q.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, i[0].numpy()))
             for name, q in quantizers]
    try:
        with torch.no_grad():
            reference = model(x).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    graph, codes = with_clipped_code_outputs(onnx.load(str(path)))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = dict(zip([out.name for out in session.get_outputs()], session.run(None, {"input": x.numpy()})))
    layers = [(name, q) for name, q in quantizers if name in captured and name in codes]
    assert layers, "no DoReFa quantizer of the model found in the file"
    for image in range(len(x)):
        for name, q in layers:
            scaled = np.clip(captured[name][image] * q.pre_scale, 0, 1) * (2 ** int(q.bits) - 1)
            ours = np.rint(scaled)  # half to even, as the quantizer and QuantizeLinear round
            flipped = ours != theirs[codes[name]][image]
            if flipped.any():
                assert np.abs(ours[flipped] - theirs[codes[name]][image][flipped]).max() == 1, name
                bound = SIGN_ROUNDING * np.abs(captured[name][image]).max() * q.pre_scale * (2 ** int(q.bits) - 1)
                far = np.abs(np.abs(scaled[flipped] - np.floor(scaled[flipped])) - 0.5).max()
                assert far <= bound, f"image {image}, {name}: a code {far:.3g} from a tie differs"
                break
        else:
            difference = np.abs(theirs["output"][image] - reference[image]).max()
            assert difference <= 1e-4 * np.abs(reference).max(), f"image {image}: no code differs, outputs do"


def _export_cases() -> list:
    """Every registry model × preset; ResNet-56 (ResNet-20's code, deeper) only with ``-m slow``."""
    return [pytest.param(name, preset, marks=[pytest.mark.slow] if name == "resnet56" else [])
            for name in list_models() for preset in PRESETS]


@pytest.mark.parametrize(("name", "preset"), _export_cases())
def test_qdq_export_matches_fake_quant_in_onnxruntime(tmp_path, images, name, preset):
    model = _quantized(name, preset, images)
    report = export(model, tmp_path / "m.onnx", images["test"][:1], exporter="legacy")
    assert report.quantized and report.op_counts.get("DequantizeLinear", 0) > 0
    x = images["test"]
    _, step, top1, within = _agreement(model, report.path, x, 64)
    assert top1 >= MIN_TOP1, f"{name}/{preset}: top-1 agreement {top1:.4f}"
    if preset.startswith("iao") and name == "nin_bireal":
        # its signs' learned thresholds add float per-channel constants to the real-valued stream, which the
        # integer reference does not model: it names the first such node instead of running a wrong program
        with pytest.raises(DeployError, match="threshold/Add.*not quantized"):
            IntegerModel.from_onnx(onnx.load(str(report.path)), rounding="onnxruntime")
    elif preset.startswith("iao"):
        _assert_runs_the_integer_network(report.path, x[:8])
    if preset == "binary_w2a2":
        _assert_sign_flips_are_rounding(model, report.path, x[:32])
    elif preset.startswith("dorefa"):
        _assert_code_flips_are_ties(model, report.path, x[:32])
    else:
        assert within >= MIN_WITHIN_ONE_STEP, f"{name}/{preset}: {within:.4f} of the outputs within one step"
    # dynamic batch: batches of 7 and 1 give what batch 64 gives for the same images
    batch_64 = _ort_outputs(report.path, images["test"][:21], 64)
    for batch in (7, 1):
        assert np.abs(_ort_outputs(report.path, images["test"][:21], batch) - batch_64).max() <= 1e-5 * np.abs(batch_64).max()


@pytest.mark.parametrize("name", ["nin", "resnet20"])
def test_dynamo_exporter_writes_the_same_operators(tmp_path, images, name):
    model = _quantized(name, "iao_w8a8", images)
    legacy = export(model, tmp_path / "legacy.onnx", images["test"][:1], exporter="legacy")
    dynamo = export(model, tmp_path / "dynamo.onnx", images["test"][:1], exporter="dynamo")
    core = ("Conv", "Gemm", "MaxPool")  # Q/DQ and duplicated Adds vary: dynamo merges equal QuantizeLinear nodes
    assert {op: dynamo.op_counts.get(op, 0) for op in core} == {op: legacy.op_counts.get(op, 0) for op in core}
    diff, step, top1, within = _agreement(model, dynamo.path, images["test"], 64)
    assert within >= MIN_WITHIN_ONE_STEP and top1 >= MIN_TOP1, (diff / step, within, top1)
    a, b = _ort_outputs(legacy.path, images["test"][:64], 64), _ort_outputs(dynamo.path, images["test"][:64], 64)
    assert np.abs(a - b).max() <= 1e-5


def test_export_form_is_what_onnxruntime_computes(tmp_path, images):
    """The eager export form uses ONNX's own arithmetic: ONNX Runtime's reference kernels (no graph
    optimisation: QuantizeLinear, DequantizeLinear and float Conv as written) reproduce it except where a
    different float summation order moves a value across a rounding boundary, which changes every output of
    that image a little: most outputs agree to 1e-5 of the range (measured 71%), none by more than one step."""
    model = _quantized("nin", "iao_w8a8", images)
    form, _ = export_form(model)
    report = export(model, tmp_path / "m.onnx", images["test"][:1], exporter="legacy")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(report.path), options, providers=["CPUExecutionProvider"])
    x = images["test"][:64]
    with torch.no_grad():
        eager = form(x).numpy()
    reference = session.run(None, {"input": x.numpy()})[0]
    difference, scale = np.abs(reference - eager), np.abs(eager).max()
    assert (difference <= 1e-5 * scale).mean() >= 0.5 and difference.max() <= scale / 127


def test_qdq_graph_structure(tmp_path, images):
    """Weights int8 per channel with zero point 0, biases int32 at s_x·s_w, one Q/DQ pair per activation
    quantizer, and no float Conv left after ONNX Runtime's optimisation."""
    model = _quantized("nin", "iao_w8a8", images)
    report = export(model, tmp_path / "m.onnx", images["test"][:1], exporter="legacy", weight_dtype="int8")
    view = GraphView(load_model(report.path))
    convs = view.nodes("Conv")
    assert report.form.value_moving_ops_quantized == 2  # NIN's two max pools get their readers' Q/DQ (values unchanged)
    assert len(convs) == 9
    assert report.op_counts["QuantizeLinear"] == report.form.activation_quantizers + report.form.value_moving_ops_quantized
    assert report.op_counts["DequantizeLinear"] == report.op_counts["QuantizeLinear"] + 2 * len(convs)
    for conv in convs:
        x_dq, w_dq, b_dq = (view.producer[name] for name in conv.input)
        assert {x_dq.op_type, w_dq.op_type, b_dq.op_type} == {"DequantizeLinear"}
        codes, w_scale, w_zero = (view.constant(n) for n in w_dq.input)
        assert codes.dtype == np.int8 and w_scale.shape == (codes.shape[0],) and not w_zero.any()
        bias, b_scale = view.constant(b_dq.input[0]), view.constant(b_dq.input[1])
        assert bias.dtype == np.int32
        np.testing.assert_allclose(b_scale, view.constant(x_dq.input[1]) * w_scale, rtol=1e-6)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(report.path), options, providers=["CPUExecutionProvider"])
    optimized = GraphView(onnx.load(str(tmp_path / "optimized.onnx"))).op_counts()
    assert optimized["QLinearConv"] == 9 and optimized.get("Conv", 0) == 0 and optimized.get("FusedConv", 0) == 0


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_portable_target_int8_weights_run_the_integer_network(tmp_path, images, name):
    """The default target's 7-bit weights are written as int8 codes within ±63, which ONNX Runtime's u8s8
    kernels sum exactly on every CPU class (no int16 saturation without VNNI): the file runs code for code
    the integer network it describes, depthwise (MobileNetV2) and residual (ResNet-20) layers included."""
    model = iao.prepare(_float_model(name, images), a_bits=8)
    calibrate(model, images["train"][:512].split(128))
    report = export(model.eval(), tmp_path / "m.onnx", images["test"][:1], exporter="legacy")
    weights = [init for init in onnx.load(str(report.path)).graph.initializer
               if init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(init.dims) >= 2]
    assert weights and all(w.data_type == onnx.TensorProto.INT8 for w in weights)
    assert max(int(np.abs(onnx.numpy_helper.to_array(w).astype(np.int32)).max()) for w in weights) <= 63
    _assert_runs_the_integer_network(report.path, images["test"][:8])


def test_residual_network_runs_all_int8_in_onnxruntime(tmp_path, images):
    """Each residual Add input has its own quantizer: a block's ReLU'd output is quantized for the next add
    exactly as for the next conv (one unsigned range), so the export quantizes it once and ONNX Runtime runs
    every conv (ReLU absorbed) and every residual add in int8, as with its own ``quantize_static``."""
    model = _quantized("resnet20", "iao_w8a8", images)
    adds = [m for m in model.modules() if type(m).__name__ == "QuantAdd"]
    assert len(adds) == 9 and all(m.second_input_quantizer is not None for m in adds)
    report = export(model, tmp_path / "m.onnx", images["test"][:1], exporter="legacy")
    coverage = int8_coverage(report.path)
    assert coverage.int8_ops["QLinearConv"] == 21 and coverage.int8_ops["QLinearAdd"] == 9
    assert coverage.float_compute_nodes == [] and coverage.float_ops.get("Relu", 0) == 0
    assert report.op_counts["Add"] == 9  # one per residual add: nothing duplicated
    diff, step, top1, within = _agreement(model, report.path, images["test"], 64)
    assert within >= MIN_WITHIN_ONE_STEP and top1 >= MIN_TOP1, (diff / step, within, top1)
    _assert_runs_the_integer_network(report.path, images["test"][:8])


def test_dorefa_bias_is_int32_in_model_and_file(tmp_path, images):
    """DoReFa layers add their bias on the accumulator grid s_x·s_w in eval (as IAO layers do), and the file
    holds the same int32 codes, so ONNX Runtime's integer kernels compute what the model computes."""
    model = dorefa.prepare(_float_model("nin", images), a_bits=4, w_bits=4).eval()
    report = export(model, tmp_path / "m.onnx", images["test"][:1], exporter="legacy")
    assert {layer.bias for layer in report.form.layers} == {"int32"}
    diff, step, top1, within = _agreement(model, report.path, images["test"][:256], 64)
    assert diff <= 2 * step and within >= 0.995 and top1 >= 0.995, (diff / step, within, top1)


def test_low_bit_weights_are_exact_int8(tmp_path, images):
    model = _quantized("nin", "ternary_w3a32", images)
    report = export(model, tmp_path / "m.onnx", images["test"][:1], exporter="legacy")
    view = GraphView(load_model(report.path))
    quantized = [layer.name for layer in report.form.layers if layer.weight.startswith("int8")]
    assert quantized, report.form.rows()
    for dq in view.nodes("DequantizeLinear"):
        codes = view.constant(dq.input[0])
        if codes is not None and codes.ndim == 4:
            assert set(np.unique(codes)) <= {-1, 0, 1}


def test_float_model_exports_fp32_with_bn_folded(tmp_path, images):
    model = _float_model("resnet20", images)
    report = export(model, tmp_path / "fp32.onnx", images["test"][:1], exporter="legacy")
    assert not report.quantized and "BatchNormalization" not in report.op_counts and report.form.bn_folded == 21
    with torch.no_grad():
        reference = model(images["test"][:64]).numpy()
    assert np.abs(_ort_outputs(report.path, images["test"][:64], 64) - reference).max() <= 1e-4


def test_converted_model_exports_like_the_prepared_one(tmp_path, images):
    model = _quantized("resnet20", "iao_w8a8", images)
    a = export(model, tmp_path / "a.onnx", images["test"][:1], exporter="legacy")
    b = export(convert(model), tmp_path / "b.onnx", images["test"][:1], exporter="legacy")
    x = images["test"][:64]
    assert np.abs(_ort_outputs(a.path, x, 64) - _ort_outputs(b.path, x, 64)).max() <= 1e-5


# ------------------------------------------------------------------------------------------ bad inputs
def test_uncalibrated_model_is_refused(tmp_path, images):
    model = iao.prepare(_float_model("nin", images), a_bits=8, w_bits=8).eval()
    with pytest.raises(DeployError, match="never calibrated"):
        export(model, tmp_path / "m.onnx", images["test"][:1], exporter="legacy")
    assert not (tmp_path / "m.onnx").exists()


def test_missing_folder_and_folder_path_are_refused(tmp_path, images):
    model = _float_model("lenet", images)
    with pytest.raises(DeployError, match="does not exist"):
        export(model, tmp_path / "nowhere" / "m.onnx", images["test"][:1])
    with pytest.raises(DeployError, match="is a folder"):
        export(model, tmp_path, images["test"][:1])


def test_layer_without_onnx_mapping_is_named(tmp_path):
    class FFT(torch.nn.Module):
        def forward(self, x):
            return torch.fft.rfft2(x).abs().flatten(1)

    with pytest.raises(DeployError, match="no ONNX mapping|exporter failed"):
        export(FFT(), tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8), exporter="legacy")
    assert not (tmp_path / "m.onnx").exists()


def test_not_onnx_files_are_refused(tmp_path):
    text = tmp_path / "model.onnx"
    text.write_text("this is not a protobuf")
    with pytest.raises(DeployError, match="not an ONNX model"):
        load_model(text)
    with pytest.raises(DeployError, match="no such ONNX file"):
        load_model(tmp_path / "missing.onnx")


def test_signed_int8_export_needs_signed_activations(tmp_path, images):
    model = _quantized("nin", "iao_w8a8", images)
    with pytest.raises(DeployError, match="signed activations"):
        export(model, tmp_path / "m.onnx", images["test"][:1], exporter="legacy", activation_dtype="int8")
