"""Per-layer quantization sensitivity, skip lists, and `micronet sensitivity` / `micronet quantize --skip`."""

import json

import pytest
import torch
from torch import nn

from micronet.analysis.sensitivity import SensitivityReport, choose_skip, layer_sensitivity, read_skip_list
from micronet.cli import main
from micronet.compression.quantization.core import calibrate, prepare, set_fake_quant
from micronet.compression.quantization.core.modules import QuantLinear
from micronet.compression.quantization.wbwtab import quantize as wbwtab
from micronet.compression.quantization.wqaq.dorefa import quantize as dorefa
from micronet.compression.quantization.wqaq.dorefa.quantize import dorefa_scheme
from micronet.compression.quantization.wqaq.iao import quantize as iao
from micronet.compression.quantization.wqaq.iao.quantize import iao_scheme
from micronet.data import load_dataset
from micronet.engine import evaluate, load_model, save_checkpoint
from micronet.errors import ConfigError
from micronet.models import build_model

SCHEMA = ["checkpoint", "scheme", "metric", "images", "float_acc", "all_quantized_acc", "layers", "skip"]
LAYER_SCHEMA = ["layer", "only_acc", "only_drop", "all_but_acc", "all_but_gain", "rank"]


def _toy() -> nn.Module:
    """Three linear layers; body.3 has a weight of 1e4 on an input that is always 0 (a dead ReLU unit). The float
    function ignores it, but it sets the 8-bit scale of every output channel, which rounds all other weights to 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 33), nn.ReLU(), nn.Linear(33, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        model[1].weight[32].zero_()
        model[1].bias[32] = -1.0
        model[3].weight[:, 32] = 1e4
    wrapper = nn.Sequential()
    wrapper.add_module("body", model)
    return wrapper


def _teacher_data(model: nn.Module, n: int = 400, batch: int = 100, shape=(1, 8, 8)):
    """Random inputs labelled by the float model itself: the float accuracy is exactly 100%. The classifier's bias
    is first shifted by minus the mean logits, so that the labels spread over the classes."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        classifier.bias -= model.eval()(x).mean(0)
        y = model(x).argmax(1)
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]
    return batches[:2], batches  # calibration, evaluation


def test_fragile_layer_ranks_first_and_the_arithmetic_holds():
    model = _toy()
    calibration, evaluation = _teacher_data(model)
    scheme = iao_scheme(ptq=True)
    report = layer_sensitivity(model, scheme, calibration, evaluation)
    assert report.float_acc == 100.0 and report.images == 400 and report.scheme == scheme.name
    assert [s.rank for s in report.layers] == [1, 2, 3]
    assert report.layers[0].layer == "body.3" and report.layers[0].only_drop > 50
    assert {s.layer for s in report.layers} == {"body.1", "body.3", "body.5"}
    assert choose_skip(report, top=1) == ["body.3"]
    second = report.layers[1].only_drop
    assert choose_skip(report, max_drop=second) == ["body.3"]  # strictly above the threshold
    assert choose_skip(report, max_drop=second - 1e-6) == ["body.3", report.layers[1].layer]
    for s in report.layers:
        assert s.only_drop == report.float_acc - s.only_acc
        assert s.all_but_gain == s.all_but_acc - report.all_quantized_acc
    assert report.layers[0].all_but_gain == max(s.all_but_gain for s in report.layers) > 10

    # the measurement is reproduced independently: only body.3's quantizers on, in a normally calibrated model
    reference = calibrate(prepare(model, scheme), calibration)
    set_fake_quant(reference, False)
    set_fake_quant(reference, True, ["body.3"])
    assert evaluate(reference, evaluation)["acc"] * 100 == report.layers[0].only_acc

    data = report.to_json()
    assert list(data) == SCHEMA and all(list(layer) == LAYER_SCHEMA for layer in data["layers"])
    for layer in data["layers"]:
        assert layer["only_drop"] == pytest.approx(data["float_acc"] - layer["only_acc"], abs=2e-4)
        assert layer["all_but_gain"] == pytest.approx(layer["all_but_acc"] - data["all_quantized_acc"], abs=2e-4)
    assert SensitivityReport.from_json(json.loads(json.dumps(data))).to_json() == data


