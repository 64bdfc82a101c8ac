"""The workflow layer: one typed function per verb, shared by the command line and the pipeline.

Each verb takes its options dataclass and returns a result dataclass; progress and report lines go to ``log``
(standard output by default). ``micronet.cli`` parses argv into these options, ``micronet.pipeline`` builds
them from a YAML step, and a Python user can call them directly::

    from micronet.workflows import QuantizeOptions, quantize
    result = quantize(QuantizeOptions(method="iao", checkpoint="runs/demo", ptq=True, out="runs/demo_ptq"))
"""

from micronet.workflows.benchmark import BenchmarkOptions, BenchmarkResult, benchmark
from micronet.workflows.evaluate import Accuracy, EvaluateOptions, evaluate
from micronet.workflows.export import ExportOptions, ExportResult, export
from micronet.workflows.fuse import FuseOptions, FuseResult, fuse
from micronet.workflows.info import InfoOptions, InfoResult, info
from micronet.workflows.pack import PackOptions, PackResult, pack
from micronet.workflows.prune import PruneOptions, PruneResult, prune
from micronet.workflows.quantize import QuantizeOptions, QuantizeResult, quantize
from micronet.workflows.runs import RunResult
from micronet.workflows.sensitivity import SensitivityOptions, SensitivityResult, sensitivity
from micronet.workflows.train import TrainOptions, train

#: verb -> (options class, workflow function)
VERBS = {
    "train": (TrainOptions, train), "evaluate": (EvaluateOptions, evaluate), "benchmark": (BenchmarkOptions, benchmark),
    "export": (ExportOptions, export), "prune": (PruneOptions, prune), "quantize": (QuantizeOptions, quantize),
    "sensitivity": (SensitivityOptions, sensitivity), "info": (InfoOptions, info), "fuse": (FuseOptions, fuse),
    "pack": (PackOptions, pack),
}

__all__ = [
    "VERBS", "Accuracy", "BenchmarkOptions", "BenchmarkResult", "EvaluateOptions", "ExportOptions", "ExportResult",
    "FuseOptions", "FuseResult", "InfoOptions", "InfoResult", "PackOptions", "PackResult", "PruneOptions",
    "PruneResult", "QuantizeOptions", "QuantizeResult", "RunResult", "SensitivityOptions", "SensitivityResult",
    "TrainOptions", "benchmark", "evaluate", "export", "fuse", "info", "pack", "prune", "quantize", "sensitivity",
    "train",
]
