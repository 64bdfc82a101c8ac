"""The plots of the pipeline report, drawn with matplotlib's Agg renderer and written atomically.

matplotlib is imported inside the functions (``import micronet`` must stay light) and figures are built with
``matplotlib.figure.Figure`` rather than pyplot, so drawing a report changes no global backend or figure state
of the calling process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from micronet.io import atomic_write

__all__ = ["accuracy_points", "accuracy_vs_size", "latency", "latency_rows", "pareto_front", "sensitivity", "size_axis"]

DPI = 150
BATCHES = (1, 64)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(figure: Any, path: Path) -> Path:
    # the temporary name ends in .tmp, so the format is given, not guessed from the suffix
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def _label(row: dict[str, Any]) -> str:
    return str(row.get("type") or row.get("name", "?"))


def size_axis(rows: Sequence[dict[str, Any]]) -> tuple[list[float | None], str]:
    """The sizes to plot and their axis label: bytes on disk when every row has an artifact, else theory.

    A low-bit model's ONNX file stores its weights as floats, so its packed artifact (when there is one) is
    the file that shows its compression; one axis never mixes measured and theoretical sizes.
    """
    measured = [r.get("packed_mb") if r.get("packed_mb") is not None else r.get("file_mb") for r in rows]
    if rows and all(size is not None for size in measured):
        source = "packed artifact where present, else ONNX file" if any(
            r.get("packed_mb") is not None for r in rows) else "ONNX file"
        return measured, f"Size on disk (MB, {source}; log scale)"
    return [r.get("size_mb") for r in rows], "Size (MB, theory: parameter bits / 8; log scale)"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (size, accuracy) points no smaller-or-equal point beats, by increasing size."""
    front: list[tuple[float, float]] = []
    for size, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((size, acc))
    return front


def accuracy_points(rows: Sequence[dict[str, Any]]) -> list[tuple[float, float, str]]:
    """(size, accuracy, label) of the rows that have both (a log axis needs a positive size)."""
    sizes, _ = size_axis(rows)
    return [(size, r["acc_torch"], _label(r)) for size, r in zip(sizes, rows, strict=True)
            if size is not None and size > 0 and r.get("acc_torch") is not None]


def accuracy_vs_size(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Test accuracy against model size, every row labelled, with the Pareto front as a step line."""
    points = accuracy_points(rows)
    figure = _figure(6.4, 4.4)
    ax = figure.add_subplot()
    ax.scatter([p[0] for p in points], [p[1] for p in points], zorder=3)
    for size, acc, label in points:
        ax.annotate(label, (size, acc), xytext=(4, 4), textcoords="offset points", fontsize=8)
    front = pareto_front([(p[0], p[1]) for p in points])
    if front:
        xs = [p[0] for p in front] + [max(p[0] for p in points)]
        ys = [p[1] for p in front] + [front[-1][1]]
        ax.step(xs, ys, where="post", color="tab:orange", label="Pareto front (best accuracy at ≤ size)")
        ax.legend(loc="lower right", fontsize=8)
    _log_axis(ax.xaxis)
    ax.margins(x=0.12)  # room for the labels of the outermost points
    ax.set_xlabel(size_axis(rows)[1])
    ax.set_ylabel("Test accuracy, PyTorch (%)")
    ax.set_title("Accuracy vs size")
    ax.grid(True, which="both", alpha=0.3)
    return _save(figure, Path(path))


def _log_axis(axis: Any) -> None:
    """Log scale ticked at 1, 2, 5 × 10^k and written as plain numbers (sizes span only a decade or two)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(axis.axes, f"set_{axis.axis_name}scale")("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def latency_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with at least one ONNX Runtime latency (the others have no bar)."""
    return [r for r in rows if any(r.get(f"latency_ms_b{b}") is not None for b in BATCHES)]


def latency(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars of the median ONNX Runtime latency at batch 1 and batch 64 (log scale: they differ ~50×)."""
    rows = latency_rows(rows)
    figure = _figure(max(4.8, 1.1 * len(rows) + 2), 4.0)
    ax = figure.add_subplot()
    width = 0.8 / len(BATCHES)
    for i, batch in enumerate(BATCHES):
        values = [r.get(f"latency_ms_b{batch}") for r in rows]
        heights = [math.nan if v is None else v for v in values]
        bars = ax.bar([k + (i - (len(BATCHES) - 1) / 2) * width for k in range(len(rows))], heights, width,
                      label=f"batch {batch}")
        ax.bar_label(bars, labels=["" if v is None else f"{v:.3g}" for v in values], fontsize=7)
    ax.set_xticks(range(len(rows)), [_label(r) for r in rows])
    _log_axis(ax.yaxis)
    ax.set_ylabel("Median latency, ONNX Runtime (ms; log scale)")
    ax.set_title("ONNX Runtime latency")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return _save(figure, Path(path))


def sensitivity(layers: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Horizontal bars of the accuracy drop when only one layer is quantized, most sensitive on top."""
    layers = sorted((entry for entry in layers if entry.get("only_drop") is not None),
                    key=lambda entry: entry["only_drop"])
    figure = _figure(6.4, max(2.5, 0.3 * len(layers) + 1.2))
    ax = figure.add_subplot()
    ax.barh([str(entry["layer"]) for entry in layers], [entry["only_drop"] for entry in layers])
    ax.set_xlabel("Accuracy drop with only this layer quantized (pt)")
    ax.set_title("Layer sensitivity")
    ax.grid(True, axis="x", alpha=0.3)
    return _save(figure, Path(path))