def test_all_quantized_accuracy_is_the_calibrated_model_accuracy():
    """Switching quantizers off and on again leaves the calibrated model as it was."""
    torch.manual_seed(0)
    model = build_model("lenet", 10, 1).eval()
    calibration, evaluation = _teacher_data(model, shape=(1, 28, 28))
    scheme = iao_scheme(4, 4, ptq=True)
    report = layer_sensitivity(model, scheme, calibration, iter(evaluation), calibration_batches=2)
    normal = calibrate(prepare(model, scheme), calibration, num_batches=2)
    assert abs(report.all_quantized_acc - evaluate(normal, evaluation)["acc"] * 100) < 1e-9
    assert report.float_acc == 100.0  # every quantizer off is exactly the float model
    assert [s.layer for s in sorted(report.layers, key=lambda s: s.layer)] == ["conv1", "conv2", "fc1", "fc2"]


@pytest.mark.parametrize("scheme", [dorefa_scheme(4, 2), wbwtab.wbwtab_scheme(2, 3)], ids=["dorefa", "wbwtab"])
def test_low_bit_schemes_measure_the_layers_they_quantize(scheme):
    torch.manual_seed(0)
    model = build_model("lenet", 10, 1).eval()
    calibration, evaluation = _teacher_data(model, n=200, shape=(1, 28, 28))
    report = layer_sensitivity(model, scheme, calibration, evaluation)
    expected = {"conv2", "fc1", "fc2"} if scheme.name.startswith("dorefa") else {"conv2", "fc1"}  # first (and last) float
    assert {s.layer for s in report.layers} == expected
    if scheme.name.startswith("dorefa"):
        assert report.float_acc == 100.0
    else:  # the sign activations that replaced the ReLUs stay on: the reference is not the float model
        assert report.float_acc < 100.0


def test_choose_skip_needs_exactly_one_rule():
    report = layer_sensitivity(_toy(), iao_scheme(ptq=True), *_teacher_data(_toy()))
    for kwargs in ({}, {"top": 1, "max_drop": 0.5}):
        with pytest.raises(ConfigError, match="exactly one"):
            choose_skip(report, **kwargs)
    with pytest.raises(ConfigError, match="negative"):
        choose_skip(report, top=-1)
    assert choose_skip(report, top=0) == [] and len(choose_skip(report, top=10)) == 3


def test_skip_list_files_round_trip_into_every_preset(tmp_path):
    text = tmp_path / "skip.txt"
    text.write_text("# keep these float\n\nconv2   # the sensitive one\nfc1\nconv2\n")
    assert read_skip_list(text) == ["conv2", "fc1"]
    report = SensitivityReport("s", 10, 90.0, 80.0, skip=["fc1"])
    (tmp_path / "sensitivity.json").write_text(json.dumps(report.to_json()))
    assert read_skip_list(tmp_path / "sensitivity.json") == ["fc1"]
    model = build_model("lenet", 10, 1)
    skip = read_skip_list(text)
    for prepared in (iao.prepare(model, skip=skip), dorefa.prepare(model, skip=skip), wbwtab.prepare(model, skip=skip)):
        assert type(prepared.conv2) is nn.Conv2d and type(prepared.fc1) is nn.Linear
        assert ("conv2", "skipped") in prepared.quantization_report.kept_float
        assert "conv2" in prepared.quant_scheme.skip
    assert isinstance(iao.prepare(model).fc1, QuantLinear)


