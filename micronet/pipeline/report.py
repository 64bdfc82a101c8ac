"""The results report of a compression pipeline: ``report.md`` and its plots, rendered from ``report.json``.

The runner stores raw, unrounded numbers in ``report.json``; everything here only reads them, so a report can
be re-rendered or re-checked without re-running a step. :func:`consistency_problems` re-derives the columns
computed from other columns (and compares PyTorch with ONNX Runtime on int8 graphs), so a stale or
hand-edited ``report.json`` shows up in the report instead of being published as is.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from micronet.errors import PipelineError
from micronet.io import atomic_write_text
from micronet.pipeline import plots

__all__ = ["consistency_problems", "load_report", "render_markdown", "render_report"]

REPORT_JSON = "report.json"
SENSITIVITY_JSON = "sensitivity.json"
REPORT_MD = "report.md"
ACCURACY_PNG = "accuracy_vs_size.png"
LATENCY_PNG = "latency.png"
SENSITIVITY_PNG = "sensitivity.png"
MISSING = "–"

# header, row key, format (None: the value as written)
COLUMNS: list[tuple[str, str, str | None]] = [
    ("Type", "type", None), ("W bits", "w_bits", "g"), ("A bits", "a_bits", "g"),
    ("Acc PyTorch (%)", "acc_torch", ".2f"), ("Acc ORT (%)", "acc_ort", ".2f"), ("GFLOPs", "gflops", ".4g"),
    ("Params (M)", "params_m", ".4g"), ("Size (MB, theory)", "size_mb", ".4g"), ("File (MB)", "file_mb", ".4g"),
    ("Compression", "compression", ".1%"), ("Loss (pt)", "loss", ".2f"),
    ("ORT b1 (ms)", "latency_ms_b1", ".2f"), ("ORT b64 (ms)", "latency_ms_b64", ".2f"),
]
PACKED_COLUMN = ("Packed (MB)", "packed_mb", ".4g")  # only shown when some row has a packed artifact
# only shown when OpenVINO measured some row (it is an optional dependency): the same ONNX file
OPENVINO_COLUMNS = [("Acc OpenVINO (%)", "acc_openvino", ".2f"), ("OpenVINO b1 (ms)", "openvino_ms_b1", ".2f"),
                    ("OpenVINO b64 (ms)", "openvino_ms_b64", ".2f")]
PACKED_RUNTIME_COLUMNS = [("Packed b1 (ms)", "packed_latency_ms_b1", ".2f"),  # only shown when some row ran on
                          ("Packed b64 (ms)", "packed_latency_ms_b64", ".2f")]  # the bit-packed binary runtime
SENSITIVITY_COLUMNS: list[tuple[str, str, str | None]] = [
    ("Rank", "rank", "g"), ("Layer", "layer", None), ("Only this layer quantized (%)", "only_acc", ".2f"),
    ("Drop (pt)", "only_drop", ".2f"), ("All but this layer quantized (%)", "all_but_acc", ".2f"),
    ("Gain (pt)", "all_but_gain", ".2f"),
]
SENSITIVITY_FACTS = [("Scheme", "scheme", None), ("metric", "metric", None), ("images", "images", None),
                     ("checkpoint", "checkpoint", None), ("float", "float_acc", ".2f"),
                     ("all layers quantized", "all_quantized_acc", ".2f")]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PipelineError(f"{path} is not valid JSON ({error}): re-run the step that writes it") from error
    if not isinstance(data, dict):
        raise PipelineError(f"{path} holds a JSON {type(data).__name__}, not an object: re-run the step that writes it")
    return data


def load_report(directory: str | os.PathLike) -> dict[str, Any]:
    """Read ``DIR/report.json``; a missing or unreadable one is a user error, not a traceback."""
    path = Path(directory) / REPORT_JSON
    if not path.is_file():
        raise PipelineError(f"{path} does not exist: run `micronet pipeline --config CONFIG` first, "
                            "with its `out` folder as this directory")
    report = _read_json(path)
    rows = report.get("rows")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise PipelineError(f"{path} has no \"rows\" list of objects: it was not written by `micronet pipeline`")
    return report


def _load_sensitivity(directory: Path) -> dict[str, Any] | None:
    path = directory / SENSITIVITY_JSON
    if not path.is_file():
        return None
    sensitivity = _read_json(path)
    layers = sensitivity.get("layers")
    if not isinstance(layers, list) or not all(isinstance(entry, dict) and "layer" in entry for entry in layers):
        raise PipelineError(f"{path} has no \"layers\" list of objects with a \"layer\" name: "
                            "re-run the sensitivity step")
    return sensitivity


# ---------------------------------------------------------------------------------------------- consistency


def _row_name(row: dict[str, Any]) -> str:
    return f"row '{row.get('name', row.get('type', '?'))}'"


def _baseline(report: dict[str, Any]) -> dict[str, Any] | None:
    return next((row for row in report["rows"] if row.get("name") == report.get("baseline")), None)


def _mismatch(row: dict[str, Any], field: str, expected: float | None, formula: str, tolerance: float) -> list[str]:
    actual = row.get(field)
    if actual is None or expected is None:
        return [f"{_row_name(row)}: {field} cannot be checked against {formula} (a value is missing)"]
    if abs(actual - expected) > tolerance:
        return [f"{_row_name(row)}: {field} is {actual:.6g}, but {formula} = {expected:.6g}"]
    return []


def _derived_problems(row: dict[str, Any], base: dict[str, Any], tolerance: float) -> list[str]:
    """Compression and loss must follow from size and accuracy relative to the baseline row."""
    name = base["name"]
    size, base_size = row.get("size_mb"), base.get("size_mb")
    compression = None if size is None or not base_size else 1 - size / base_size
    acc, base_acc = row.get("acc_torch"), base.get("acc_torch")
    loss = None if acc is None or base_acc is None else base_acc - acc
    return (_mismatch(row, "compression", compression, f"1 - size_mb / size_mb({name})", tolerance)
            + _mismatch(row, "loss", loss, f"acc_torch({name}) - acc_torch", tolerance))


def _ort_problems(row: dict[str, Any], tolerance_pt: float) -> list[str]:
    """An int8 ONNX graph must score what the fake-quantized PyTorch model scores, within rounding noise, in
    ONNX Runtime and (where it ran) in OpenVINO."""
    ort, acc = row.get("acc_ort"), row.get("acc_torch")
    if ort is None or acc is None:
        return [f"{_row_name(row)}: acc_ort of the int8 ONNX file cannot be compared with acc_torch "
                "(a value is missing)"]
    problems = []
    for key, runtime in (("acc_ort", "ONNX Runtime"), ("acc_openvino", "OpenVINO")):
        value = row.get(key)  # OpenVINO is optional: checked where it ran
        if value is not None and abs(value - acc) > tolerance_pt:
            problems.append(f"{_row_name(row)}: {key} {value:.2f}% of the int8 ONNX file in {runtime} differs from "
                            f"acc_torch {acc:.2f}% by {abs(value - acc):.2f} pt (more than {tolerance_pt:g} pt)")
    return problems


def consistency_problems(report: dict[str, Any], *, ort_tolerance_pt: float = 0.5,
                         tolerance: float = 1e-6) -> list[str]:
    """Every inconsistency of ``report`` as one sentence naming the row and field (empty: all checks pass)."""
    base = _baseline(report)
    problems = [] if base is not None else [
        f"baseline row {report.get('baseline')!r} is not among the rows: compression and loss cannot be checked"]
    for row in report["rows"]:
        if base is not None:
            problems += _derived_problems(row, base, tolerance)
        if row.get("int8_onnx"):
            problems += _ort_problems(row, ort_tolerance_pt)
    return problems


# ------------------------------------------------------------------------------------------------- markdown


def _cell(value: Any, fmt: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return str(value) if fmt is None else format(value, fmt)


def _markdown_table(columns: Sequence[tuple[str, str, str | None]], rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table, formatted columns right-aligned. (``format_table`` writes a missing value as an
    empty cell and left-aligns a numeric column holding one, so it cannot show "–".)"""
    text = [[_cell(row.get(key), fmt) for _, key, fmt in columns] for row in rows]
    widths = [max([len(header), 3] + [len(r[c]) for r in text]) for c, (header, _, _) in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.rjust(w) if fmt else cell.ljust(w)
                                 for cell, w, (_, _, fmt) in zip(cells, widths, columns, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if fmt else "-" * (w + 2)
                          for w, (_, _, fmt) in zip(widths, columns, strict=True)) + "|"
    return "\n".join([line([header for header, _, _ in columns]), rule] + [line(r) for r in text])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _machine(machine: dict[str, Any]) -> str:
    parts = [str(machine["cpu"])] if machine.get("cpu") else []
    if machine.get("cpu_class"):  # what decides the int8 kernels, hence the latency ratios
        parts.append(str(machine["cpu_class"]))
    if machine.get("cores") is not None:
        parts.append(f"{machine['cores']} cores")
    parts += [f"{lib} {machine[lib]}" for lib in ("torch", "onnxruntime", "openvino") if machine.get(lib)]
    if machine.get("threads") is not None:
        parts.append(f"{machine['threads']} thread{'s' if machine['threads'] != 1 else ''}")
    return ", ".join(parts) or MISSING


def _plots(report: dict[str, Any], sensitivity: dict[str, Any] | None) -> dict[str, Callable[[Path], Path]]:
    """The plot files this report has, each with the function that draws it; the Markdown links exactly these."""
    rows = report["rows"]
    drawn: dict[str, Callable[[Path], Path]] = {}
    if plots.accuracy_points(rows):
        drawn[ACCURACY_PNG] = lambda path: plots.accuracy_vs_size(rows, path)
    if plots.latency_rows(rows):
        drawn[LATENCY_PNG] = lambda path: plots.latency(rows, path)
    if sensitivity is not None and any(entry.get("only_drop") is not None for entry in sensitivity["layers"]):
        drawn[SENSITIVITY_PNG] = lambda path: plots.sensitivity(sensitivity["layers"], path)
    return drawn


def _sensitivity_section(sensitivity: dict[str, Any], plotted: bool) -> list[str]:
    facts = [f"{label}: {_cell(sensitivity[key], fmt)}" for label, key, fmt in SENSITIVITY_FACTS
             if sensitivity.get(key) is not None]
    lines = ["## Layer sensitivity", ""]
    if facts:
        lines += ["; ".join(facts) + ".", ""]
    lines += [_markdown_table(SENSITIVITY_COLUMNS, sensitivity["layers"]), ""]
    if "skip" in sensitivity:
        skip = ", ".join(f"`{layer}`" for layer in sensitivity["skip"]) or "none"
        lines += [f"Skip list (layers kept in float): {skip}", ""]
    if plotted:
        lines += [f"![Layer sensitivity]({SENSITIVITY_PNG})", ""]
    return lines


def _step_times_section(step_seconds: Sequence[dict[str, Any]], total: float | None) -> list[str]:
    """Seconds of each step's last run (after an interruption: since it resumed) and of measuring each row:
    where the budget goes."""
    lines = ["## Time per step", "", "| Step | Runs | Time |", "|------|------|-----:|"]
    lines += [f"| {entry['step']} | {entry['run']} | {_duration(entry['seconds'])} |" for entry in step_seconds]
    return lines + [f"| **total** | | **{_duration(total)}** |", ""]


def _errors_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    errors = [f"- {_row_name(row)}: {error}" for row in rows for error in row.get("errors") or []]
    return ["## Step errors", "", *errors, ""] if errors else []


def render_markdown(report: dict[str, Any], sensitivity: dict[str, Any] | None) -> str:
    """The text of ``report.md`` (pure: no file is read or written)."""
    rows = report["rows"]
    drawn = _plots(report, sensitivity)
    columns = list(COLUMNS)
    if any(row.get("packed_mb") is not None for row in rows):
        columns.insert([key for _, key, _ in COLUMNS].index("file_mb") + 1, PACKED_COLUMN)
    openvino = any(row.get("acc_openvino") is not None for row in rows)
    if openvino:
        columns.insert([key for _, key, _ in columns].index("acc_ort") + 1, OPENVINO_COLUMNS[0])
        columns += OPENVINO_COLUMNS[1:]
    if any(row.get("packed_latency_ms_b1") is not None or row.get("packed_latency_ms_b64") is not None for row in rows):
        columns += PACKED_RUNTIME_COLUMNS
    lines = [
        f"# Compression pipeline: {report.get('name', MISSING)}", "",
        f"Config: `{report.get('config', MISSING)}` · Data: {report.get('data', MISSING)}, "
        f"{_cell(report.get('test_images'), None)} test images · Machine: {_machine(report.get('machine') or {})} · "
        f"Wall time: {_duration(report.get('wall_time_s'))}", "",
        _markdown_table(columns, rows), "",
        f"Size (MB, theory) counts parameter bits / 8; File (MB) is the exported ONNX file. Compression and loss "
        f"are relative to `{report.get('baseline', MISSING)}`; latencies are medians of the same ONNX file in ONNX Runtime"
        f"{' and in OpenVINO' if openvino else ''} (Packed: the binary layers on micronet's bit-packed XNOR-popcount "
        f"runtime, same threads).", "",
    ]
    alt = {ACCURACY_PNG: "Accuracy vs size", LATENCY_PNG: "ONNX Runtime latency"}
    lines += [f"![{alt[name]}]({name})" for name in alt if name in drawn]
    lines += [""] if any(name in drawn for name in alt) else []
    if sensitivity is not None:
        lines += _sensitivity_section(sensitivity, SENSITIVITY_PNG in drawn)
    if report.get("step_seconds"):
        lines += _step_times_section(report["step_seconds"], report.get("wall_time_s"))
    lines += _errors_section(rows)
    problems = consistency_problems(report)
    lines += ["## Consistency", ""]
    lines += [f"- {problem}" for problem in problems] if problems else ["All checks pass."]
    return "\n".join(lines) + "\n"


def render_report(directory: str | os.PathLike) -> list[Path]:
    """Write ``report.md`` and its plots next to ``report.json``; returns the paths written.

    The plots are written first, so ``report.md`` never links an image that is not there yet; a plot of an
    earlier render that this one does not draw is deleted, so the folder shows no stale picture.
    """
    directory = Path(directory)
    report = load_report(directory)
    sensitivity = _load_sensitivity(directory)
    drawn = _plots(report, sensitivity)
    for name in {ACCURACY_PNG, LATENCY_PNG, SENSITIVITY_PNG} - drawn.keys():
        (directory / name).unlink(missing_ok=True)
    written = [draw(directory / name) for name, draw in drawn.items()]
    written.append(atomic_write_text(directory / REPORT_MD, render_markdown(report, sensitivity)))
    return written
