"""Tests for micronet.pipeline.report: consistency checks, report.md and the plots, from a synthetic report.json."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from micronet.errors import MicronetError, PipelineError
from micronet.pipeline.plots import pareto_front, size_axis
from micronet.pipeline.report import consistency_problems, load_report, render_markdown, render_report

BASE_MB = 0.4936  # FP32 NIN-sized model: 123,400 parameters × 32 bits / 8


def _row(name, type_, bits, acc, ort, size_mb, file_mb, int8, latency):
    return {"name": name, "type": type_, "model": "nin", "w_bits": bits, "a_bits": bits, "acc_torch": acc,
            "acc_ort": ort, "gflops": 0.0512, "params_m": 0.1234, "size_mb": size_mb, "file_mb": file_mb,
            "packed_mb": None, "compression": 1 - size_mb / BASE_MB, "loss": 92.41 - acc,
            "latency_ms_b1": latency[0], "latency_ms_b64": latency[1], "int8_onnx": int8}


def make_report():
    """FP32, INT8 (int8 ONNX), ternary and binary rows whose derived columns are consistent."""
    return {
        "name": "default", "config": "configs/default.yaml", "data": "fashion-mnist", "test_images": 10000,
        "machine": {"cpu": "AMD EPYC 7B13", "cores": 2, "torch": "2.13.0", "onnxruntime": "1.32.0", "threads": 1},
        "wall_time_s": 812.3, "baseline": "fp32",
        "rows": [
            _row("fp32", "FP32", 32, 92.41, 92.40, BASE_MB, 0.5012, False, (0.51, 12.3)),
            _row("int8", "INT8", 8, 92.10, 92.05, BASE_MB / 4, 0.1402, True, (0.32, 6.8)),
            _row("ternary", "Ternary", 2, 90.50, 90.48, BASE_MB / 16, 0.5012, False, (0.50, 12.1)),
            _row("binary", "Binary", 1, 88.00, None, BASE_MB / 32, None, False, (None, None)),
        ],
    }


SENSITIVITY = {
    "checkpoint": "runs/default/fp32/best", "scheme": "IAO W8A8 per-channel", "metric": "validation accuracy (%)",
    "images": 2000, "float_acc": 92.1, "all_quantized_acc": 91.8,
    "layers": [
        {"layer": "features.0", "only_acc": 91.5, "only_drop": 0.6, "all_but_acc": 92.0, "all_but_gain": 0.2,
         "rank": 1},
        {"layer": "classifier", "only_acc": 91.9, "only_drop": 0.2, "all_but_acc": 91.9, "all_but_gain": 0.1,
         "rank": 2},
        {"layer": "features.3", "only_acc": 92.05, "only_drop": 0.05, "all_but_acc": 91.8, "all_but_gain": 0.0,
         "rank": 3, "extra": "ignored"},
    ],
    "skip": ["features.0"],
}


def write(directory, report=None, sensitivity=None):
    (directory / "report.json").write_text(json.dumps(report or make_report()))
    if sensitivity is not None:
        (directory / "sensitivity.json").write_text(json.dumps(sensitivity))
    return directory


def test_consistent_report_has_no_problems():
    report = make_report()
    assert [round(r["compression"], 6) for r in report["rows"]] == [0.0, 0.75, 0.9375, 0.96875]
    assert [round(r["loss"], 6) for r in report["rows"]] == [0.0, 0.31, 1.91, 4.41]
    assert consistency_problems(report) == []


@pytest.mark.parametrize(("row", "field", "value", "fragments"), [
    (2, "compression", 0.9, ["row 'ternary'", "compression is 0.9", "0.9375"]),
    (3, "loss", 4.0, ["row 'binary'", "loss is 4", "4.41"]),
    (1, "acc_ort", 92.10 + 0.6, ["row 'int8'", "acc_ort 92.70%", "acc_torch 92.10%", "0.60 pt"]),
    (1, "acc_ort", None, ["row 'int8'", "acc_ort", "missing"]),
    (1, "acc_openvino", 10.0, ["row 'int8'", "acc_openvino 10.00%", "OpenVINO", "acc_torch 92.10%", "82.10 pt"]),
])
def test_each_corruption_is_one_problem_naming_row_and_field(row, field, value, fragments):
    report = make_report()
    report["rows"][row][field] = value
    problems = consistency_problems(report)
    assert len(problems) == 1, problems
    assert all(fragment in problems[0] for fragment in fragments), problems[0]


def test_ort_tolerance_applies_only_to_int8_graphs():
    report = make_report()
    report["rows"][1]["acc_ort"] = 92.10 - 0.4  # within 0.5 pt
    report["rows"][2]["acc_ort"] = 80.0  # ternary: a float ONNX graph, not compared
    assert consistency_problems(report) == []
    assert len(consistency_problems(report, ort_tolerance_pt=0.3)) == 1


def test_missing_baseline_is_reported():
    report = make_report()
    report["baseline"] = "float"
    assert consistency_problems(report) == [
        "baseline row 'float' is not among the rows: compression and loss cannot be checked"]


def test_pareto_front_keeps_best_accuracy_at_each_size():
    points = [(0.49, 92.41), (0.12, 92.10), (0.03, 90.5), (0.015, 88.0), (0.2, 91.0), (0.12, 91.0)]
    assert pareto_front(points) == [(0.015, 88.0), (0.03, 90.5), (0.12, 92.10), (0.49, 92.41)]


def test_render_report_writes_markdown_and_plots(tmp_path):
    written = render_report(write(tmp_path))
    names = sorted(p.name for p in written)
    assert names == ["accuracy_vs_size.png", "latency.png", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_vs_size.png", "latency.png", "report.json",
                                                         "report.md"]  # no temporary file left behind
    for png in ("accuracy_vs_size.png", "latency.png"):
        with Image.open(tmp_path / png) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 500
        assert (tmp_path / png).stat().st_size > 20_000
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# Compression pipeline: default\n")
    assert ("| Type    | W bits | A bits | Acc PyTorch (%) | Acc ORT (%) | GFLOPs | Params (M) | Size (MB, theory) "
            "| File (MB) | Compression | Loss (pt) | ORT b1 (ms) | ORT b64 (ms) |") in text
    assert "| Binary  |      1 |      1 |           88.00 |           – | 0.0512 |     0.1234 |           0.01542 " \
           "|         – |       96.9% |      4.41 |           – |            – |" in text
    assert "| INT8    |      8 |      8 |           92.10 |       92.05 |" in text
    assert "|        0.50 |        12.10 |" in text
    for acc in ("92.41", "92.10", "90.50", "88.00"):
        assert f"|           {acc} |" in text
    assert "fashion-mnist, 10000 test images" in text and "AMD EPYC 7B13, 2 cores" in text
    assert "13 min 32 s" in text
    assert "![Accuracy vs size](accuracy_vs_size.png)" in text and "![ONNX Runtime latency](latency.png)" in text
    assert "## Layer sensitivity" not in text and not (tmp_path / "sensitivity.png").exists()
    assert text.endswith("## Consistency\n\nAll checks pass.\n")


def test_report_lists_problems_and_step_errors():
    report = make_report()
    report["rows"][2]["compression"] = 0.5
    report["rows"][3]["errors"] = ["ONNX export: unsupported operator"]
    text = render_markdown(report, None)
    assert "- row 'binary': ONNX export: unsupported operator" in text
    assert text.endswith("- row 'ternary': compression is 0.5, but 1 - size_mb / size_mb(fp32) = 0.9375\n")


def test_sensitivity_section_and_plot(tmp_path):
    written = render_report(write(tmp_path, sensitivity=SENSITIVITY))
    assert "sensitivity.png" in [p.name for p in written]
    with Image.open(tmp_path / "sensitivity.png") as image:
        assert image.format == "PNG"
    text = (tmp_path / "report.md").read_text()
    assert "## Layer sensitivity" in text and "Skip list (layers kept in float): `features.0`" in text
    assert "|    1 | features.0 |                         91.50 |      0.60 |" in text
    assert "![Layer sensitivity](sensitivity.png)" in text
    assert "float: 92.10; all layers quantized: 91.80." in text


def test_no_latency_means_no_latency_plot(tmp_path):
    render_report(write(tmp_path, sensitivity=SENSITIVITY))
    (tmp_path / "sensitivity.json").unlink()
    report = make_report()
    for row in report["rows"]:
        row["latency_ms_b1"] = row["latency_ms_b64"] = None
    written = render_report(write(tmp_path, report))
    assert sorted(p.name for p in written) == ["accuracy_vs_size.png", "report.md"]
    assert not (tmp_path / "latency.png").exists() and not (tmp_path / "sensitivity.png").exists()  # stale plots
    text = (tmp_path / "report.md").read_text()
    assert "latency.png" not in text and "|           – |            – |" in text


def test_size_axis_is_measured_only_when_every_row_has_an_artifact():
    report = make_report()
    sizes, label = size_axis(report["rows"])  # the binary row has no file: theory for all rows
    assert sizes == [BASE_MB, BASE_MB / 4, BASE_MB / 16, BASE_MB / 32] and label.startswith("Size (MB, theory")
    report["rows"][3].update(file_mb=0.5012, packed_mb=0.0231)
    sizes, label = size_axis(report["rows"])
    assert sizes == [0.5012, 0.1402, 0.5012, 0.0231] and "packed artifact where present, else ONNX file" in label
    text = render_markdown(report, None)
    assert "| File (MB) | Packed (MB) | Compression |" in text and "|    0.5012 |      0.0231 |" in text


def test_missing_report_names_the_file(tmp_path):
    with pytest.raises(PipelineError, match=r"report\.json does not exist: run `micronet pipeline"):
        load_report(tmp_path / "nowhere")
    with pytest.raises(PipelineError, match=r"report\.json does not exist"):
        render_report(tmp_path)


@pytest.mark.parametrize(("content", "fragment"), [
    ("{\"rows\": [", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list"),
    ("{\"name\": \"x\"}", "has no \"rows\" list"),
])
def test_malformed_report_names_the_file(tmp_path, content, fragment):
    (tmp_path / "report.json").write_text(content)
    with pytest.raises(MicronetError) as info:
        load_report(tmp_path)
    assert str(tmp_path / "report.json") in str(info.value) and fragment in str(info.value)


def test_malformed_sensitivity_names_the_file(tmp_path):
    write(tmp_path)
    (tmp_path / "sensitivity.json").write_text("{\"layers\": 3}")
    with pytest.raises(PipelineError, match=r"sensitivity\.json has no \"layers\" list"):
        render_report(tmp_path)


def test_openvino_columns_appear_when_openvino_measured():
    report = make_report()
    assert "OpenVINO" not in render_markdown(report, None)
    report["rows"][1].update(acc_openvino=92.04, openvino_ms_b1=0.29, openvino_ms_b64=5.9)
    text = render_markdown(report, None)
    header = next(line for line in text.splitlines() if line.startswith("| Type"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells.index("Acc OpenVINO (%)") == cells.index("Acc ORT (%)") + 1
    assert cells[-2:] == ["OpenVINO b1 (ms)", "OpenVINO b64 (ms)"]
    int8_row = next(line for line in text.splitlines() if line.startswith("| INT8"))
    assert "92.04" in int8_row and "5.90" in int8_row and "in ONNX Runtime and in OpenVINO" in text
    report["machine"].update(cpu_class="AVX-512 VNNI", openvino="2026.4.1")
    assert "AMD EPYC 7B13, AVX-512 VNNI, 2 cores" in render_markdown(report, None)
    assert "openvino 2026.4.1" in render_markdown(report, None)


def test_report_lists_each_steps_time_and_their_total():
    report = make_report()
    report["step_seconds"] = [{"step": "fp32", "run": "train", "seconds": 254.4},
                              {"step": "binary", "run": "quantize", "seconds": 61.0},
                              {"step": "fp32", "run": "measure", "seconds": 9.5}]
    report["wall_time_s"] = 324.9
    text = render_markdown(report, None)
    section = text[text.index("## Time per step"):]
    assert "| fp32 | train | 4 min 14 s |" in section
    assert "| binary | quantize | 1 min 01 s |" in section
    assert "| fp32 | measure | 9.5 s |" in section
    assert "| **total** | | **5 min" in section
    assert "## Time per step" not in render_markdown(make_report(), None)  # older reports: no section
