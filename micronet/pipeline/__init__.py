"""One command from FP32 to a measured, deployed model: a YAML of steps, cached, resumable, reported.

``run_pipeline("configs/default.yaml")`` trains, sparse-trains, prunes, fine-tunes, quantizes, exports to
ONNX, evaluates and times in ONNX Runtime, and writes ``report.md`` / ``report.json`` / plots.
"""

from micronet.pipeline.config import PipelineConfig, Step, load_config
from micronet.pipeline.runner import run_pipeline

__all__ = ["PipelineConfig", "Step", "load_config", "run_pipeline"]
