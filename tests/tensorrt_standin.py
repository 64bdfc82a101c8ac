"""A fake ``tensorrt`` module for the tests: the small TensorRT 10 API subset micronet calls, recording each call.

It is not TensorRT. It checks the *protocol*: which flags, profiles, calibrator and memory limits the builder
sets, that calibration pointers really hold the batches (it reads them back through ctypes), that the runner
sets shapes and addresses before ``execute_async_v3``. It computes nothing a real engine computes: an
"engine" returns the first ``classes`` values of each flattened input image as logits.

Use: ``monkeypatch.setitem(sys.modules, "tensorrt", make())``; the returned module's ``calls`` lists
``(name, details)`` in order, and ``parser_errors`` / ``fail_build`` inject failures.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types

import numpy as np
import onnx

MAGIC = b"standin-engine\n"


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class BuilderFlag(enum.Enum):
    FP16 = 0
    INT8 = 1


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0  # deprecated and ignored in TensorRT 10
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3


NPTYPES = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32}


def read_floats(pointer: int, shape) -> np.ndarray:
    """A copy of the float32 array at a raw address (what TensorRT would read from device memory)."""
    count = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(pointer)).reshape(shape).copy()


def make() -> types.ModuleType:
    """A fresh stand-in module with its own call record."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.9.0.standin"
    trt.calls = []
    trt.parser_errors = []
    trt.fail_build = False
    trt.calibration_batches = []  # arrays read back from the calibrator's pointers

    def record(call: str, **details) -> None:
        trt.calls.append((call, details))

    trt.record = record
    for enum_type in (BuilderFlag, NetworkDefinitionCreationFlag, MemoryPoolType, TensorIOMode, DataType):
        setattr(trt, enum_type.__name__, enum_type)
    trt.nptype = lambda dtype: NPTYPES[dtype]

    class Logger:
        Severity = Severity
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (Severity.INTERNAL_ERROR, Severity.ERROR, Severity.WARNING,
                                                         Severity.INFO, Severity.VERBOSE)

        def __init__(self, min_severity=Severity.WARNING) -> None:
            self.min_severity = min_severity

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            record("calibrator_init")

    class Tensor:
        def __init__(self, name: str, shape) -> None:
            self.name, self.shape = name, tuple(shape)

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.inputs, self.outputs = flags, [], []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> Tensor:
            return self.inputs[i]

    def _shape(value) -> list[int]:
        return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]

    class ParserError:
        def __init__(self, text: str) -> None:
            self.text = text

        def __str__(self) -> str:
            return self.text

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network, self.errors = network, []

        def parse_from_file(self, path: str) -> bool:
            record("parse_from_file", path=path)
            if trt.parser_errors:
                self.errors = [ParserError(text) for text in trt.parser_errors]
                return False
            model = onnx.load(path)
            initializers = {init.name for init in model.graph.initializer}
            self.network.inputs = [Tensor(v.name, _shape(v)) for v in model.graph.input if v.name not in initializers]
            self.network.outputs = [Tensor(v.name, _shape(v)) for v in model.graph.output]
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> ParserError:
            return self.errors[i]

    class OptimizationProfile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, name: str, low, opt, high) -> None:
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))
            record("set_shape", name=name, min=tuple(low), opt=tuple(opt), max=tuple(high))

    class BuilderConfig:
        def __init__(self) -> None:
            self.flags, self.profiles, self.pool_limits = set(), [], {}
            self.calibration_profile = None
            self._calibrator = None

        def set_flag(self, flag: BuilderFlag) -> None:
            record("set_flag", flag=flag)
            self.flags.add(flag)

        def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
            record("set_memory_pool_limit", pool=pool, size=size)
            self.pool_limits[pool] = size

        def add_optimization_profile(self, profile: OptimizationProfile) -> int:
            record("add_optimization_profile", shapes=dict(profile.shapes))
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile: OptimizationProfile) -> bool:
            record("set_calibration_profile", shapes=dict(profile.shapes))
            self.calibration_profile = profile
            return True

        @property
        def int8_calibrator(self):
            return self._calibrator

        @int8_calibrator.setter
        def int8_calibrator(self, calibrator) -> None:
            record("set_int8_calibrator", calibrator=calibrator)
            self._calibrator = calibrator

    def _calibrate(network: Network, config: BuilderConfig) -> None:
        """What TensorRT does with a calibrator: use the cache if any, else pull batches and write a table."""
        calibrator = config.int8_calibrator
        if calibrator.read_calibration_cache() is not None:
            record("calibration_cache_used")
            return
        spec = network.inputs[0]
        shape = (config.calibration_profile.shapes[spec.name][1] if config.calibration_profile is not None
                 else (calibrator.get_batch_size(), *spec.shape[1:]))
        while True:
            pointers = calibrator.get_batch([spec.name])
            if pointers is None:
                break
            trt.calibration_batches.append(read_floats(pointers[0], shape))
        amax = max((float(np.abs(b).max()) for b in trt.calibration_batches), default=0.0)
        calibrator.write_calibration_cache(f"TRT-10900-EntropyCalibration2\n{spec.name}: {amax:.6g}\n".encode())

    class Builder:
        def __init__(self, logger: Logger) -> None:
            record("Builder", severity=logger.min_severity)

        def create_network(self, flags: int = 0) -> Network:
            record("create_network", flags=flags)
            return Network(flags)

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> OptimizationProfile:
            return OptimizationProfile()

        def build_serialized_network(self, network: Network, config: BuilderConfig):
            record("build_serialized_network", flags=set(config.flags), calibrator=config.int8_calibrator)
            if BuilderFlag.INT8 in config.flags and config.int8_calibrator is not None:
                _calibrate(network, config)
            if trt.fail_build:
                return None
            profile = {}
            for spec in network.inputs:
                if config.profiles and spec.name in config.profiles[0].shapes:
                    profile[spec.name] = [list(s) for s in config.profiles[0].shapes[spec.name]]
                else:
                    profile[spec.name] = [list(spec.shape)] * 3
            payload = {"inputs": [[t.name, list(t.shape)] for t in network.inputs],
                       "outputs": [[t.name, list(t.shape)] for t in network.outputs],
                       "profile": profile, "flags": sorted(f.name for f in config.flags)}
            return memoryview(MAGIC + json.dumps(payload).encode())

    class ExecutionContext:
        def __init__(self, engine: "Engine") -> None:
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name: str, shape) -> bool:
            record("set_input_shape", name=name, shape=tuple(shape))
            low, _, high = self.engine.profile[name]
            if not all(lo <= s <= hi for lo, s, hi in zip(low, shape, high)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            if name in self.shapes:
                return self.shapes[name]
            batch = next(iter(self.shapes.values()))[0]
            return (batch, *self.engine.shapes[name][1:])

        def set_tensor_address(self, name: str, address: int) -> bool:
            record("set_tensor_address", name=name)
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            record("execute_async_v3", stream=stream_handle)
            (name,) = self.engine.input_names
            x = read_floats(self.addresses[name], self.shapes[name])
            for out in self.engine.output_names:
                shape = self.get_tensor_shape(out)
                logits = x.reshape(shape[0], -1)[:, : shape[1]].astype(np.float32)
                ctypes.memmove(self.addresses[out], logits.ctypes.data, logits.nbytes)
            return True

    class Engine:
        def __init__(self, payload: dict) -> None:
            self.input_names = [name for name, _ in payload["inputs"]]
            self.output_names = [name for name, _ in payload["outputs"]]
            self.shapes = {name: tuple(shape) for name, shape in payload["inputs"] + payload["outputs"]}
            self.profile = {name: [tuple(s) for s in shapes] for name, shapes in payload["profile"].items()}
            self.flags = payload["flags"]

        @property
        def num_io_tensors(self) -> int:
            return len(self.shapes)

        def get_tensor_name(self, i: int) -> str:
            return (self.input_names + self.output_names)[i]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return TensorIOMode.INPUT if name in self.input_names else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return DataType.FLOAT

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.shapes[name]

        def get_tensor_profile_shape(self, name: str, profile_index: int):
            return self.profile[name]

        def create_execution_context(self) -> ExecutionContext:
            return ExecutionContext(self)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            record("Runtime")

        def deserialize_cuda_engine(self, data: bytes):
            record("deserialize_cuda_engine", size=len(data))
            if not bytes(data).startswith(MAGIC):
                return None
            return Engine(json.loads(bytes(data)[len(MAGIC):]))

    for cls in (Logger, IInt8EntropyCalibrator2, OnnxParser, Builder, Runtime):
        setattr(trt, cls.__name__, cls)
    return trt


def calls_named(trt: types.ModuleType, name: str) -> list[dict]:
    """The details of every recorded call called ``name``."""
    return [details for call, details in trt.calls if call == name]
