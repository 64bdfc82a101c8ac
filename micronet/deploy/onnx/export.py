"""``export(model, path, example_input)``: a float model → FP32 ONNX; a micronet-quantized model → QDQ ONNX.

Both torch exporters work: ``exporter="dynamo"`` (torch's default, ``torch.export`` based; about 3 s for a
small CNN) and ``exporter="legacy"`` (TorchScript; fast, but deprecated by torch). They see the same
export form (:mod:`.export_form`) and micronet's own Q/DQ ops (:mod:`.qdq_ops`), so they write the same
operators. The file gets a dynamic batch dimension by default, input ``input`` and output ``output``,
BatchNorm folded, no unused initializers, and is written atomically (a reader never sees half a file).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from micronet.deploy.onnx import qdq_ops
from micronet.deploy.onnx.export_form import ExportFormReport, export_form
from micronet.deploy.onnx.graph import GraphView
from micronet.deploy.targets import DEFAULT_TARGET, get_target
from micronet.errors import DeployError
from micronet.io import atomic_write
from micronet.outputs import OutputKind

EXPORTERS = ("dynamo", "legacy")
PRODUCER = "micronet"


def _is_micronet_onnx(path: Path) -> bool:
    try:
        return onnx.load(str(path), load_external_data=False).producer_name == PRODUCER
    except Exception:  # noqa: BLE001 - any file onnx cannot parse is not ours
        return False


ONNX_OUTPUT = OutputKind("ONNX file", _is_micronet_onnx, directory=False)
INPUT_NAME, OUTPUT_NAME = "input", "output"
TARGET_KEY = "micronet.target"


def model_target(model: nn.Module) -> str:
    """The target a quantized model was prepared for (``portable`` for a float model or an older scheme)."""
    scheme = getattr(model, "quant_scheme", None)
    return getattr(scheme, "target", None) or DEFAULT_TARGET


@dataclass
class ExportReport:
    """What was written: the file, the exporter and opset, the op counts and each weighted layer's form."""

    path: Path
    exporter: str
    opset: int
    dynamic_batch: bool
    form: ExportFormReport
    op_counts: dict[str, int] = field(default_factory=dict)
    file_bytes: int = 0

    @property
    def quantized(self) -> bool:
        return self.form.quantized

    def summary(self) -> str:
        weights = sorted({layer.weight.split()[0] for layer in self.form.layers if layer.weight != "float"})
        kind = (f"QDQ ({self.form.activation_dtype} activations, {'/'.join(weights) or 'float'} weights, "
                f"target {self.form.target})"
                if self.quantized else "FP32")
        ops = ", ".join(f"{op}×{n}" for op, n in sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
        batch = "dynamic batch" if self.dynamic_batch else "fixed batch"
        return (f"{self.path}: {kind} ONNX, opset {self.opset}, {self.exporter} exporter, {batch}, "
                f"{self.file_bytes / 1e6:.3f} MB, {self.form.bn_folded} BatchNorms folded\n  ops: {ops}")


def _check_destination(path: Path) -> None:
    if not path.parent.is_dir():
        raise DeployError(f"{path}: the folder {path.parent} does not exist: create it or choose another --out")
    if path.is_dir():
        raise DeployError(f"{path} is a folder: give a file name such as {path / 'model.onnx'}")


def _unsupported_operator(error: Exception) -> str | None:
    text = str(error)
    for marker in ("Unsupported", "unsupported", "not supported", "No decompositions registered", "is not supported"):
        if marker in text:
            return text.strip().splitlines()[0][:300]
    return None


def _export_legacy(form: nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    qdq_ops.register_legacy_symbolics()
    buffer = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice of the TorchScript exporter
        torch.onnx.export(form, (example,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(form: nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed" lines: harmless, and not ours
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(form, (example,), dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                                        custom_translation_table=qdq_ops.dynamo_translation_table(), verbose=False)
    finally:
        registration.setLevel(level)
    model = program.model_proto
    _rename_value(model, model.graph.input[0].name, INPUT_NAME)
    _rename_value(model, model.graph.output[0].name, OUTPUT_NAME)
    return model


def _rename_value(model: onnx.ModelProto, old: str, new: str) -> None:
    if old == new:
        return
    graph = model.graph
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def _inline_constant_identities(model: onnx.ModelProto) -> None:
    """The legacy exporter shares equal constants through Identity nodes; ONNX Runtime's Q/DQ fusions want
    scales and zero points to be initializers, so consumers read the initializer directly."""
    initializers = {init.name for init in model.graph.initializer}
    outputs = {out.name for out in model.graph.output}
    alias = {node.output[0]: node.input[0] for node in model.graph.node
             if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs}
    if not alias:
        return
    keep = [node for node in model.graph.node if not (node.op_type == "Identity" and node.output[0] in alias)]
    for node in keep:
        node.input[:] = [alias.get(name, name) for name in node.input]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _merge_equal_quantizers(model: onnx.ModelProto) -> int:
    """QuantizeLinear / DequantizeLinear nodes that read the same tensor with equal scales, zero points and
    attributes become one node; returns how many were removed.

    A ReLU'd residual output is read by the next conv's quantizer and the next add's, which observe the same
    tensor and so hold equal parameters. Quantized once, the ReLU has a single Q reader, which ONNX Runtime
    needs to fuse the conv or add that produces it with its ReLU and Q. Values do not change."""
    view = GraphView(model)
    kept_output: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:  # topological order: a node's inputs are renamed before it is keyed
        node.input[:] = [rename.get(name, name) for name in node.input]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.output[0] not in view.graph_outputs:
            constants = [view.constant(name) for name in node.input[1:]]
            if all(c is not None for c in constants):
                key = (node.op_type, node.input[0], tuple((c.dtype.str, c.shape, c.tobytes()) for c in constants),
                       tuple(a.SerializeToString() for a in sorted(node.attribute, key=lambda a: a.name)))
                if key in kept_output:
                    rename[node.output[0]] = kept_output[key]
                    continue
                kept_output[key] = node.output[0]
        nodes.append(node)
    if not rename:
        return 0
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept_values = [v for v in model.graph.value_info if v.name not in rename]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept_values)
    return len(rename)


def _one_add_per_quantizer(model: onnx.ModelProto) -> int:
    """``Add → [Relu] → {QuantizeLinear ×k}`` becomes k copies of ``Add → [Relu] → QuantizeLinear``.

    A residual block's output is read by two consumers that quantize it differently (the next conv and the
    next residual add). As one float Add+ReLU feeding two Q nodes, ONNX Runtime runs it in float; duplicated,
    each copy is the ``DQ, DQ → Add → Q`` pattern it runs as QLinearAdd (the ReLU is absorbed by a Q whose
    zero point is its minimum). Values do not change: each copy computes exactly what the original did."""
    view = GraphView(model)
    outputs = {out.name for out in model.graph.output}
    replacements: dict[int, list[onnx.NodeProto]] = {}
    for index, add in enumerate(model.graph.node):
        if add.op_type != "Add" or add.output[0] in outputs:
            continue
        readers = view.consumers.get(add.output[0], [])
        relu = readers[0] if len(readers) == 1 and readers[0].op_type == "Relu" else None
        last = relu.output[0] if relu is not None else add.output[0]
        quantizers = view.consumers.get(last, [])
        if len(quantizers) < 2 or last in outputs or any(q.op_type != "QuantizeLinear" for q in quantizers):
            continue
        copies: list[onnx.NodeProto] = []
        for k, quantize in enumerate(quantizers):
            add_out = f"{add.output[0]}__q{k}"
            copies.append(onnx.helper.make_node("Add", list(add.input), [add_out], name=f"{add.name}__q{k}"))
            source = add_out
            if relu is not None:
                source = f"{relu.output[0]}__q{k}"
                copies.append(onnx.helper.make_node("Relu", [add_out], [source], name=f"{relu.name}__q{k}"))
            quantize.input[0] = source
        replacements[index] = copies
        if relu is not None:
            replacements[list(model.graph.node).index(relu)] = []
    if not replacements:
        return 0
    nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(model.graph.node):
        nodes.extend(replacements.get(index, [node]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return sum(1 for copies in replacements.values() if copies)


def _strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop per-node stack traces (the dynamo exporter's metadata doubles a small model's file)."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input} | {out.name for out in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    inputs = [value for value in model.graph.input if value.name in used or value.name == INPUT_NAME]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def _check_arguments(path: Path, exporter: str, opset: int, example_input: object) -> None:
    _check_destination(path)
    if exporter not in EXPORTERS:
        raise DeployError(f"unknown exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if not 13 <= opset <= 20:
        raise DeployError(f"opset {opset} is not supported: per-channel QuantizeLinear needs ≥ 13 and the legacy exporter stops at 20")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise DeployError("example_input must be a batch tensor shaped like the model input, e.g. torch.zeros(1, 1, 28, 28)")


def _trace(form: nn.Module, example: torch.Tensor, exporter: str, opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    """The exporter's graph of ``form``; its failures as one-line :class:`DeployError` naming the fix."""
    try:
        build = _export_dynamo if exporter == "dynamo" else _export_legacy
        return build(form, example, opset, dynamic_batch)
    except DeployError:
        raise
    except Exception as error:
        unsupported = _unsupported_operator(error)
        if unsupported:
            raise DeployError(f"a layer of the model has no ONNX mapping ({unsupported}): replace it or keep it "
                              "out of the exported model") from None
        if dynamic_batch and ("Constraint" in str(error) or "specializ" in str(error)):
            raise DeployError("the model fixes its batch size (e.g. reshapes with a constant batch): export with "
                              "dynamic_batch=False (--static-batch) or reshape with x.flatten(1)") from None
        raise DeployError(f"the {exporter} exporter failed: {type(error).__name__}: {str(error).strip()[:400]} "
                          f"(try exporter={'legacy' if exporter == 'dynamo' else 'dynamo'!r})") from None


def export(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor,
    *,
    exporter: str = "dynamo",
    opset: int = qdq_ops.OPSET,
    dynamic_batch: bool = True,
    activation_dtype: str | None = None,
    weight_dtype: str = "auto",
    target: str | None = None,
    metadata: dict[str, str] | None = None,
) -> ExportReport:
    """Write ``model`` as one ONNX file and return an :class:`ExportReport`.

    ``example_input``: a batch shaped like the model's input (its batch size does not matter with a
    dynamic batch). ``target`` (:mod:`micronet.deploy.targets`): ``portable``, ``vnni`` or ``tensorrt``;
    None takes the one the model was quantized for (``portable`` for older or float models). It decides
    the defaults of the two dtypes and is stored in the file as ``micronet.target``; the exporting CPU
    never matters. ``activation_dtype``: "uint8" (ONNX Runtime's fast u8s8 path; signed codes are shifted
    by 128, same values) or "int8" (signed, zero point 0, as TensorRT requires; the model must have been
    prepared with signed activations); None: the target's. ``weight_dtype``: "int8" (zero point 0) or
    "uint8" (zero point 128, the same values, ONNX Runtime's u8u8 kernels); "auto" (default): int8 where
    the target's kernels sum the layer's codes exactly (±63 for ``portable``: no int16 saturation on CPUs
    without VNNI), else uint8 (always int8 with int8 activations: that combination is for TensorRT).
    ``metadata``: strings stored in the file's ``metadata_props`` (the CLI records the dataset there).
    Errors a user can fix raise :class:`DeployError`.
    """
    path = Path(path)
    _check_arguments(path, exporter, opset, example_input)
    target = model_target(model) if target is None else target
    activation_dtype = activation_dtype or get_target(target).activation_dtype
    form, form_report = export_form(model, activation_dtype, weight_dtype, target)
    example = example_input.detach().float().cpu()
    try:
        with torch.no_grad():
            form(example)
    except DeployError:
        raise
    except Exception as error:  # the model does not run on this input: say so before exporting
        raise DeployError(f"the model does not run on an input of shape {tuple(example.shape)}: {error}") from None
    proto = _trace(form, example, exporter, opset, dynamic_batch)
    _inline_constant_identities(proto)
    _merge_equal_quantizers(proto)
    if activation_dtype == "uint8":  # an ONNX Runtime layout: TensorRT fuses conv + add itself
        _one_add_per_quantizer(proto)
    _strip_debug_info(proto)
    _drop_unused_initializers(proto)
    proto.producer_name = PRODUCER
    if form_report.quantized:
        proto.metadata_props.add(key=TARGET_KEY, value=target)
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=str(key), value=str(value))
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as error:
        raise DeployError(f"the exported graph is invalid ({str(error).splitlines()[0]}): please report this model") from None
    data = proto.SerializeToString()
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    counts = dict(GraphView(proto).op_counts())
    return ExportReport(path, exporter, opset, dynamic_batch, form_report, counts, len(data))
