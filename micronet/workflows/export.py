"""export: write a checkpoint as one ONNX file (FP32, or QDQ int8 for a quantized one; ``int8`` quantizes a float
one first with the quantize workflow's PTQ), then check it in ONNX Runtime against the PyTorch model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from micronet.errors import ConfigError
from micronet.workflows.common import Log, check_data_fits, claim, dataset_name, load_data, say
from micronet.workflows.options import DataFromCheckpoint, Overwrite, option
from micronet.workflows.source import UserModelOptions, open_source

TARGETS = ["portable", "vnni", "tensorrt"]


# bases in reverse: a dataclass lists the fields of its last base first
@dataclass(kw_only=True)
class ExportOptions(DataFromCheckpoint, UserModelOptions, Overwrite):
    checkpoint: str | None = option(None, "--checkpoint", help="checkpoint or run directory")
    out: str = option("", "--out", required=True, help="ONNX file to write")
    format: str = option("onnx", "--format", choices=["onnx"], help="artifact format (packed low-bit: micronet pack)")
    int8: bool = option(False, "--int8", action="store_true",
                        help="float checkpoint: quantize (IAO PTQ, 8-bit activations, weights per --target) before "
                             "exporting")
    calib_batches: int = option(16, "--calib-batches", type=int,
                                help="--int8: calibration batches of --batch-size training images")
    exporter: str = option("dynamo", "--exporter", choices=["dynamo", "legacy"],
                           help="torch exporter (both write the same ops)")
    opset: int = option(18, "--opset", type=int, help="ONNX opset (13-20)")
    static_batch: bool = option(False, "--static-batch", action="store_true",
                                help="fix the batch dimension to 1 instead of a dynamic one")
    target: str | None = option(None, "--target", choices=TARGETS,
                                help="integer layout (default: the one the checkpoint was quantized for; portable for "
                                     "--int8): portable = int8 weights within ±63 (uint8 beyond), exact on every x86 "
                                     "CPU; vnni = int8 weights (exact on VNNI/AMX CPUs); tensorrt = int8 activations "
                                     "and weights")
    activation_dtype: str | None = option(None, "--activation-dtype", choices=["uint8", "int8"],
                                          help="override the target's: uint8 = ONNX Runtime's fast path (signed codes "
                                               "shifted by 128); int8 = zero point 0 (TensorRT)")
    weight_dtype: str = option("auto", "--weight-dtype", choices=["auto", "int8", "uint8"],
                               help="override the target's: int8 (zero point 0) or uint8 (zero point 128, u8u8 "
                                    "kernels); auto = int8 where the target's kernels sum the codes exactly, else uint8")
    batch_size: int = option(64, "--batch-size", type=int, help="calibration and check batch size")
    check_images: int = option(256, "--check-images", type=int, help="test images for the ONNX Runtime check (0: skip)")


@dataclass
class ExportResult:
    """The ONNX file, whether it is quantized, and the ONNX Runtime check (None when skipped)."""

    path: Path
    quantized: bool
    max_difference: float | None = None
    top1_agreement: float | None = None


def export(options: ExportOptions, *, log: Log = say) -> ExportResult:
    """Export ``options.checkpoint`` to ``options.out`` and check the file in ONNX Runtime."""
    import torch

    from micronet.analysis import format_table
    from micronet.compression.quantization.core.workflow import is_prepared
    from micronet.deploy.onnx import export as export_onnx
    from micronet.deploy.onnx.export import ONNX_OUTPUT
    from micronet.engine.numerics import require_finite_weights

    claim(options.out, ONNX_OUTPUT, options.overwrite)
    checkpoint = open_source(options)
    model = checkpoint.build_model().cpu().eval()
    require_finite_weights(model, str(checkpoint.path))
    name = dataset_name(options, checkpoint)
    needs_data = options.int8 and not is_prepared(model) or options.check_images > 0
    if needs_data and name is None:
        raise ConfigError(f"{checkpoint.path} does not record its dataset: pass --data")
    splits = load_data(options, name) if needs_data else None
    arch = checkpoint.arch
    shape = (arch.in_channels, *splits.info.image_size) if splits else (arch.in_channels, 28, 28)
    if splits is not None:
        check_data_fits(checkpoint, splits.info)
    if options.int8 and not is_prepared(model):
        model = _int8(options, model, splits, log)
    report = export_onnx(model, options.out, torch.zeros(1, *shape), exporter=options.exporter, opset=options.opset,
                         dynamic_batch=not options.static_batch, activation_dtype=options.activation_dtype,
                         weight_dtype=options.weight_dtype, target=options.target,
                         metadata={"micronet.dataset": name or "", "micronet.model": arch.name})
    log(report.summary())
    if report.quantized:
        log(format_table(report.form.rows()))
    result = ExportResult(Path(report.path), bool(report.quantized))
    if options.check_images > 0:
        result.max_difference, result.top1_agreement = _check_in_onnxruntime(options, model, report.path, splits,
                                                                             checkpoint.path, log)
    return result


def _int8(options: ExportOptions, model: Any, splits: Any, log: Log) -> Any:
    """IAO PTQ for the export's target: the quantize workflow's, with 8-bit activations."""
    from micronet.workflows.quantize import QuantizeOptions, ptq_model

    ptq = QuantizeOptions(method="iao", ptq=True, a_bits=8, target=options.target or "portable",
                          ptq_batch=options.calib_batches, batch_size=options.batch_size, seed=0)
    model = ptq_model(ptq, model, splits, "cpu", log=lambda _: None).eval()
    log(f"quantized with IAO PTQ, {model.quant_scheme.name} ({model.calibrated_batches} calibration batches of "
        f"{options.batch_size})")
    return model


def _check_in_onnxruntime(options: ExportOptions, model: Any, path: str, splits: Any, source: Path,
                          log: Log) -> tuple[float, float]:
    """(max |difference|, top-1 agreement) of the ONNX file in ONNX Runtime against ``model`` on test images."""
    import numpy as np
    import torch

    from micronet.data import BatchLoader
    from micronet.deploy.onnxruntime import build_session, run, top1_agreement
    from micronet.engine.numerics import require_finite

    images = torch.cat([x for x, _ in BatchLoader(splits.test, 256)])[: options.check_images]
    with torch.no_grad():
        reference = torch.cat([model(part) for part in images.split(options.batch_size)]).numpy()
    session = build_session(path)
    got = np.concatenate([run(session, part.numpy())
                          for part in images.split(1 if options.static_batch else options.batch_size)])
    require_finite(reference, f"{source} in PyTorch")
    require_finite(got, f"{path} in ONNX Runtime")
    step = float(np.abs(reference).max()) / 127
    agree = top1_agreement(got, reference)
    difference = float(np.abs(got - reference).max())
    log(f"ONNX Runtime check on {len(images)} test images: max |difference| {difference:.3g} "
        f"({difference / step:.2f} output steps of max|y|/127), top-1 agreement {agree * 100:.2f}%")
    return difference, agree
