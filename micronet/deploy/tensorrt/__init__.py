"""TensorRT 10 deployment: the Q/DQ rules check, engine building, INT8 calibration and an engine runner.

Importing this package never imports ``tensorrt`` (most machines cannot install it): the functions that need
it import it when called and raise :class:`~micronet.errors.DeployError` naming the install command when it is
missing. :func:`check_tensorrt_qdq` needs neither TensorRT nor a GPU: run it on every QDQ export.
"""

from micronet.deploy.tensorrt.builder import PRECISIONS, build_engine, input_specs, is_qdq
from micronet.deploy.tensorrt.calibrator import CalibrationFeeder, make_entropy_calibrator
from micronet.deploy.tensorrt.rules import RULES, RulesReport, Violation, check_tensorrt_qdq
from micronet.deploy.tensorrt.runner import TensorRTRunner, benchmark, evaluate, load_engine

__all__ = ["PRECISIONS", "RULES", "CalibrationFeeder", "RulesReport", "TensorRTRunner", "Violation", "benchmark",
           "build_engine", "check_tensorrt_qdq", "evaluate", "input_specs", "is_qdq", "load_engine",
           "make_entropy_calibrator"]
