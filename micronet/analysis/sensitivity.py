"""Per-layer quantization sensitivity: which layers to keep in float.

:func:`layer_sensitivity` prepares and calibrates a quantized copy of a float model once, then switches
fake-quantization on and off (:func:`~micronet.compression.quantization.core.set_fake_quant`) to measure,
for every quantized weighted layer, the accuracy with only that layer quantized and with every layer but
that one quantized. Switching a quantizer off makes it the identity and touches no statistics, so every
measurement uses the same calibrated model. :func:`choose_skip` turns the ranking into a skip list,
:func:`read_skip_list` reads it back for ``prepare(model, scheme, skip=...)`` and ``micronet quantize --skip``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from micronet.compression.quantization.core.modules import WeightedQuantizedModule
from micronet.compression.quantization.core.quantizers import Quantizer
from micronet.compression.quantization.core.scheme import QuantScheme
from micronet.compression.quantization.core.workflow import calibrate, prepare, quantizers, set_fake_quant
from micronet.errors import ConfigError
from micronet.outputs import OutputKind, read_json_dict

SENSITIVITY_FILE, SKIP_FILE = "sensitivity.json", "skip.txt"
SENSITIVITY_OUTPUT = OutputKind("sensitivity result",
                                lambda path: "layers" in (read_json_dict(path / SENSITIVITY_FILE) or {}),
                                frozenset({SENSITIVITY_FILE, SKIP_FILE}))

__all__ = ["LayerSensitivity", "SensitivityReport", "choose_skip", "layer_sensitivity", "read_skip_list"]

METRIC = "validation accuracy (%)"


@dataclass
class LayerSensitivity:
    """One quantized weighted layer: accuracy (%) with only it quantized and with all but it quantized."""

    layer: str
    only_acc: float
    only_drop: float  # float_acc - only_acc: what quantizing this layer alone costs
    all_but_acc: float
    all_but_gain: float  # all_but_acc - all_quantized_acc: what keeping this layer float gains
    rank: int = 0  # 1 = most sensitive

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "only_acc": _round(self.only_acc), "only_drop": _round(self.only_drop),
                "all_but_acc": _round(self.all_but_acc), "all_but_gain": _round(self.all_but_gain), "rank": self.rank}


@dataclass
class SensitivityReport:
    """What :func:`layer_sensitivity` measured; ``layers`` are sorted by rank, ``skip`` is filled by the caller
    (usually with :func:`choose_skip`). Accuracies are in percent; :meth:`to_json` rounds them to 4 decimals."""

    scheme: str
    images: int
    float_acc: float
    all_quantized_acc: float
    layers: list[LayerSensitivity] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    metric: str = METRIC

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "scheme": self.scheme, "metric": self.metric, "images": self.images,
                "float_acc": _round(self.float_acc), "all_quantized_acc": _round(self.all_quantized_acc),
                "layers": [layer.to_json() for layer in self.layers], "skip": list(self.skip)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SensitivityReport:
        try:
            return cls(scheme=data["scheme"], images=int(data["images"]), float_acc=float(data["float_acc"]),
                       all_quantized_acc=float(data["all_quantized_acc"]),
                       layers=[LayerSensitivity(**layer) for layer in data["layers"]], skip=list(data.get("skip", [])),
                       checkpoint=data.get("checkpoint"), metric=data.get("metric", METRIC))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a sensitivity report ({type(exc).__name__}: {exc}): write one with "
                              "`micronet sensitivity`") from None

    def rows(self) -> list[dict[str, Any]]:
        """Table rows, most sensitive first: ``format_table(report.rows(), floatfmt=".2f")``."""
        skipped = set(self.skip)
        return [{"rank": s.rank, "layer": s.layer, "only this layer (%)": s.only_acc, "drop (pt)": s.only_drop,
                 "all but this (%)": s.all_but_acc, "gain (pt)": s.all_but_gain,
                 "keep float": "yes" if s.layer in skipped else ""} for s in self.layers]


def _round(value: float) -> float:
    return round(float(value), 4)


def _accuracy(model: nn.Module, data: Iterable[Any], device: torch.device) -> tuple[float, int]:
    from micronet.engine import evaluate

    stats = evaluate(model, data, device)
    if stats["samples"] == 0:
        raise ConfigError("the evaluation data is empty: pass a loader that yields at least one (input, target) batch")
    return stats["acc"] * 100.0, int(stats["samples"])


def layer_sensitivity(
    model: nn.Module,
    scheme: QuantScheme,
    calibration: Iterable[Any],
    evaluation: Iterable[Any],
    *,
    calibration_batches: int | None = None,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
) -> SensitivityReport:
    """Rank the quantized weighted layers of ``prepare(model, scheme)`` by how much quantizing them costs.

    A copy of the float ``model`` is prepared with ``scheme`` (its ``skip`` and first/last-layer policy
    apply), moved to ``device`` (default: where ``model`` is) and calibrated once on ``calibration_batches``
    batches of ``calibration`` (all when None). ``evaluation`` yields (input, target) batches and is
    iterated once per measurement (an iterator is materialized first). Measured, in percent:

    * ``float_acc``: every quantizer off; ``all_quantized_acc``: every quantizer on (the calibrated model);
    * per layer, ``only_acc``: only that layer's quantizers on; ``all_but_acc``: every quantizer on but its.

    **Which quantizers belong to a layer.** Every conv / linear layer ``prepare`` quantized (a
    :class:`~micronet.compression.quantization.core.modules.WeightedQuantizedModule`, BN-folding convs
    included) owns the quantizers attached under its name: ``<layer>.weight_quantizer`` and
    ``<layer>.input_quantizer`` — in micronet a quantized module quantizes what it consumes, so the
    activation feeding a layer belongs to that layer. Switching them off is exactly what
    ``prepare(..., skip=[layer])`` leaves in float, so ``all_but_acc`` predicts that skip list, up to the
    ranges of later layers: calibration runs with every quantizer on (the model as deployed), so a layer
    whose quantization wrecks its output also skews the ranges calibrated after it. Later layers then look
    more sensitive than they are and ``all_but_acc`` understates what skipping it (and recalibrating)
    gains; measure again with that layer in ``scheme.skip`` to rank the others.

    The other quantizers (inputs of pools, adds, concats, quantized activations) belong to no layer: they
    are off with the float reference and in ``only`` measurements, on with ``all_quantized`` and in
    ``all_but`` measurements. Quantizers that *replace* a float module (WbWtAb's sign activations in place
    of ReLUs) stay on in every measurement — switched off they would be the identity, not the ReLU they
    replaced — so for WbWtAb the "float" reference has float weights and binary activations.

    ``log``, when given, receives one line per measured layer (progress on slow models).
    """
    if iter(evaluation) is evaluation:
        evaluation = list(evaluation)
    prepared = prepare(model, scheme)
    if device is not None:
        prepared.to(device)
    device = next((p.device for p in prepared.parameters()), torch.device("cpu"))
    calibrate(prepared, calibration, num_batches=calibration_batches)
    modules = dict(prepared.named_modules())
    layers = [name for name, module in modules.items() if isinstance(module, WeightedQuantizedModule)]
    pinned = [name for name, _ in prepared.quantization_report.quantized if isinstance(modules.get(name), Quantizer)]
    all_names = [name for name, _ in quantizers(prepared)]

    def measure(enabled: list[str]) -> tuple[float, int]:
        set_fake_quant(prepared, False)
        if enabled:
            set_fake_quant(prepared, True, enabled)
        if pinned:
            set_fake_quant(prepared, True, pinned)
        return _accuracy(prepared, evaluation, device)

    float_acc, images = measure([])
    all_acc, _ = measure(all_names)
    results: list[LayerSensitivity] = []
    for index, layer in enumerate(layers, 1):
        only, _ = measure([layer])
        owned = {name for name in all_names if name.startswith(layer + ".")}
        all_but, _ = measure([name for name in all_names if name not in owned])
        results.append(LayerSensitivity(layer, only, float_acc - only, all_but, all_but - all_acc))
        if log is not None:
            log(f"[{index}/{len(layers)}] {layer}: only this layer {only:.2f}%, all but this {all_but:.2f}%")
    set_fake_quant(prepared, True)
    results.sort(key=lambda s: (-s.only_drop, -s.all_but_gain))  # stable: full ties keep the module order
    for rank, result in enumerate(results, 1):
        result.rank = rank
    return SensitivityReport(scheme=scheme.name, images=images, float_acc=float_acc, all_quantized_acc=all_acc,
                             layers=results)


def choose_skip(report: SensitivityReport, *, top: int | None = None, max_drop: float | None = None) -> list[str]:
    """The layers to keep in float, most sensitive first: the ``top`` highest-ranked, or every layer whose
    ``only_drop`` exceeds ``max_drop`` percentage points. Give exactly one of the two."""
    if (top is None) == (max_drop is None):
        raise ConfigError("choose the layers to keep in float either by rank (top=K) or by accuracy drop "
                          "(max_drop=PT), exactly one of the two")
    ranked = sorted(report.layers, key=lambda s: s.rank)
    if top is not None:
        if top < 0:
            raise ConfigError(f"top is the number of layers to keep in float and cannot be negative (got {top})")
        return [s.layer for s in ranked[:top]]
    return [s.layer for s in ranked if s.only_drop > max_drop]


def read_skip_list(path: str | os.PathLike) -> list[str]:
    """Module names to keep in float, from a ``sensitivity.json`` (its ``skip``) or a text file with one
    name per line (``#`` starts a comment; blank lines are ignored). Duplicates are dropped, order kept."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"skip list {path} {what}: pass a sensitivity.json or a text file with one module "
                          "name per line (written by `micronet sensitivity --out DIR`)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read skip list {path}: {exc}") from None
    if text.lstrip().startswith("{"):
        try:
            names = json.loads(text).get("skip")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"skip list {path} is not valid JSON ({exc})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{path} has no \"skip\" list of module names: is it a sensitivity.json?")
    else:
        names = [word for line in text.splitlines() for word in line.split("#", 1)[0].split()]
    return list(dict.fromkeys(names))
