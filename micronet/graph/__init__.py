"""Graph passes on torch.fx traces of a model.

:func:`modularize` rewrites functional tensor ops (``x + y``, ``torch.cat``, ``F.relu``, ``F.max_pool2d``,
``x.view(x.size(0), -1)`` …) into module calls so that module-swapping passes (quantizer ``prepare``,
the channel-pruning dependency graph) see them; its :class:`ModularizeReport` lists what it converted
and every tensor computation it left functional. :class:`MicronetTracer` is the tracer it uses: torch
modules, micronet modules and caller-chosen types are leaves.
"""

from micronet.graph.modularize import ModularizeReport, modularize
from micronet.graph.tracer import MicronetTracer, describe_trace_failure, is_micronet_module

__all__ = ["MicronetTracer", "ModularizeReport", "describe_trace_failure", "is_micronet_module", "modularize"]
