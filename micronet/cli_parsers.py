"""The ``micronet`` command's parsers: built from the workflows' option dataclasses, plus each command's help.

Long options accept both ``--dashed-form`` and the original's ``--underscore_form``.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from micronet.workflows import VERBS
from micronet.workflows.options import option_fields


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _spellings(flags: tuple[str, ...]) -> list[str]:
    """Each flag plus its underscore (or dash) twin: ``--batch-size`` and ``--batch_size``."""
    out: list[str] = []
    for name in flags:
        out.append(name)
        if name.startswith("--") and "-" in name[2:]:
            out.append("--" + name[2:].replace("-", "_"))
        elif name.startswith("--") and "_" in name[2:]:
            out.append("--" + name[2:].replace("_", "-"))
    return list(dict.fromkeys(out))


def add_options(parser: argparse.ArgumentParser, cls: type, *, suppress_defaults: bool = False) -> None:
    """An argument for every option of ``cls``; ``suppress_defaults``: leave options not given unset (to tell
    which ones argv gives)."""
    groups: dict[str, Any] = {}
    own = set(vars(cls).get("__annotations__", {}))  # the verb's own options first in --help, then the shared groups
    for f in sorted(option_fields(cls), key=lambda f: f.name not in own):
        read = dict(f.metadata["read"])
        exclusive = read.pop("exclusive", None)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if suppress_defaults:
            default = argparse.SUPPRESS
        if not f.metadata["flags"]:
            parser.add_argument(f.name, help=f.metadata["help"], **read)
            continue
        target = parser
        if exclusive is not None:
            if exclusive not in groups:
                groups[exclusive] = parser.add_mutually_exclusive_group(required=True)
            target = groups[exclusive]
        target.add_argument(*_spellings(f.metadata["flags"]), dest=f.name, default=default,
                            help=f.metadata["help"] or None, **read)


HELP: dict[str, dict[str, str]] = {
    "train": dict(help="train a model (FP32)", description="Train a registry model with the shared engine; writes "
                  "OUT/last (resumable), OUT/best and OUT/log.jsonl.", epilog="""examples:
  micronet train --model nin --cfg 64,48,32,64,64,64,128,128 --epochs 8 --out runs/nin_small
  micronet train --model resnet20 --data cifar10 --data-root ~/cifar-10-batches-py --epochs 200 --gpu_id 0
  micronet train --resume runs/nin_small                 # continue an interrupted run
  micronet train --model nin --cfg 64,48,32,64,64,64,128,128 --sr --s 1e-4 --out runs/nin_sparse   # network slimming
  micronet train --prune_refine runs/nin_pruned --epochs 4 --lr 0.01 --out runs/nin_finetune   # after micronet prune
  torchrun --nproc_per_node 2 -m micronet.cli train --cpu --model lenet --epochs 2
"""),
    "evaluate": dict(help="accuracy of a checkpoint or an ONNX file on a dataset split", epilog="""examples:
  micronet evaluate --checkpoint runs/nin_small
  micronet evaluate --checkpoint runs/nin_small/best --split val
  micronet evaluate --onnx nin_small.onnx --data fashion-mnist --threads 2   # in ONNX Runtime
"""),
    "benchmark": dict(help="latency of an ONNX file in ONNX Runtime (and its int8 coverage)",
                      description="Time ONNX Runtime (CPU, pinned threads) on random inputs of the file's own C,H,W: "
                                  "median and p90 ms per run call and images/s for every batch size and thread count, "
                                  "with the CPU, its vector extensions and the load. On a shared machine compare "
                                  "numbers from one call only, and rerun when 'other cores' is 0.25 or more.",
                      epilog="""examples:
  micronet benchmark --onnx nin_small.onnx
  micronet benchmark --onnx nin_small_int8.onnx --batch-sizes 1,64 --threads 1,2 --repeats 50 --coverage
