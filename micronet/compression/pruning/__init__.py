"""Channel pruning: sparse training (network slimming) and structured pruning of any traceable model.

``prune(model, example_input, percent=0.5, ...)`` returns a physically smaller copy with a report and a
channel record; ``apply_channel_record(fresh_model, record)`` rebuilds the pruned shapes on load.
"""

from micronet.compression.pruning.api import (
    LayerRow,
    PruneReport,
    UnprunableGroup,
    plan_pruning,
    prunable_batchnorms,
    prune,
)
from micronet.compression.pruning.graph import ChannelGraph, build_channel_graph
from micronet.compression.pruning.record import RECORD_VERSION, apply_channel_record, channel_record, derive_cfg
from micronet.compression.pruning.selection import Selection, select_channels
from micronet.compression.pruning.sparsity import BatchNormL1

__all__ = [
    "BatchNormL1",
    "ChannelGraph",
    "LayerRow",
    "PruneReport",
    "RECORD_VERSION",
    "Selection",
    "UnprunableGroup",
    "apply_channel_record",
    "build_channel_graph",
    "channel_record",
    "derive_cfg",
    "plan_pruning",
    "prunable_batchnorms",
    "prune",
    "select_channels",
]
