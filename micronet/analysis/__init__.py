"""Model analysis: parameter counts, FLOPs/MACs (FLOPs = 2 × MACs), bit-aware size, report tables.

See :mod:`micronet.analysis.complexity` for the counting conventions: FLOPs come from torch's
``FlopCounterMode`` (conv, linear, matmul only); the original micronet's "GFLOPs" were really GMACs; size counts
parameters only, at their quantized bit width where a ``weight_quantizer`` says so.
"""

from micronet.analysis.complexity import (
    FlopCount,
    ModelSummary,
    count_flops,
    count_parameters,
    model_size_bytes,
    parameter_bits,
    summarize,
)
from micronet.analysis.table import format_table

__all__ = [
    "FlopCount",
    "ModelSummary",
    "count_flops",
    "count_parameters",
    "format_table",
    "model_size_bytes",
    "parameter_bits",
    "summarize",
]