"""),
    "export": dict(help="write a checkpoint as an ONNX file (FP32, or QDQ int8 for quantized models)",
                   description="Fold BatchNorm and write one ONNX file with a dynamic batch. A quantized checkpoint "
                               "becomes a QDQ graph with its exact int8 weights and activation scales; a float one "
                               "becomes FP32, or with --int8 is first quantized (IAO PTQ for the --target, calibrated on "
                               "its dataset). The file is then run in ONNX Runtime on test images and compared with "
                               "the PyTorch model.", epilog="""examples:
  micronet export --checkpoint runs/demo --out demo_fp32.onnx                       # float model: FP32 ONNX
  micronet export --checkpoint runs/demo_qat_w8a8 --out demo_int8.onnx              # quantized: QDQ int8 ONNX
  micronet export --checkpoint runs/demo --int8 --out demo_ptq_int8.onnx            # float model: int8 PTQ, then QDQ
  micronet export --checkpoint runs/demo --int8 --target vnni --out demo_vnni.onnx  # 8-bit weights for VNNI CPUs only
  micronet evaluate --onnx demo_int8.onnx && micronet benchmark --onnx demo_int8.onnx --coverage
"""),
    "prune": dict(help="remove channels from a trained float checkpoint",
                  description="Prune the least important channels (global threshold over BatchNorm |gamma| by "
                              "default, best after sparse training with `micronet train --sr`), print channels, "
                              "parameters and GFLOPs before and after and the test accuracy before and after "
                              "(no fine-tuning), and write OUT/best for `micronet train --prune_refine OUT`.",
                  epilog="""examples:
  micronet train --model nin --cfg 64,48,32,64,64,64,128,128 --sr --s 1e-4 --out runs/nin_sparse
  micronet prune --checkpoint runs/nin_sparse --percent 0.5 --out runs/nin_pruned
  micronet prune --checkpoint runs/nin_sparse --percent 0.5 --normal_regular 8 --out runs/nin_pruned8
  micronet train --prune_refine runs/nin_pruned --epochs 4 --lr 0.01 --out runs/nin_finetune
  micronet quantize iao --checkpoint runs/nin_finetune --ptq --out runs/nin_pruned_ptq
"""),
    "quantize": dict(help="quantize a trained checkpoint (PTQ, QAT or QAFT)",
                     description="Quantize a float checkpoint by calibration (--ptq) or quantization-aware training, "
                                 "or fine-tune a quantized checkpoint with frozen scales (--qaft).", epilog="""examples:
  micronet quantize iao --checkpoint runs/demo --ptq --ptq_batch 200 --percentile 0.9999 --out runs/demo_ptq
  micronet quantize iao --checkpoint runs/demo --bn_fuse --epochs 2 --lr 0.002 --out runs/demo_qat
  micronet quantize iao --checkpoint runs/demo --w_bits 4 --a_bits 4 --bn_fuse --epochs 3 --out runs/demo_w4a4
  micronet quantize iao --checkpoint runs/demo_ptq --qaft --epochs 1 --lr 1e-4 --out runs/demo_qaft
  micronet quantize dorefa --checkpoint runs/demo --w_bits 4 --a_bits 4 --pre_scale 0.33 --epochs 4 --lr 0.005 --out runs/demo_dorefa_w4a4
  micronet quantize wbwtab --checkpoint runs/demo --W 3 --A 2 --epochs 3 --lr 0.01 --out runs/demo_ternary
  micronet quantize wbwtab --checkpoint runs/demo --W 2 --A 2 --distill runs/demo --optimizer adam --lr 0.001 \\
      --weight-decay 0 --epochs 10 --out runs/demo_bnn