def test_bad_skip_lists(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_skip_list(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="folder"):
        read_skip_list(tmp_path)
    (tmp_path / "other.json").write_text('{"layers": []}')
    with pytest.raises(ConfigError, match="no \"skip\" list"):
        read_skip_list(tmp_path / "other.json")
    with pytest.raises(ConfigError, match=r"fc3 \(did you mean fc2\?\).*conv1, conv2, fc1, fc2"):
        prepare(build_model("lenet", 10, 1), iao_scheme(), skip=["fc3"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sens") / "lenet"
    save_checkpoint(path, build_model("lenet", 10, 1), data_info=load_dataset("synthetic", train_subset=400).info)
    return path


SMALL = ["--train-subset", "400", "--test-subset", "100", "--batch-size", "32"]


def test_cli_sensitivity_writes_the_report_and_quantize_reads_its_skip_list(checkpoint, tmp_path, capsys):
    out = tmp_path / "sens"
    assert main(["sensitivity", "iao", "--checkpoint", str(checkpoint), "--w_bits", "4", "--a-bits", "4", "--images", "30",
                 "--calibration-batches", "2", "--top", "1", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "sensitivity.json").read_text())
    assert list(data) == SCHEMA and all(list(layer) == LAYER_SCHEMA for layer in data["layers"])
    assert data["scheme"] == "iao-w4a4-sym-per-channel-ptq" and data["metric"] == "validation accuracy (%)"
    assert data["images"] == 30 and data["checkpoint"] == str(checkpoint) and len(data["layers"]) == 4
    assert [layer["rank"] for layer in data["layers"]] == [1, 2, 3, 4] and data["skip"] == [data["layers"][0]["layer"]]
    assert read_skip_list(out / "skip.txt") == data["skip"]
    assert sorted(p.name for p in out.iterdir()) == ["sensitivity.json", "skip.txt"]  # no temporary files left
    assert "| rank | layer" in printed and "keep in float (the 1 most sensitive)" in printed

    skipped = data["skip"][0]
    for skip in ([str(out / "skip.txt")], ["@" + str(out / "sensitivity.json"), "fc1"]):
        run = tmp_path / f"q{len(skip)}"
        assert main(["quantize", "iao", "--checkpoint", str(checkpoint), "--ptq", "--ptq_batch", "2", "--skip", *skip,
                     "--out", str(run), *SMALL]) == 0
        model = load_model(run)
        assert type(model.get_submodule(skipped)) in (nn.Conv2d, nn.Linear)
        assert (skipped, "skipped") in model.quantization_report.kept_float
        assert (("fc1", "skipped") in model.quantization_report.kept_float) == (len(skip) == 2)


def test_cli_sensitivity_with_a_low_bit_method(checkpoint, tmp_path, capsys):
    out = tmp_path / "dorefa"
    assert main(["sensitivity", "dorefa", "--checkpoint", str(checkpoint), "--w_bits", "2", "--images", "20",
                 "--calibration-batches", "1", "--max-drop", "100", "--out", str(out), *SMALL]) == 0
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["scheme"] == "dorefa-w2a8" and data["skip"] == [] and "conv1" not in {x["layer"] for x in data["layers"]}


def test_cli_bad_inputs(checkpoint, tmp_path, capsys, cli_fails):
    base = ["quantize", "iao", "--checkpoint", str(checkpoint), "--ptq", "--out", str(tmp_path / "q"), *SMALL]
    cli_fails([*base, "--skip", "fc9"], "fc9", "conv1, conv2, fc1, fc2")
    cli_fails([*base, "--skip", str(tmp_path / "missing.txt")], "missing.txt", "does not exist")
    cli_fails([*base, "--skip", "@missing"], "missing", "does not exist")
    sens = ["sensitivity", "iao", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "s"), *SMALL]
    cli_fails([*sens, "--top", "1", "--max-drop", "0.5"], "--top", "--max-drop", "not both")
    cli_fails([*sens, "--val-fraction", "0"], "validation split is empty")
    cli_fails(["sensitivity", "dorefa", "--checkpoint", str(checkpoint), "--W", "3", "--out", str(tmp_path / "s")],
              "--W, --A and --center-weights belong to")
    assert not (tmp_path / "s").exists() and not (tmp_path / "q").exists()
