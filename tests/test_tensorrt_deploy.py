"""TensorRT deployment without TensorRT: the Q/DQ rules check on real graphs, and the builder, calibrator and
runner against a recording stand-in of the ``tensorrt`` module (tests/tensorrt_standin.py).

What these tests cannot show: that a real TensorRT 10 parses these graphs, fuses them as the rules expect,
or computes the right numbers on a GPU. They show what micronet asks TensorRT to do.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorrt_standin as standin
import torch
from onnx import TensorProto, helper, numpy_helper

from micronet.data import ArrayDataset, DatasetInfo
from micronet.deploy.tensorrt import (
    CalibrationFeeder,
    TensorRTRunner,
    benchmark,
    build_engine,
    check_tensorrt_qdq,
    evaluate,
    load_engine,
    make_entropy_calibrator,
)
from micronet.errors import DeployError

# --------------------------------------------------------------------------- hand-built ONNX graphs


class Graph:
    """A tiny ONNX graph builder: constants become initializers, every node gets a readable name."""

    def __init__(self) -> None:
        self.nodes, self.inits = [], []

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def qdq(self, x: str, tag: str, scale: float = 0.05, dtype=np.int8, zero: int = 0) -> str:
        s = self.const(f"{tag}.scale", np.float32(scale))
        z = self.const(f"{tag}.zp", np.array(zero, dtype=dtype))
        return self.op("DequantizeLinear", [self.op("QuantizeLinear", [x, s, z], f"{tag}.q"), s, z], f"{tag}.dq")

    def weight(self, tag: str, shape, axis: int = 0, per_tensor: bool = False, float_weights: bool = False) -> str:
        rng = np.random.default_rng(len(self.inits))
        channels = 1 if per_tensor else shape[axis]
        scale = self.const(f"{tag}.w_scale", np.full(channels, 0.01, np.float32).reshape(-1) if channels > 1 else np.float32(0.01))
        zero = self.const(f"{tag}.w_zp", np.zeros(channels, np.int8) if channels > 1 else np.int8(0))
        attrs = {} if per_tensor else {"axis": axis}
        if float_weights:
            w = self.const(f"{tag}.w", rng.normal(0, 0.5, shape).astype(np.float32))
            codes = self.op("QuantizeLinear", [w, scale, zero], f"{tag}.w_q", **attrs)
        else:
            codes = self.const(f"{tag}.w", rng.integers(-100, 100, shape).astype(np.int8))
        return self.op("DequantizeLinear", [codes, scale, zero], f"{tag}.w_dq", **attrs)

    def model(self, output: str, channels: int = 4, opset: int = 17, batch="N") -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, 8, 8])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, None, None, None])], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def residual_block(*, act_dtype=np.int8, act_zero: int = 0, conv_input_dq: bool = True, identity_dq: bool = True,
                   weight_axis: int = 0, per_tensor: bool = False, float_weights: bool = False,
                   int32_bias: bool = False, opset: int = 17) -> onnx.ModelProto:
    """x → Q/DQ → conv1 → relu → Q/DQ → conv2 → Q/DQ → add(identity = the block input) → relu: the basic
    block of a ResNet, quantized the way TensorRT wants unless a keyword breaks one rule."""
    g = Graph()
    dq_x = g.qdq("x", "x", dtype=act_dtype, zero=act_zero)
    bias = g.const("conv1.bias", np.zeros(4, np.float32))
    if int32_bias:
        bias = g.op("DequantizeLinear", [g.const("conv1.bias_q", np.zeros(4, np.int32)), g.const("conv1.b_scale", np.float32(5e-4)),
                                         g.const("conv1.b_zp", np.int32(0))], "conv1.bias_dq")
    w1 = g.weight("conv1", (4, 4, 3, 3), weight_axis, per_tensor, float_weights)
    conv1 = g.op("Conv", [dq_x if conv_input_dq else "x", w1, bias], "conv1", pads=[1, 1, 1, 1])
    relu = g.qdq(g.op("Relu", [conv1], "relu1"), "relu1", dtype=act_dtype, zero=act_zero)
    conv2 = g.op("Conv", [relu, g.weight("conv2", (4, 4, 3, 3))], "conv2", pads=[1, 1, 1, 1])
    add = g.op("Add", [g.qdq(conv2, "conv2_out"), dq_x if identity_dq else "x"], "add")
    return g.model(g.op("Relu", [add], "y"), opset=opset)


def concat_block(*, quantize_inputs: bool = True, shared_scale: bool = True) -> onnx.ModelProto:
    """Two quantized convs concatenated, then quantized again for a third conv."""
    g = Graph()
    dq_x = g.qdq("x", "x")
    branches = []
    for i in (1, 2):
        conv = g.op("Conv", [dq_x, g.weight(f"conv{i}", (2, 4, 1, 1))], f"conv{i}")
        scale = 0.1 if shared_scale or i == 1 else 0.2
        branches.append(g.qdq(conv, f"conv{i}_out", scale=scale) if quantize_inputs or i == 1 else conv)
    cat = g.qdq(g.op("Concat", branches, "concat", axis=1), "concat_out", scale=0.1)
    return g.model(g.op("Conv", [cat, g.weight("conv3", (4, 4, 1, 1))], "conv3"))


def _rules(model: onnx.ModelProto) -> set[str]:
    return set(check_tensorrt_qdq(model).rules())


# --------------------------------------------------------------------------- rules check


def test_symmetric_int8_residual_block_passes_and_runs_in_ort():
    model = residual_block()
    onnx.checker.check_model(model)
    report = check_tensorrt_qdq(model)
    assert report.ok and report.violations == [], report.to_text()
    assert report.checked["Conv"] == 2 and report.checked["Add"] == 1
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.random.default_rng(0).normal(size=(2, 4, 8, 8)).astype(np.float32)})
    assert y.shape == (2, 4, 8, 8) and np.isfinite(y).all()


@pytest.mark.parametrize("broken, rule", [
    (dict(act_dtype=np.uint8, act_zero=128), "zero-point"),
    (dict(act_zero=3), "zero-point"),
    (dict(int32_bias=True), "zero-point"),
    (dict(conv_input_dq=False), "input-qdq"),
    (dict(identity_dq=False), "residual-add"),
    (dict(weight_axis=1), "weight-axis"),
    (dict(opset=11, per_tensor=True), "opset"),
])
def test_each_broken_variant_is_flagged_by_its_rule(broken, rule):
    report = check_tensorrt_qdq(residual_block(**broken))
    assert not report.ok
    assert rule in report.rules(), report.to_text()
    assert all(v.severity == "error" for v in report.violations if v.rule == rule)


def test_violation_names_the_node_and_the_fix():
    report = check_tensorrt_qdq(residual_block(identity_dq=False))
    (violation,) = report.violations
    assert (violation.rule, violation.node) == ("residual-add", "add")
    assert "identity" in violation.message and "#1992" in violation.message
    text = report.to_text()
    assert "FAILED" in text and "residual-add" in text and "'add'" in text
    uint8 = check_tensorrt_qdq(residual_block(act_dtype=np.uint8, act_zero=128))
    assert {v.node for v in uint8.violations} >= {"x.q", "x.dq", "relu1.q", "relu1.dq"}
    assert "QInt8" in uint8.violations[0].message


def test_per_tensor_weights_pass_and_float_weights_only_warn():
    assert check_tensorrt_qdq(residual_block(per_tensor=True)).ok
    report = check_tensorrt_qdq(residual_block(float_weights=True))
    assert report.ok and set(report.rules()) == {"weight-prequantized"}
    assert report.warnings[0].node == "conv1"


def test_conv_add_fusion_pattern_is_accepted_but_float_conv_weights_are_not():
    # Conv output straight into the Add (TensorRT fuses the add into the conv): allowed.
    model = residual_block()
    for node in model.graph.node:
        if node.op_type == "Add":
            node.input[0] = "conv2"
    assert check_tensorrt_qdq(model).ok
    for node in model.graph.node:  # now give conv2 raw float weights
        if node.name == "conv2":
            model.graph.initializer.append(numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "w_float"))
            node.input[1] = "w_float"
    assert _rules(model) == {"weight-qdq"}


def _set_initializer(model: onnx.ModelProto, name: str, value) -> onnx.ModelProto:
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.asarray(value), name))
    return model


def test_scales_must_be_positive_and_activations_per_tensor():
    assert _rules(_set_initializer(residual_block(), "relu1.scale", np.float32(0.0))) == {"scale-value"}
    per_channel = _set_initializer(residual_block(), "relu1.scale", np.full(4, 0.05, np.float32))
    per_channel = _set_initializer(per_channel, "relu1.zp", np.zeros(4, np.int8))  # axis 1: the channels
    assert _rules(per_channel) == {"activation-scale"}


@pytest.mark.parametrize("op, attrs, axis, ok", [
    ("MatMul", {}, 1, True), ("MatMul", {}, 0, False),
    ("Gemm", {"transB": 1}, 0, True), ("Gemm", {"transB": 1}, 1, False), ("Gemm", {}, 1, True),
])
def test_matmul_and_gemm_weights_are_scaled_per_output_column(op, attrs, axis, ok):
    g = Graph()
    flat = g.qdq(g.op("Flatten", ["x"], "flat"), "flat")  # N×256
    shape = (6, 256) if attrs.get("transB") else (256, 6)
    inputs = [flat, g.weight("fc", shape, axis=axis), g.const("fc.bias", np.zeros(6, np.float32))]
    out = g.op(op, inputs[: 3 if op == "Gemm" else 2], "fc", **attrs)
    bias_add = g.op("Add", [out, g.weight("fc_bias", (6,), axis=0)], "bias_add")  # constant-derived: not a residual
    assert _rules(g.model(bias_add)) == (set() if ok else {"weight-axis"})


def test_concat_inputs_need_scales_and_should_share_them():
    assert check_tensorrt_qdq(concat_block()).violations == []
    assert _rules(concat_block(quantize_inputs=False)) == {"concat-scale"}
    shared = check_tensorrt_qdq(concat_block(shared_scale=False))
    assert shared.ok and set(shared.rules()) == {"concat-shared-scale"}


def test_fp32_graph_and_bad_paths(tmp_path):
    g = Graph()
    fp32 = g.model(g.op("Relu", ["x"], "y"))
    assert _rules(fp32) == {"no-qdq"}
    with pytest.raises(DeployError, match="no such ONNX file"):
        check_tensorrt_qdq(tmp_path / "missing.onnx")
    path = tmp_path / "block.onnx"
    onnx.save(residual_block(), str(path))
    assert check_tensorrt_qdq(path).ok


@pytest.fixture(scope="module")
def resnet20_onnx(tmp_path_factory) -> str:
    from micronet.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    path = str(tmp_path_factory.mktemp("r20") / "resnet20.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}})
    return path


def _ort_qdq(source: str, target, **extra) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.normal(size=(8, 1, 28, 28)).astype(np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(source, str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, **extra})
    return onnx.load(str(target))


def test_ort_quantize_static_resnet20(resnet20_onnx, tmp_path):
    """ORT's symmetric per-channel QDQ quantizes both inputs of every residual Add and puts weights on axis 0,
    which TensorRT wants; but by default it also stores biases as int32 DequantizeLinear, which TensorRT's ONNX
    parser rejects (DequantizeLinear takes INT8/FP8/INT4 only). With QuantizeBias=False every rule passes."""
    default = check_tensorrt_qdq(_ort_qdq(resnet20_onnx, tmp_path / "q.onnx"))
    assert set(default.rules()) == {"zero-point"}, default.to_text()
    assert all("int32" in v.message and "QuantizeBias" in v.message for v in default.violations)
    assert default.checked["Add"] == 9 and default.checked["Conv"] == 21
    float_bias = check_tensorrt_qdq(_ort_qdq(resnet20_onnx, tmp_path / "qb.onnx", QuantizeBias=False))
    assert float_bias.ok and float_bias.violations == [], float_bias.to_text()


def test_micronet_int8_export_of_resnet20(tmp_path):
    """micronet's TensorRT form of ResNet-20 (IAO W8A8 with signed activations, exported with int8 activations and
    weights) passes every rule: each conv input and weight quantized, both inputs of all 9 residual Adds
    quantized, zero points int8 and 0, per-channel axis 0, float biases (TensorRT dequantizes int8 only)."""
    from micronet.compression.quantization.core.workflow import calibrate
    from micronet.compression.quantization.wqaq.iao import quantize as iao
    from micronet.deploy.onnx import export
    from micronet.models import build_model

    torch.manual_seed(0)
    model = iao.prepare(build_model("resnet20", num_classes=10, in_channels=1).eval(), signed_activations=True)
    calibrate(model, [torch.randn(16, 1, 28, 28) for _ in range(2)])
    exported = export(model.eval(), tmp_path / "r20.onnx", torch.zeros(1, 1, 28, 28), exporter="legacy",
                      activation_dtype="int8")
    assert {layer.weight for layer in exported.form.layers} == {"int8 per-channel"}
    report = check_tensorrt_qdq(exported.path)
    assert report.checked["Conv"] == 21 and report.checked["Add"] == 9
    assert report.ok and report.violations == [], report.to_text()


# --------------------------------------------------------------------------- TensorRT absent


def test_import_never_needs_tensorrt():
    code = ("import sys, micronet, micronet.deploy.tensorrt as t; "
            "assert 'tensorrt' not in sys.modules and 'pycuda' not in sys.modules; print(sorted(t.RULES))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "residual-add" in result.stdout


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail even where it is installed


def test_without_tensorrt_every_entry_point_says_how_to_install(no_tensorrt, tmp_path):
    path = _linear_onnx(tmp_path)
    for call in (lambda: build_engine(path, "fp16"), lambda: load_engine(b"engine"),
                 lambda: make_entropy_calibrator(CalibrationFeeder([np.zeros((2, 1, 4, 4))], device="cpu")),
                 lambda: TensorRTRunner(b"engine", device="cpu")):
        with pytest.raises(DeployError, match="TensorRT is not installed.*tensorrt-cu12"):
            call()


def test_tensorrt_older_than_10_is_refused(monkeypatch, tmp_path):
    old = standin.make()
    old.__version__ = "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(DeployError, match="TensorRT 8.6.1 is too old.*tensorrt 10"):
        build_engine(_linear_onnx(tmp_path), "fp32")


def test_argument_errors_come_before_the_tensorrt_check(no_tensorrt, tmp_path):
    with pytest.raises(DeployError, match="no such ONNX file"):
        build_engine(tmp_path / "missing.onnx")
    with pytest.raises(DeployError, match="unknown precision"):
        build_engine(_linear_onnx(tmp_path), "int4")


# --------------------------------------------------------------------------- builder against the stand-in


@pytest.fixture
def trt(monkeypatch):
    module = standin.make()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def _linear_onnx(tmp_path, batch="N", name: str = "linear.onnx") -> str:
    """input N×1×4×4 → Flatten → MatMul 16×10 → logits: an FP32 classifier small enough to build by hand."""
    g = Graph()
    flat = g.op("Flatten", ["x"], "flat")
    g.op("MatMul", [flat, g.const("w", np.eye(16, 10, dtype=np.float32))], "logits")
    graph = helper.make_graph(g.nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], g.inits)
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return str(path)


def _qdq_onnx(tmp_path) -> str:
    path = tmp_path / "qdq.onnx"
    onnx.save(residual_block(), str(path))
    return str(path)


def test_fp32_build_parses_with_explicit_batch_and_sets_workspace(trt, tmp_path):
    data = build_engine(_linear_onnx(tmp_path), "fp32", workspace_mb=256)
    assert data.startswith(standin.MAGIC)
    assert standin.calls_named(trt, "create_network") == [{"flags": 0}]  # explicit batch is TRT 10's only mode
    assert standin.calls_named(trt, "parse_from_file")[0]["path"].endswith("linear.onnx")
    assert standin.calls_named(trt, "set_memory_pool_limit") == [{"pool": trt.MemoryPoolType.WORKSPACE, "size": 256 << 20}]
    assert standin.calls_named(trt, "set_flag") == []
    assert standin.calls_named(trt, "build_serialized_network")[0]["calibrator"] is None


def test_fp16_sets_the_fp16_flag_only(trt, tmp_path):
    build_engine(_linear_onnx(tmp_path), "fp16")
    assert [c["flag"] for c in standin.calls_named(trt, "set_flag")] == [trt.BuilderFlag.FP16]


def test_dynamic_batch_gets_a_min_opt_max_profile(trt, tmp_path):
    build_engine(_linear_onnx(tmp_path), "fp32", min_batch=2, opt_batch=8, max_batch=16)
    assert standin.calls_named(trt, "set_shape") == [
        {"name": "x", "min": (2, 1, 4, 4), "opt": (8, 1, 4, 4), "max": (16, 1, 4, 4)}]
    assert len(standin.calls_named(trt, "add_optimization_profile")) == 1
    trt.calls.clear()
    build_engine(_linear_onnx(tmp_path), "fp32")  # defaults: 1 .. 32, optimised for 32
    assert standin.calls_named(trt, "set_shape")[0]["max"] == (32, 1, 4, 4)
    with pytest.raises(DeployError, match="min_batch <= opt_batch <= max_batch"):
        build_engine(_linear_onnx(tmp_path), "fp32", min_batch=8, max_batch=4)


def test_static_batch_is_kept_and_another_max_batch_refused(trt, tmp_path):
    path = _linear_onnx(tmp_path, batch=4)
    build_engine(path, "fp32")
    assert standin.calls_named(trt, "add_optimization_profile") == []
    build_engine(path, "fp32", max_batch=4)
    with pytest.raises(DeployError, match="fixed batch of 4 but max_batch=8"):
        build_engine(path, "fp32", max_batch=8)


def test_qdq_onnx_builds_int8_without_calibrator(trt, tmp_path):
    path = _qdq_onnx(tmp_path)
    build_engine(path, "int8")
    assert [c["flag"] for c in standin.calls_named(trt, "set_flag")] == [trt.BuilderFlag.INT8]
    assert standin.calls_named(trt, "set_int8_calibrator") == []
    assert standin.calls_named(trt, "build_serialized_network")[0]["calibrator"] is None
    feeder = CalibrationFeeder([np.zeros((2, 4, 8, 8), np.float32)], device="cpu")
    with pytest.raises(DeployError, match="already quantized.*drop the calibrator"):
        build_engine(path, "int8", calibrator=feeder)
    with pytest.raises(DeployError, match="precision='int8'"):
        build_engine(path, "fp16")


def test_fp32_onnx_int8_calibrates_through_the_entropy_calibrator(trt, tmp_path):
    batches = [np.random.default_rng(i).normal(size=(8, 1, 4, 4)) for i in range(3)]  # float64: cast on the way
    cache = tmp_path / "calib.cache"
    feeder = CalibrationFeeder(batches, cache_path=cache, device="cpu")
    with pytest.warns(FutureWarning, match="deprecated since TensorRT 10.1"):
        build_engine(_linear_onnx(tmp_path), "int8", calibrator=feeder, max_batch=16, fp16_fallback=True)
    assert {c["flag"] for c in standin.calls_named(trt, "set_flag")} == {trt.BuilderFlag.INT8, trt.BuilderFlag.FP16}
    (calibrator,) = [c["calibrator"] for c in standin.calls_named(trt, "set_int8_calibrator")]
    assert isinstance(calibrator, trt.IInt8EntropyCalibrator2) and calibrator.feeder is feeder
    assert standin.calls_named(trt, "set_calibration_profile") == [{"shapes": {"x": ((8, 1, 4, 4),) * 3}}]
    # TensorRT read exactly our batches, as float32, through the pointers get_batch returned
    assert len(trt.calibration_batches) == 3 and feeder.batches_fed == 3
    for seen, sent in zip(trt.calibration_batches, batches):
        np.testing.assert_array_equal(seen, sent.astype(np.float32))
    assert cache.read_bytes().startswith(b"TRT-10900-EntropyCalibration2")
    # a second build reuses the cache and reads no batch
    trt.calls.clear()
    with pytest.warns(FutureWarning):
        build_engine(_linear_onnx(tmp_path), "int8", calibrator=CalibrationFeeder(None, cache_path=cache, device="cpu"))
    assert standin.calls_named(trt, "calibration_cache_used") == [{}]


def test_fp32_onnx_int8_needs_a_calibrator_of_the_right_shape(trt, tmp_path):
    path = _linear_onnx(tmp_path)
    with pytest.raises(DeployError, match="needs calibration data"):
        build_engine(path, "int8")
    with pytest.raises(DeployError, match="only used for precision='int8'"):
        build_engine(path, "fp16", calibrator=CalibrationFeeder([np.zeros((2, 1, 4, 4))], device="cpu"))
    with pytest.raises(DeployError, match="images of the exported size"):
        build_engine(path, "int8", calibrator=CalibrationFeeder([np.zeros((2, 3, 4, 4))], device="cpu"))


def test_calibration_error_inside_tensorrt_is_raised_after_the_build(trt, tmp_path):
    batches = [np.zeros((4, 1, 4, 4)), np.zeros((2, 1, 4, 4))]  # the last batch is short
    with pytest.warns(FutureWarning), pytest.raises(DeployError, match="shape \\[2, 1, 4, 4\\].*drop_last=True"):
        build_engine(_linear_onnx(tmp_path), "int8", calibrator=CalibrationFeeder(batches, device="cpu"))


def test_parser_errors_are_collected_into_one_error(trt, tmp_path):
    trt.parser_errors = ["In node 3 (importConv): UNSUPPORTED_NODE", "In node 7 (Resize): bad mode"]
    with pytest.raises(DeployError) as error:
        build_engine(_linear_onnx(tmp_path), "fp32")
    message = str(error.value)
    assert "cannot parse" in message and "2 error(s)" in message
    assert "importConv" in message and "Resize" in message


def test_engine_file_is_written_atomically(trt, tmp_path):
    engine_path = tmp_path / "out" / "model.engine"
    data = build_engine(_linear_onnx(tmp_path), "fp16", engine_path=engine_path)
    assert engine_path.read_bytes() == data
    trt.fail_build = True  # a failed build leaves the previous engine untouched and no temporary file
    with pytest.raises(DeployError, match="could not build an engine"):
        build_engine(_linear_onnx(tmp_path), "fp16", engine_path=engine_path)
    assert engine_path.read_bytes() == data
    assert [p.name for p in engine_path.parent.iterdir()] == ["model.engine"]


# --------------------------------------------------------------------------- calibration feeder (no TensorRT)


def test_feeder_returns_pointers_then_none():
    batches = [np.full((2, 1, 4, 4), i, np.float32) for i in range(5)]
    feeder = CalibrationFeeder(iter(batches), max_batches=3, device="cpu")
    assert feeder.get_batch_size() == 2 and feeder.batch_shape == (2, 1, 4, 4)
    pointers = []
    for i in range(3):
        (pointer,) = feeder.get_batch(["x"])
        np.testing.assert_array_equal(standin.read_floats(pointer, (2, 1, 4, 4)), batches[i])
        pointers.append(pointer)
    assert feeder.get_batch(["x"]) is None and feeder.batches_fed == 3
    assert len(set(pointers)) == 1  # one preallocated buffer, refilled


def test_feeder_takes_batchloader_pairs_and_non_contiguous_arrays():
    base = np.arange(2 * 4 * 4, dtype=np.float64).reshape(2, 1, 4, 4)
    transposed = np.ascontiguousarray(base.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # non-contiguous view
    feeder = CalibrationFeeder([(torch.from_numpy(base), torch.zeros(2)), transposed], device="cpu")
    for _ in range(2):
        (pointer,) = feeder.get_batch(["x"])
        np.testing.assert_array_equal(standin.read_floats(pointer, (2, 1, 4, 4)), base.astype(np.float32))


def test_feeder_refuses_a_batch_of_another_shape_or_dtype():
    feeder = CalibrationFeeder([np.zeros((4, 1, 4, 4), np.float32), np.zeros((3, 1, 4, 4), np.float32)], device="cpu")
    feeder.get_batch(["x"])
    with pytest.raises(DeployError, match="shape \\[3, 1, 4, 4\\] float32 but the first batch had \\[4, 1, 4, 4\\]"):
        feeder.get_batch(["x"])
    mixed = CalibrationFeeder([np.zeros((4, 1, 4, 4), np.float32), np.zeros((4, 1, 4, 4), np.float64)], device="cpu")
    mixed.get_batch(["x"])
    with pytest.raises(DeployError, match="float64"):
        mixed.get_batch(["x"])
    with pytest.raises(DeployError, match="2 inputs"):
        CalibrationFeeder([np.zeros((1, 1))], device="cpu").get_batch(["a", "b"])
    with pytest.raises(DeployError, match="numpy arrays, tensors or a micronet BatchLoader"):
        CalibrationFeeder(["not an array"], device="cpu").get_batch(["x"])


def test_feeder_cache_round_trip(tmp_path):
    cache = tmp_path / "deep" / "calib.cache"
    feeder = CalibrationFeeder([np.zeros((1, 1, 2, 2))], cache_path=cache, device="cpu")
    assert feeder.read_calibration_cache() is None
    feeder.write_calibration_cache(memoryview(b"TRT-10900-EntropyCalibration2\nx: 3c010a14\n"))
    assert feeder.cache_written and list(cache.parent.iterdir()) == [cache]
    cache_only = CalibrationFeeder(None, cache_path=cache, device="cpu")
    assert cache_only.read_calibration_cache() == cache.read_bytes()
    assert cache_only.get_batch(["x"]) is None and cache_only.get_batch_size() == 1
    with pytest.raises(DeployError, match="needs batches or an existing calibration cache"):
        CalibrationFeeder(None, cache_path=tmp_path / "none.cache", device="cpu")
    CalibrationFeeder([np.zeros((1, 1))], device="cpu").write_calibration_cache(b"ignored")  # no path: no file


def test_entropy_calibrator_delegates_and_keeps_errors(trt):
    feeder = CalibrationFeeder([np.ones((2, 1, 2, 2)), np.ones((3, 1, 2, 2))], device="cpu")
    calibrator = make_entropy_calibrator(feeder)
    assert isinstance(calibrator, trt.IInt8EntropyCalibrator2) and standin.calls_named(trt, "calibrator_init")
    assert calibrator.get_batch_size() == 2 and len(calibrator.get_batch(["x"])) == 1
    assert calibrator.get_batch(["x"]) is None  # the bad batch: TensorRT just sees "no more batches"
    assert isinstance(feeder.error, DeployError)
    assert calibrator.read_calibration_cache() is None


def test_cuda_is_required_for_real_buffers():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeployError, match="CUDA is not available"):
        CalibrationFeeder([np.zeros((1, 1))])


# --------------------------------------------------------------------------- runner against the stand-in


def _dataset(n: int = 50) -> ArrayDataset:
    info = DatasetInfo("tiny", 10, 1, (4, 4), (0.5,), (0.25,), tuple(str(i) for i in range(10)))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return ArrayDataset(images, labels, info)


def test_runner_sets_shapes_and_addresses_and_returns_the_output(trt, tmp_path):
    engine_path = tmp_path / "m.engine"
    build_engine(_linear_onnx(tmp_path), "fp16", max_batch=8, engine_path=engine_path)
    runner = TensorRTRunner(load_engine(engine_path), device="cpu")
    assert (runner.min_batch, runner.max_batch, runner.image_shape) == (1, 8, (1, 4, 4))
    x = np.random.default_rng(0).normal(size=(3, 1, 4, 4)).astype(np.float32)
    trt.calls.clear()
    np.testing.assert_array_equal(runner(x), x.reshape(3, -1)[:, :10])
    assert [name for name, _ in trt.calls] == ["set_input_shape", "set_tensor_address", "set_tensor_address",
                                               "execute_async_v3"]
    assert standin.calls_named(trt, "set_input_shape") == [{"name": "x", "shape": (3, 1, 4, 4)}]
    with pytest.raises(DeployError, match="outside the engine's batch range \\[1, 8\\]"):
        runner(np.zeros((9, 1, 4, 4), np.float32))
    with pytest.raises(DeployError, match="images of the exported size"):
        runner(np.zeros((2, 1, 5, 5), np.float32))
    with pytest.raises(DeployError, match="not a TensorRT .* engine for this GPU"):
        load_engine(b"garbage")
    with pytest.raises(DeployError, match="no such TensorRT engine file"):
        load_engine(tmp_path / "missing.engine")


def test_evaluate_and_benchmark_run_the_engine(trt, tmp_path):
    runner = TensorRTRunner(build_engine(_linear_onnx(tmp_path), "fp32", max_batch=16), device="cpu")
    split = _dataset()
    result = evaluate(runner, split, batch_size=64)  # capped at the engine's max batch of 16
    x = (split.images.float() / 255 - 0.5) / 0.25
    logits = x.reshape(len(split), -1)[:, :10]
    assert result["samples"] == 50
    assert result["acc"] == pytest.approx((logits.argmax(1) == split.labels).float().mean().item())
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, split.labels).item(), rel=1e-5)
    timings = benchmark(runner, batch_sizes=(1, 4), warmup=1, repeats=5)
    assert [t["batch"] for t in timings] == [1, 4]
    assert all(0 < t["median_ms"] <= t["p90_ms"] and t["images_per_s"] > 0 for t in timings)


def test_fixed_batch_engine_pads_the_last_evaluation_batch(trt, tmp_path):
    runner = TensorRTRunner(build_engine(_linear_onnx(tmp_path, batch=8), "fp32"), device="cpu")
    assert runner.fixed_batch == 8
    assert evaluate(runner, _dataset(13))["samples"] == 13
    shapes = [c["shape"][0] for c in standin.calls_named(trt, "set_input_shape")]
    assert shapes == [8, 8]