"""),
    "sensitivity": dict(help="rank layers by the accuracy their quantization costs; write a skip list",
                        description="Calibrate the scheme once (PTQ) on training images, then measure validation "
                                    "accuracy with each quantized conv/linear layer alone quantized and with all but it "
                                    "quantized. Writes OUT/sensitivity.json and OUT/skip.txt (layers to keep in float; "
                                    "default: every layer whose drop alone exceeds 0.2 pt, 4 of 2000 images) for "
                                    "`micronet quantize --skip`.", epilog="""examples:
  micronet sensitivity iao --checkpoint runs/demo --w_bits 4 --a_bits 4 --out runs/demo_sens_w4a4
  micronet quantize iao --checkpoint runs/demo --w_bits 4 --a_bits 4 --ptq --skip runs/demo_sens_w4a4/skip.txt --out runs/demo_w4a4
  micronet sensitivity dorefa --checkpoint runs/demo --w_bits 2 --a_bits 4 --top 2 --out runs/demo_sens_dorefa
"""),
    "info": dict(help="parameters, MACs, GFLOPs and size of a model or checkpoint", epilog="""examples:
  micronet info --checkpoint runs/nin_small
  micronet info --model resnet20 --input-shape 3,32,32
  micronet info --list
"""),
    "fuse": dict(help="fold BatchNorm into the convolutions of a trained checkpoint",
                 description="Fold every BatchNorm that follows a conv (standard fold; sign fold in front of sign "
                             "activations; QAT BN-folding convs become plain quantized convs), print what was folded "
                             "how and the test accuracy before and after, and write the fused checkpoint."),
    "pack": dict(help="write a quantized checkpoint as a packed low-bit artifact",
                 description="Store every quantized weight as its integer codes (1-8 bits packed densely, 9-16 bits "
                             "as two bytes) plus scale and zero point; print measured bytes per layer."),
}
FUSE_EXAMPLES = """examples:
  micronet fuse --checkpoint runs/demo_qat_w8a8 --out runs/demo_qat_w8a8_fused
  micronet fuse --checkpoint runs/demo --out runs/demo_fused --test_subset 2000
  micronet pack --checkpoint runs/demo_qat_w8a8_fused --out runs/demo_w8a8_packed
  micronet info --checkpoint runs/demo_w8a8_packed      # measured bytes per quantized layer
"""
HELP["fuse"]["epilog"] = HELP["pack"]["epilog"] = FUSE_EXAMPLES
PIPELINE_EXAMPLES = """examples:
  micronet pipeline --config configs/default.yaml            # FP32 → prune → quantize → ONNX → report
  micronet pipeline --config configs/smoke.yaml --out runs/smoke
  micronet report runs/default                                # re-render report.md and the plots
"""


def _pipeline_parsers(sub: Any) -> None:
    p = sub.add_parser("pipeline", help="run a YAML pipeline of steps (train, prune, quantize, ...) and write its report",
                       epilog=PIPELINE_EXAMPLES, formatter_class=_Formatter,
                       description="Run every step of a pipeline config once: a step whose options and inputs did not "
                                   "change is not re-run, an interrupted one resumes. Then measure each table row "
                                   "(size, GFLOPs, PyTorch and ONNX Runtime accuracy, ONNX Runtime latency) and write "
                                   "OUT/report.md, OUT/report.json and PNG plots.")
    p.add_argument("--config", required=True, help="pipeline YAML (see configs/)")
    p.add_argument("--out", default=None, help="output folder (default: the config's `out`, else runs/<name>)")
    p = sub.add_parser("report", help="re-render report.md and the plots of a pipeline's output folder",
                       epilog=PIPELINE_EXAMPLES, formatter_class=_Formatter,
                       description="Read DIR/report.json (and DIR/sensitivity.json) and write DIR/report.md and the PNG "
                                   "plots again; prints the consistency checks.")
    p.add_argument("directory", help="a pipeline output folder")


def build_parser(*, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The ``micronet`` parser: one sub-command per workflow, plus ``pipeline`` and ``report``."""
    import micronet

    parser = argparse.ArgumentParser(prog="micronet", description="Compress neural networks and deploy them.",
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"micronet {micronet.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb, (cls, _) in VERBS.items():
        p = sub.add_parser(verb, formatter_class=_Formatter, **HELP[verb])
        add_options(p, cls, suppress_defaults=suppress_defaults)
    _pipeline_parsers(sub)
    return parser
