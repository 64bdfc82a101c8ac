"""The public integer model: compile, run, export and load its parameters."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from micronet.deploy.integer.compiler import _Compiler, _jsonable
from micronet.deploy.integer.fixed_point import FORMAT, FORMAT_VERSION, PARAMETERS_FILE, PROGRAM_JSON
from micronet.deploy.integer.steps import STEP_TYPES, Env, Step
from micronet.deploy.onnx.graph import load_model
from micronet.errors import DeployError, MicronetError
from micronet.outputs import OutputKind, described_as

PROGRAM_OUTPUT = OutputKind("integer program", described_as(PROGRAM_JSON, FORMAT),
                            frozenset({PROGRAM_JSON, PARAMETERS_FILE}))


# ------------------------------------------------------------------------------------------ public model
class IntegerModel:
    """An integer-only program compiled from a QDQ ONNX model (see the module docstring).

    ``model(x)`` returns the first graph output as float32; :meth:`run` returns all of them;
    :meth:`run_codes` returns the integer tensors (codes of every QuantizeLinear output, and the integer
    tensor behind each graph output, listed in :attr:`output_sources`).
    """

    def __init__(self, steps: list[Step], constants: dict[str, np.ndarray], inputs: list[str], outputs: list[str],
                 output_sources: dict[str, str], quantized: dict[str, str], rounding: str) -> None:
        self.steps = steps
        self.constants = constants
        self.inputs = inputs
        self.outputs = outputs
        self.output_sources = output_sources
        self.quantized = quantized  # QuantizeLinear output → env name holding its codes
        self.rounding = rounding

    @classmethod
    def from_onnx(cls, path_or_model: str | os.PathLike | onnx.ModelProto, rounding: str = "single") -> IntegerModel:
        """Compile a QDQ ONNX file or ModelProto; raises :class:`DeployError` for what has no integer mapping."""
        if isinstance(path_or_model, onnx.ModelProto):
            model, source = path_or_model, "the ONNX model"
        else:
            model, source = load_model(path_or_model), str(path_or_model)
        compiler = _Compiler(model, rounding)
        steps, sources = compiler.compile(source)
        quantized = {name: compiler.aliases.get(name, name) for name in compiler.quantized}
        inputs = [i.name for i in model.graph.input if i.name in compiler.view.graph_inputs]
        outputs = [o.name for o in model.graph.output]
        return cls(steps, compiler.constants, inputs, outputs, sources, quantized, rounding)

    @property
    def last_codes(self) -> str:
        """The integer tensor the first graph output dequantizes (codes, or an int32 accumulator)."""
        return self.output_sources[self.outputs[0]]

    def _feeds(self, x: np.ndarray | Mapping[str, np.ndarray]) -> Env:
        if isinstance(x, Mapping):
            missing = [name for name in self.inputs if name not in x]
            if missing:
                raise DeployError(f"missing model inputs {missing}: pass a dict with {self.inputs}")
            return {name: np.asarray(x[name]) for name in self.inputs}
        if len(self.inputs) != 1:
            raise DeployError(f"the model has inputs {self.inputs}: pass a dict of arrays")
        return {self.inputs[0]: np.asarray(x)}

    def _execute(self, x, substitute: Mapping[str, np.ndarray] | None = None) -> tuple[Env, Env]:
        """Run the steps; with ``substitute``, replace each listed quantized tensor by the given codes right
        after computing it (our own result goes to the second dict)."""
        env: Env = dict(self.constants)
        env.update(self._feeds(x))
        replace = {self.quantized.get(name, name): codes for name, codes in (substitute or {}).items()}
        own: Env = {}
        for step in self.steps:
            step.run(env)
            if step.output in replace:
                own[step.output] = env[step.output]
                env[step.output] = np.asarray(replace[step.output]).astype(env[step.output].dtype)
        return env, own

    def run(self, x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """All graph outputs (float32, or integer codes for an integer graph output)."""
        env, _ = self._execute(x)
        return {name: env[name] if name in env else env[self.quantized[name]] for name in self.outputs}

    def __call__(self, x: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        return self.run(x)[self.outputs[0]]

    def run_codes(self, x: np.ndarray | Mapping[str, np.ndarray],
                  substitute: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Integer tensors by ONNX name: every QuantizeLinear output and each output's source tensor.

        ``substitute`` (QuantizeLinear output name → codes, e.g. another runtime's) evaluates every layer on
        the given input codes instead of our own, so a comparison isolates each layer's arithmetic from
        differences that earlier layers propagate.
        """
        env, own = self._execute(x, substitute)
        env.update(own)
        codes = {name: env[held] for name, held in self.quantized.items()}
        codes.update({source: env[self.quantized.get(source, source)] for source in self.output_sources.values()})
        return codes

    # ---------------------------------------------------------------- parameters
    def export_parameters(self, directory: str | os.PathLike) -> Path:
        """Write ``program.json`` (layer order, ops, attributes, tensor names, reference scales) and
        ``parameters.safetensors`` (int8 weights, int32 biases, int32 M0 and shifts, zero points) into
        ``directory``, atomically (a reader sees the old directory or the complete new one)."""
        from safetensors.numpy import save_file

        from micronet.io import atomic_directory

        tensors: dict[str, np.ndarray] = {f"constants.{name}": value for name, value in self.constants.items()}
        layers = []
        for index, step in enumerate(self.steps):
            record: dict[str, Any] = {"index": index, "op": step.op, "attributes": {}, "tensors": {}}
            for f in dataclasses.fields(step):
                if not f.init:
                    continue
                value = getattr(step, f.name)
                if isinstance(value, np.ndarray):
                    key = f"layers.{index}.{f.name}"
                    tensors[key] = np.ascontiguousarray(value)
                    record["tensors"][f.name] = key
                else:
                    record["attributes"][f.name] = _jsonable(value)
            layers.append(record)
        description = {"format": FORMAT, "format_version": FORMAT_VERSION, "rounding": self.rounding,
                       "inputs": self.inputs, "outputs": self.outputs, "output_sources": self.output_sources,
                       "quantized": self.quantized, "constants": sorted(self.constants), "layers": layers}
        with atomic_directory(directory, PROGRAM_OUTPUT) as staging:
            save_file(tensors, str(staging / PARAMETERS_FILE))
            (staging / PROGRAM_JSON).write_text(json.dumps(description, indent=1, allow_nan=False), encoding="utf-8")
        return Path(directory)

    @classmethod
    def load_parameters(cls, directory: str | os.PathLike) -> IntegerModel:
        """Rebuild the program written by :meth:`export_parameters` (no ONNX needed)."""
        from safetensors.numpy import load_file

        from micronet.io import read_description, resolve_directory

        directory = resolve_directory(directory)
        meta_path, tensor_path = directory / PROGRAM_JSON, directory / PARAMETERS_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise DeployError(f"{directory} holds no integer program ({PROGRAM_JSON} and {PARAMETERS_FILE}): "
                              "write one with IntegerModel.export_parameters")
        try:
            meta = read_description(meta_path, fmt=FORMAT, version=FORMAT_VERSION, what="integer program")
            tensors = load_file(str(tensor_path))
            steps = []
            for record in meta["layers"]:
                arrays = {name: tensors[key] for name, key in record["tensors"].items()}
                attributes = {name: value for name, value in record["attributes"].items() if value is not None}
                steps.append(STEP_TYPES[record["op"]](**attributes, **arrays))
            constants = {name: tensors[f"constants.{name}"] for name in meta["constants"]}
            return cls(steps, constants, meta["inputs"], meta["outputs"], meta["output_sources"], meta["quantized"],
                       meta["rounding"])
        except MicronetError as error:
            raise DeployError(str(error)) from None
        except (KeyError, TypeError, ValueError) as error:
            raise DeployError(f"{directory}: the integer program is damaged ({type(error).__name__}: {error}): "
                              "export it again") from None
