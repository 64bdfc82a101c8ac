"""pack: store every quantized weight of a checkpoint as its integer codes (1-8 bits packed densely, 9-16 as
two bytes) plus scale and zero point, and report the bytes each layer takes. QAT BN-folding convs are fused
first (their codes depend on the BatchNorm), so they pack too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micronet.workflows.common import Log, claim, load_source, say
from micronet.workflows.options import Overwrite, option


@dataclass(kw_only=True)
class PackOptions(Overwrite):
    checkpoint: str = option("", "--checkpoint", required=True, help="quantized checkpoint or run directory")
    out: str = option("", "--out", required=True, help="directory for the packed artifact")


@dataclass
class PackResult:
    artifact: Path
    layers: list[dict[str, Any]]


def pack(options: PackOptions, *, log: Log = say) -> PackResult:
    """Write ``options.checkpoint`` as a packed artifact at ``options.out``."""
    from micronet.analysis import format_table
    from micronet.compression.packing import (
        PACKED_OUTPUT,
        TENSOR_FILE,
        fold_for_packing,
        layer_size_rows,
        read_packed_meta,
        save_packed,
    )

    claim(options.out, PACKED_OUTPUT, options.overwrite)
    checkpoint = load_source(options.checkpoint)
    model, report = fold_for_packing(checkpoint.build_model().eval())
    if report is not None:
        log(f"fused before packing: {report.summary()}")
    out = save_packed(model, options.out, data_info=checkpoint.data_info, metrics=checkpoint.metrics)
    log(f"packed artifact: {out}")
    rows = layer_size_rows(model, Path(out) / TENSOR_FILE)
    if rows:
        log(format_table(rows))
    layers = read_packed_meta(out)["layers"]
    for layer in layers:
        if layer["stored"] != "packed":
            log(f"kept in float32: {layer['name']} ({layer['reason']})")
    return PackResult(artifact=Path(out), layers=layers)
