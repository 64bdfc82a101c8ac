"""The ``micronet`` command.

Each sub-command only composes library functions (data, models, engine, analysis); errors a user can
fix print one line and exit with status 2. Long options accept both ``--dashed-form`` and the
original's ``--underscore_form``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _add(parser: argparse.ArgumentParser | Any, *names: str, **kwargs: Any) -> None:
    """Add an option under its dashed name plus the underscore spelling (``--batch-size``/``--batch_size``)."""
    spellings: list[str] = []
    for name in names:
        spellings.append(name)
        if name.startswith("--") and "-" in name[2:]:
            spellings.append("--" + name[2:].replace("-", "_"))
        elif name.startswith("--") and "_" in name[2:]:
            spellings.append("--" + name[2:].replace("_", "-"))
    parser.add_argument(*dict.fromkeys(spellings), **kwargs)


def _cfg_list(values: list[str] | None) -> list[int] | None:
    if not values:
        return None
    from micronet.errors import ConfigError

    try:
        return [int(part) for value in values for part in value.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--cfg takes channel counts such as 64,48,32 (got {' '.join(values)})") from None


def _add_data_options(p: argparse.ArgumentParser, default: str | None = "fashion-mnist") -> None:
    _add(p, "--data", default=default, help="dataset: fashion-mnist, cifar10, imagefolder, synthetic")
    _add(p, "--data-root", default=None, help="dataset folder (cifar10: the extracted cifar-10-batches-py)")
    _add(p, "--val-fraction", type=float, default=0.1, help="share of the training set held out for model selection")
    _add(p, "--train-subset", type=int, default=None, help="use only this many training images (smoke runs)")
    _add(p, "--test-subset", type=int, default=None, help="use only this many test images")
    _add(p, "--data-seed", type=int, default=0, help="seed of the train/val split and subsets")


def _add_overwrite_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} micronet wrote at the output path (never a folder or file it did not write)")


def _claim(path: str | os.PathLike, kind, args: argparse.Namespace, flag: str = "--out"):
    """Claim the output path before any work (see micronet.outputs): one-line error if it may not be written."""
    from micronet.outputs import claim_output

    return claim_output(path, kind, overwrite=getattr(args, "overwrite", False), flag=flag)


def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
    _add(p, "--gpu-id", default=None, help="GPUs to use, e.g. 0 or 0,1 (several GPUs start one DDP process each)")


TRAIN_EXAMPLES = """examples:
  micronet train --model nin --cfg 64,48,32,64,64,64,128,128 --epochs 8 --out runs/nin_small
  micronet train --model resnet20 --data cifar10 --data-root ~/cifar-10-batches-py --epochs 200 --gpu_id 0
  micronet train --resume runs/nin_small                 # continue an interrupted run
  micronet train --model nin --cfg 64,48,32,64,64,64,128,128 --sr --s 1e-4 --out runs/nin_sparse   # network slimming
  micronet train --prune_refine runs/nin_pruned --epochs 4 --lr 0.01 --out runs/nin_finetune   # after micronet prune
  torchrun --nproc_per_node 2 -m micronet.cli train --cpu --model lenet --epochs 2
"""


def _add_training_options(p: argparse.ArgumentParser, *, epochs: int = 10, lr: float = 0.05, optimizer: str = "sgd",
                          weight_decay: float = 5e-4) -> None:
    p.add_argument("--epochs", type=int, default=None, help=f"number of epochs (default {epochs})")
    p.set_defaults(default_epochs=epochs)
    _add(p, "--batch-size", "--train-batch-size", dest="batch_size", type=int, default=128, help="training batch size")
    _add(p, "--eval-batch-size", type=int, default=512, help="evaluation batch size")
    p.add_argument("--optimizer", default=optimizer, choices=["sgd", "adam", "adamw"])
    p.add_argument("--lr", type=float, default=lr, help="base learning rate")
    p.add_argument("--momentum", type=float, default=0.9)
    _add(p, "--weight-decay", "--wd", dest="weight_decay", type=float, default=weight_decay)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step", "multistep", "constant"])
    p.add_argument("--milestones", type=int, nargs="*", default=[], help="epochs where multistep multiplies the lr by --gamma")
    _add(p, "--step-size", type=int, default=30, help="epochs between decays of the step schedule")
    p.add_argument("--gamma", type=float, default=0.1)
    _add(p, "--warmup-epochs", type=float, default=0.0)
    _add(p, "--label-smoothing", type=float, default=0.0)
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA (bf16, or fp16 with loss scaling)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    _add(p, "--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW memory layout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    p.add_argument("--resume", default=None, help="continue the run in this directory (its last/ checkpoint)")
    _add(p, "--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    _add_device_options(p)


def _add_distillation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distill", default=None, metavar="CHECKPOINT",
                   help="knowledge distillation: add the KL divergence to this trained (float) model's softened "
                        "outputs to the loss; helps binary and low-bit networks most")
    _add(p, "--distill-weight", type=float, default=1.0, help="--distill: weight of the distillation term")
    _add(p, "--distill-temperature", type=float, default=4.0, help="--distill: softmax temperature T")


def _saved_hook_states(last, kind: str) -> list[dict]:
    """The saved states of the hooks of ``kind`` that the resumed run ``last`` was trained with."""
    if last is None:
        return []
    return [state for state in (last.training or {}).get("hooks", []) if isinstance(state, dict) and state.get("kind") == kind]


def _distillation_hooks(args: argparse.Namespace, last, info) -> list:
    """The distillation hook of ``--distill``, or of the resumed run ``last`` that was started with it."""
    from micronet.engine.distillation import Distillation, load_teacher
    from micronet.errors import ConfigError

    if last is not None:
        saved = _saved_hook_states(last, "distillation")
        if args.distill and not saved:
            raise ConfigError(f"{args.resume} was not started with --distill: distillation cannot be added on resume")
        return [Distillation.from_state(state, info.num_classes, info.name) for state in saved]
    if not args.distill:
        return []
    teacher = load_teacher(args.distill, info.num_classes, info.name)
    return [Distillation(teacher, weight=args.distill_weight, temperature=args.distill_temperature, source=args.distill)]


def _train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model (FP32)", epilog=TRAIN_EXAMPLES, formatter_class=_Formatter,
                       description="Train a registry model with the shared engine; writes OUT/last (resumable), "
                                   "OUT/best and OUT/log.jsonl.")
    p.add_argument("--model", default=None, help="registry model name (micronet info --list shows them; default nin)")
    p.add_argument("--cfg", nargs="+", default=None, help="channel config (e.g. of a pruned model): 64,48,32 or 64 48 32")
    _add_data_options(p)
    _add_training_options(p)
    _add_distillation_options(p)
    p.add_argument("--out", default=None, help="run directory (default runs/<model>)")
    _add_overwrite_option(p, "a training run")
    _add(p, "--init", "--refine", dest="init", default=None, help="start from the weights of this checkpoint (fine-tuning)")
    p.add_argument("--sr", "-sr", action="store_true",
                   help="sparse training for network slimming: L1 penalty s*|gamma| on every BatchNorm scale")
    p.add_argument("--s", type=float, default=1e-4, help="sparsity strength for --sr (1e-4; with SGD the push is lr*s per step)")
    _add(p, "--sr-ramp", type=int, default=0, help="--sr: grow s linearly over this many first epochs (0: constant)")
    _add(p, "--sr-all-bn", action="store_true",
         help="--sr: penalise every BatchNorm, also those over channels pruning cannot remove (the logits BN; "
              "as the original did)")
    _add(p, "--prune-refine", default=None, metavar="DIR",
         help="fine-tune a pruned checkpoint (written by micronet prune): its architecture, channels and weights")
    _add(p, "--gc-prune-refine", nargs="+", default=None, metavar="C",
         help="train nin_gc with this (pruned) cfg from a fresh initialisation; same as --model nin_gc --cfg C ...")
    p.set_defaults(run=cmd_train)


QUANTIZE_EXAMPLES = """examples:
  micronet quantize iao --checkpoint runs/demo --ptq --ptq_batch 200 --percentile 0.9999 --out runs/demo_ptq
  micronet quantize iao --checkpoint runs/demo --bn_fuse --epochs 2 --lr 0.002 --out runs/demo_qat
  micronet quantize iao --checkpoint runs/demo --w_bits 4 --a_bits 4 --bn_fuse --epochs 3 --out runs/demo_w4a4
  micronet quantize iao --checkpoint runs/demo_ptq --qaft --epochs 1 --lr 1e-4 --out runs/demo_qaft
  micronet quantize dorefa --checkpoint runs/demo --w_bits 4 --a_bits 4 --pre_scale 0.33 --epochs 4 --lr 0.005 --out runs/demo_dorefa_w4a4
  micronet quantize wbwtab --checkpoint runs/demo --W 3 --A 2 --epochs 3 --lr 0.01 --out runs/demo_ternary
  micronet quantize wbwtab --checkpoint runs/demo --W 2 --A 2 --distill runs/demo --optimizer adam --lr 0.001 \
      --weight-decay 0 --epochs 10 --out runs/demo_bnn
"""


def _add_scheme_options(p: argparse.ArgumentParser) -> None:
    """The method and the flags that describe a quantization scheme (shared by quantize and sensitivity)."""
    p.add_argument("method", choices=["iao", "dorefa", "wbwtab"],
                   help="iao: integer-arithmetic-only affine quantization; dorefa: DoReFa k-bit; "
                        "wbwtab: binary/ternary weights and binary activations")
    _add(p, "--w-bits", type=int, default=None,
         help="weight bits (iao 2-16, default: the --target's, 7 for portable; dorefa 1-16, 32 = float, default 8)")
    _add(p, "--a-bits", type=int, default=8, help="activation bits (iao 2-16; dorefa 1-16, 32 = float)")
    p.add_argument("--W", type=int, default=None, help="wbwtab weights: 2 binary, 3 ternary, 32 float (default 2)")
    p.add_argument("--A", type=int, default=None, help="wbwtab activations: 2 binary (sign), 32 float (default 2)")
    _add(p, "--center-weights", action="store_true",
         help="wbwtab binary weights: subtract each filter's mean over its input channels before the sign "
              "(the original's W_clip; lowers accuracy)")
    _add(p, "--sign-gradient", default="hardtanh", choices=["hardtanh", "approx"],
         help="wbwtab --A 2: the sign activations' training gradient: hardtanh (pass where |x| < 1) or approx "
              "(Bi-Real Net's ApproxSign, max(0, 2 - 2|x|))")
    _add(p, "--pre-scale", type=float, default=1.0,
         help="dorefa: activations are clamp(x * pre_scale, 0, 1) on the k-bit grid (the original used 0.1)")
    _add(p, "--q-type", type=int, default=0, choices=[0, 1], help="0 symmetric, 1 asymmetric")
    _add(p, "--q-level", type=int, default=0, choices=[0, 1], help="0 per-channel weights, 1 per-layer")
    _add(p, "--weight-observer", type=int, default=0, choices=[0, 1], help="0 min/max of current weights, 1 moving average")
    _add(p, "--activation-observer", default=None, choices=["minmax", "moving_average", "percentile", "histogram"],
         help="override the activation observer (default: moving_average for QAT, percentile for --ptq)")
    _add(p, "--bn-fuse", action="store_true", help="fold BatchNorm into the preceding conv during QAT")
    _add(p, "--bn-fuse-calib", action="store_true", help="fold with running statistics while training")
    _add(p, "--lsq", action="store_true",
         help="iao QAT: learn the scales (LSQ); symmetric only; helps at 4 bits and below")
    p.add_argument("--target", default="portable", choices=["portable", "vnni", "tensorrt"],
                   help="where the int8 model will run: portable = 7-bit weights, exact and fast on every x86 CPU "
                        "(AVX2, AVX-512, VNNI); vnni = 8-bit weights, exact only on CPUs with VNNI/AMX; "
                        "tensorrt = 8-bit weights and signed activations")
    _add(p, "--signed-activations", action="store_true",
         help="iao: int8 activations with zero point 0 everywhere, also after ReLU (what TensorRT accepts)")
    _add(p, "--bn-fold-method", default=None, choices=["one_conv", "batch", "running"],
         help="how --bn_fuse trains: one_conv (default; one convolution, as torch.ao), batch (exact batch "
              "statistics from a second float convolution), running (= --bn_fuse_calib)")
    p.add_argument("--percentile", type=float, default=0.9999, help="percentile of the PTQ activation observer")


def _quantize_parser(sub: Any) -> None:
    p = sub.add_parser("quantize", help="quantize a trained checkpoint (PTQ, QAT or QAFT)", epilog=QUANTIZE_EXAMPLES,
                       formatter_class=_Formatter,
                       description="Quantize a float checkpoint by calibration (--ptq) or quantization-aware training, "
                                   "or fine-tune a quantized checkpoint with frozen scales (--qaft).")
    _add_scheme_options(p)
    p.add_argument("--checkpoint", required=False, help="trained checkpoint or run directory to start from")
    p.add_argument("--out", default=None, help="run directory for the quantized model (default <checkpoint>_<method>)")
    _add_overwrite_option(p, "a training run")
    _add(p, "--freeze-bn-after", type=int, default=None,
         help="with --bn_fuse: train with running BN statistics from this epoch on (0-based)")
    _add(p, "--pretrained-model", action="store_true", help="accepted for compatibility: BN statistics always start from the checkpoint")
    p.add_argument("--ptq", action="store_true", help="post-training quantization: calibrate, no training")
    _add(p, "--ptq-batch", "--calibration-batches", dest="ptq_batch", type=int, default=200, help="calibration batches for --ptq")
    p.add_argument("--qaft", action="store_true", help="fine-tune a quantized checkpoint with frozen scales and zero points")
    _add(p, "--clamp-weights", action="store_true",
         help="wbwtab binary weights: clamp the latent float weights to [-1, 1] after every optimizer step (the "
              "original's W_clip; beyond ±1 they get no gradient)")
    _add(p, "--float-weight-epochs", type=int, default=None,
         help="wbwtab --W 2/3: train the first N epochs with float weights (binary activations only), then "
              "binarize the weights too (two-stage training)")
    p.add_argument("--equalize", action="store_true",
                   help="with --ptq: fold BatchNorm, equalize weight ranges across layer pairs and absorb high biases first")
    _add(p, "--bias-correction", action="store_true",
         help="with --ptq: remove the mean output shift quantization leaves in each layer (measured on the calibration data)")
    p.add_argument("--adaround", action="store_true",
                   help="with --ptq: learn whether each weight rounds up or down (AdaRound), layer by layer")
    _add(p, "--adaround-iters", type=int, default=None, help="AdaRound iterations per layer (default 1000)")
    p.add_argument("--skip", nargs="+", default=[], metavar="NAME|FILE",
                   help="modules to keep in float: names, and/or files listing them (a sensitivity.json or skip.txt "
                        "of `micronet sensitivity`; an existing file, a path with / or .txt/.json, or @FILE)")
    _add_data_options(p, default=None)
    _add_training_options(p, epochs=2, lr=0.002)
    _add_distillation_options(p)
    p.set_defaults(run=cmd_quantize)


SENSITIVITY_EXAMPLES = """examples:
  micronet sensitivity iao --checkpoint runs/demo --w_bits 4 --a_bits 4 --out runs/demo_sens_w4a4
  micronet quantize iao --checkpoint runs/demo --w_bits 4 --a_bits 4 --ptq --skip runs/demo_sens_w4a4/skip.txt --out runs/demo_w4a4
  micronet sensitivity dorefa --checkpoint runs/demo --w_bits 2 --a_bits 4 --top 2 --out runs/demo_sens_dorefa
"""


def _sensitivity_parser(sub: Any) -> None:
    p = sub.add_parser("sensitivity", help="rank layers by the accuracy their quantization costs; write a skip list",
                       epilog=SENSITIVITY_EXAMPLES, formatter_class=_Formatter,
                       description="Calibrate the scheme once (PTQ) on training images, then measure validation "
                                   "accuracy with each quantized conv/linear layer alone quantized and with all but it "
                                   "quantized. Writes OUT/sensitivity.json and OUT/skip.txt (layers to keep in float; "
                                   "default: every layer whose drop alone exceeds 0.2 pt, 4 of 2000 images) for "
                                   "`micronet quantize --skip`.")
    _add_scheme_options(p)
    p.add_argument("--checkpoint", required=True, help="float checkpoint or run directory")
    p.add_argument("--out", required=True, help="directory for sensitivity.json and skip.txt")
    _add_overwrite_option(p, "a sensitivity result")
    p.add_argument("--images", type=int, default=2000, help="validation images to evaluate on (class-balanced subset)")
    _add(p, "--calibration-batches", type=int, default=20, help="calibration batches of --batch-size training images")
    p.add_argument("--top", type=int, default=None, metavar="K", help="keep the K most sensitive layers in float")
    _add(p, "--max-drop", type=float, default=None, metavar="PT",
         help="or keep in float every layer whose accuracy drop alone exceeds PT percentage points (0.2 without --top)")
    _add_data_options(p, default=None)
    _add(p, "--batch-size", type=int, default=128, help="calibration batch size")
    _add(p, "--eval-batch-size", type=int, default=512, help="evaluation batch size")
    _add_device_options(p)
    p.set_defaults(run=cmd_sensitivity)


def _evaluate_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="accuracy of a checkpoint or an ONNX file on a dataset split", formatter_class=_Formatter,
                       epilog="examples:\n  micronet evaluate --checkpoint runs/nin_small\n"
                              "  micronet evaluate --checkpoint runs/nin_small/best --split val\n"
                              "  micronet evaluate --onnx nin_small.onnx --data fashion-mnist --threads 2   # in ONNX Runtime\n")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory, or a run directory (uses its best/)")
    p.add_argument("--onnx", default=None, metavar="FILE", help="evaluate this ONNX file in ONNX Runtime (CPU) instead of a checkpoint")
    _add_data_options(p, default=None)
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    _add(p, "--batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="--onnx: runtime threads; --runtime packed: kernel threads")
    _add_runtime_option(p)
    _add_device_options(p)
    p.set_defaults(run=cmd_evaluate)


def _add_runtime_option(p: Any) -> None:
    p.add_argument("--runtime", default=None, choices=["torch", "packed", "onnxruntime", "openvino"],
                   help="--checkpoint: torch (default), or packed = binary layers on the bit-packed XNOR-popcount kernels "
                        "(wbwtab W=2 A=2 models; MICRONET_PACKED_ISA picks the kernels); --onnx: onnxruntime "
                        "(default) or openvino (pip install openvino)")


def _onnx_runtime(args: argparse.Namespace) -> str:
    """The runtime that runs ``--onnx`` (ONNX Runtime unless --runtime openvino)."""
    from micronet.errors import ConfigError

    if args.runtime in ("torch", "packed"):
        raise ConfigError(f"--runtime {args.runtime} runs a checkpoint, not an ONNX file: pass --checkpoint DIR instead "
                          "of --onnx, or --runtime onnxruntime|openvino")
    return args.runtime or "onnxruntime"


BENCHMARK_EXAMPLES = """examples:
  micronet benchmark --onnx nin_small.onnx
  micronet benchmark --onnx nin_small_int8.onnx --batch-sizes 1,64 --threads 1,2 --repeats 50 --coverage
"""


def _benchmark_parser(sub: Any) -> None:
    p = sub.add_parser("benchmark", help="latency of an ONNX file in ONNX Runtime (and its int8 coverage)",
                       epilog=BENCHMARK_EXAMPLES, formatter_class=_Formatter,
                       description="Time ONNX Runtime (CPU, pinned threads) on random inputs of the file's own C,H,W: "
                                   "median and p90 ms per run call and images/s for every batch size and thread count, "
                                   "with the CPU, its vector extensions and the load. On a shared machine compare numbers "
                                   "from one call only, and rerun when 'other cores' is 0.25 or more.")
    p.add_argument("--onnx", default=None, metavar="FILE", help="ONNX file (input N×C×H×W with static C, H, W)")
    p.add_argument("--checkpoint", default=None, help="with --runtime packed: a binary checkpoint or packed artifact")
    _add_runtime_option(p)
    _add(p, "--batch-sizes", default="1,64", help="comma-separated batch sizes (the file needs a dynamic batch for more than one)")
    p.add_argument("--threads", default="1,2", help="comma-separated ONNX Runtime intra-op thread counts")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before each measurement")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per batch size and thread count")
    p.add_argument("--optimization", default="all", choices=["disable", "basic", "extended", "all"],
                   help="ONNX Runtime graph optimization level")
    p.add_argument("--coverage", action="store_true", help="also print which ops ONNX Runtime runs in int8 and which stay float")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results (and coverage) as JSON")
    _add_overwrite_option(p, "a benchmark JSON")
    p.set_defaults(run=cmd_benchmark)


EXPORT_EXAMPLES = """examples:
  micronet export --checkpoint runs/demo --out demo_fp32.onnx                       # float model: FP32 ONNX
  micronet export --checkpoint runs/demo_qat_w8a8 --out demo_int8.onnx              # quantized: QDQ int8 ONNX
  micronet export --checkpoint runs/demo --int8 --out demo_ptq_int8.onnx            # float model: int8 PTQ, then QDQ
  micronet export --checkpoint runs/demo --int8 --target vnni --out demo_vnni.onnx  # 8-bit weights for VNNI CPUs only
  micronet evaluate --onnx demo_int8.onnx && micronet benchmark --onnx demo_int8.onnx --coverage
"""


def _export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="write a checkpoint as an ONNX file (FP32, or QDQ int8 for quantized models)",
                       epilog=EXPORT_EXAMPLES, formatter_class=_Formatter,
                       description="Fold BatchNorm and write one ONNX file with a dynamic batch. A quantized checkpoint "
                                   "becomes a QDQ graph with its exact int8 weights and activation scales; a float one "
                                   "becomes FP32, or with --int8 is first quantized (IAO PTQ for the --target, calibrated on its "
                                   "dataset). The file is then run in ONNX Runtime on test images and compared with "
                                   "the PyTorch model.")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--out", required=True, help="ONNX file to write")
    _add_overwrite_option(p, "an ONNX file")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="artifact format (packed low-bit: micronet pack)")
    p.add_argument("--int8", action="store_true", help="float checkpoint: quantize (IAO PTQ, 8-bit activations, "
                                                       "weights per --target) before exporting")
    _add(p, "--calib-batches", type=int, default=16, help="--int8: calibration batches of --batch-size training images")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"], help="torch exporter (both write the same ops)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (13-20)")
    _add(p, "--static-batch", action="store_true", help="fix the batch dimension to 1 instead of a dynamic one")
    p.add_argument("--target", default=None, choices=["portable", "vnni", "tensorrt"],
                   help="integer layout (default: the one the checkpoint was quantized for; portable for --int8): "
                        "portable = int8 weights within ±63 (uint8 beyond), exact on every x86 CPU; vnni = int8 "
                        "weights (exact on VNNI/AMX CPUs); tensorrt = int8 activations and weights")
    _add(p, "--activation-dtype", default=None, choices=["uint8", "int8"],
         help="override the target's: uint8 = ONNX Runtime's fast path (signed codes shifted by 128); int8 = zero point 0 (TensorRT)")
    _add(p, "--weight-dtype", default="auto", choices=["auto", "int8", "uint8"],
         help="override the target's: int8 (zero point 0) or uint8 (zero point 128, u8u8 kernels); auto = int8 where the "
              "target's kernels sum the codes exactly, else uint8")
    _add_data_options(p, default=None)
    _add(p, "--batch-size", type=int, default=64, help="calibration and check batch size")
    _add(p, "--check-images", type=int, default=256, help="test images for the ONNX Runtime check (0: skip)")
    p.set_defaults(run=cmd_export)


def _info_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="parameters, MACs, GFLOPs and size of a model or checkpoint", formatter_class=_Formatter,
                       epilog="examples:\n  micronet info --checkpoint runs/nin_small\n"
                              "  micronet info --model resnet20 --input-shape 3,32,32\n  micronet info --list\n")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint or run directory")
    src.add_argument("--model", help="registry model name")
    src.add_argument("--list", action="store_true", help="list registry models and datasets")
    p.add_argument("--cfg", nargs="+", default=None, help="channel config for --model")
    _add(p, "--num-classes", type=int, default=10)
    _add(p, "--input-shape", default=None, help="C,H,W (default: the checkpoint's dataset, else 1,28,28)")
    p.set_defaults(run=cmd_info)


FUSE_EXAMPLES = """examples:
  micronet fuse --checkpoint runs/demo_qat_w8a8 --out runs/demo_qat_w8a8_fused
  micronet fuse --checkpoint runs/demo --out runs/demo_fused --test_subset 2000
  micronet pack --checkpoint runs/demo_qat_w8a8_fused --out runs/demo_w8a8_packed
  micronet info --checkpoint runs/demo_w8a8_packed      # measured bytes per quantized layer
"""


def _fuse_parser(sub: Any) -> None:
    p = sub.add_parser("fuse", help="fold BatchNorm into the convolutions of a trained checkpoint", epilog=FUSE_EXAMPLES,
                       formatter_class=_Formatter,
                       description="Fold every BatchNorm that follows a conv (standard fold; sign fold in front of "
                                   "sign activations; QAT BN-folding convs become plain quantized convs), print what "
                                   "was folded how and the test accuracy before and after, and write the fused checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--out", required=True, help="directory for the fused checkpoint")
    _add_overwrite_option(p, "a checkpoint")
    _add_data_options(p, default=None)
    _add(p, "--batch-size", type=int, default=512, help="evaluation batch size")
    _add(p, "--no-eval", dest="evaluate", action="store_false", help="skip the accuracy comparison")
    _add_device_options(p)
    p.set_defaults(run=cmd_fuse)


def _pack_parser(sub: Any) -> None:
    p = sub.add_parser("pack", help="write a quantized checkpoint as a packed low-bit artifact", epilog=FUSE_EXAMPLES,
                       formatter_class=_Formatter,
                       description="Store every quantized weight as its integer codes (1-8 bits packed densely, 9-16 "
                                   "bits as two bytes) plus scale and zero point; print measured bytes per layer.")
    p.add_argument("--checkpoint", required=True, help="quantized checkpoint or run directory")
    p.add_argument("--out", required=True, help="directory for the packed artifact")
    _add_overwrite_option(p, "a packed artifact")
    p.set_defaults(run=cmd_pack)


PRUNE_EXAMPLES = """examples:
  micronet train --model nin --cfg 64,48,32,64,64,64,128,128 --sr --s 1e-4 --out runs/nin_sparse
  micronet prune --checkpoint runs/nin_sparse --percent 0.5 --out runs/nin_pruned
  micronet prune --checkpoint runs/nin_sparse --percent 0.5 --normal_regular 8 --out runs/nin_pruned8
  micronet train --prune_refine runs/nin_pruned --epochs 4 --lr 0.01 --out runs/nin_finetune
  micronet quantize iao --checkpoint runs/nin_finetune --ptq --out runs/nin_pruned_ptq
"""


def _prune_parser(sub: Any) -> None:
    p = sub.add_parser("prune", help="remove channels from a trained float checkpoint", epilog=PRUNE_EXAMPLES,
                       formatter_class=_Formatter,
                       description="Prune the least important channels (global threshold over BatchNorm |gamma| by "
                                   "default, best after sparse training with `micronet train --sr`), print channels, "
                                   "parameters and GFLOPs before and after and the test accuracy before and after "
                                   "(no fine-tuning), and write OUT/best for `micronet train --prune_refine OUT`.")
    p.add_argument("--checkpoint", required=True, help="float checkpoint or run directory (prune before quantizing)")
    p.add_argument("--out", required=True, help="run directory for the pruned model (its checkpoint goes to OUT/best)")
    _add_overwrite_option(p, "a training run")
    p.add_argument("--percent", type=float, default=0.5, help="share of the prunable channels to remove, in [0, 1)")
    _add(p, "--normal-regular", type=int, default=None, metavar="N",
         help="round each layer's kept channels to a multiple of N (hardware-friendly widths; 1 = plain)")
    p.add_argument("--importance", default="bn_gamma", choices=["bn_gamma", "l1"],
                   help="channel importance: |gamma| of the BatchNorm after the conv, or the L1 norm of the conv's filters")
    p.add_argument("--ignore", nargs="+", default=[], metavar="NAME", help="module names whose output channels stay")
    _add(p, "--min-channels", type=int, default=1, help="keep at least this many channels in every layer")
    _add(p, "--input-shape", default=None, help="C,H,W of the example input (default: the checkpoint's dataset)")
    _add_data_options(p, default=None)
    _add(p, "--batch-size", type=int, default=512, help="evaluation batch size")
    _add(p, "--no-eval", dest="evaluate", action="store_false", help="skip the accuracy before and after pruning")
    _add_device_options(p)
    p.set_defaults(run=cmd_prune)


PIPELINE_EXAMPLES = """examples:
  micronet pipeline --config configs/default.yaml            # FP32 → prune → quantize → ONNX → report
  micronet pipeline --config configs/smoke.yaml --out runs/smoke
  micronet report runs/default                                # re-render report.md and the plots
"""


def _pipeline_parser(sub: Any) -> None:
    p = sub.add_parser("pipeline", help="run a YAML pipeline of steps (train, prune, quantize, ...) and write its report",
                       epilog=PIPELINE_EXAMPLES, formatter_class=_Formatter,
                       description="Run every step of a pipeline config once: a step whose options and inputs did not "
                                   "change is not re-run, an interrupted one resumes. Then measure each table row "
                                   "(size, GFLOPs, PyTorch and ONNX Runtime accuracy, ONNX Runtime latency) and write "
                                   "OUT/report.md, OUT/report.json and PNG plots.")
    p.add_argument("--config", required=True, help="pipeline YAML (see configs/)")
    p.add_argument("--out", default=None, help="output folder (default: the config's `out`, else runs/<name>)")
    p.set_defaults(run=cmd_pipeline)


def _report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="re-render report.md and the plots of a pipeline's output folder",
                       epilog=PIPELINE_EXAMPLES, formatter_class=_Formatter,
                       description="Read DIR/report.json (and DIR/sensitivity.json) and write DIR/report.md and the PNG "
                                   "plots again; prints the consistency checks.")
    p.add_argument("directory", help="a pipeline output folder")
    p.set_defaults(run=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    import micronet

    parser = argparse.ArgumentParser(prog="micronet", description="Compress neural networks and deploy them.", formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"micronet {micronet.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _evaluate_parser(sub)
    _benchmark_parser(sub)
    _export_parser(sub)
    _prune_parser(sub)
    _quantize_parser(sub)
    _sensitivity_parser(sub)
    _info_parser(sub)
    _fuse_parser(sub)
    _pack_parser(sub)
    _pipeline_parser(sub)
    _report_parser(sub)
    return parser


# ------------------------------------------------------------------------------------------ commands
def _load_data(args: argparse.Namespace, name: str):
    from micronet.data import load_dataset

    return load_dataset(name, args.data_root, val_fraction=args.val_fraction, seed=args.data_seed,
                        train_subset=args.train_subset, test_subset=args.test_subset)


def _summary_table(model, input_shape: tuple[int, ...], extra: dict[str, Any] | None = None) -> str:
    from micronet.analysis import format_table, summarize

    s = summarize(model, input_shape)
    row = dict(extra or {})
    row.update({"params (M)": f"{s.params / 1e6:.4f}", "MACs (M)": f"{s.macs / 1e6:.2f}",
                "GFLOPs": f"{s.flops / 1e9:.4f}", "size (MB)": f"{s.size_bytes / 1e6:.3f}"})
    return format_table([row])


def _maybe_relaunch(args: argparse.Namespace, argv: Sequence[str]) -> int | None:
    """Several ``--gpu_id`` values without torchrun: start one DDP process per GPU."""
    from micronet.engine.distributed import launched_by_torchrun, parse_gpu_ids

    ids = parse_gpu_ids(args.gpu_id)
    if len(ids) <= 1 or launched_by_torchrun():
        return None
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(ids)}", "-m", "micronet.cli", *argv]
    return subprocess.call(cmd)


def _config_from_args(args: argparse.Namespace):
    from micronet.engine import TrainConfig

    return TrainConfig(
        epochs=args.epochs if args.epochs is not None else args.default_epochs, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, schedule=args.schedule, milestones=list(args.milestones),
        step_size=args.step_size, gamma=args.gamma, warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing, amp=args.amp, compile=args.compile,
        channels_last=args.channels_last, seed=args.seed, deterministic=args.deterministic, progress=args.progress,
    )


def _command_options(args: argparse.Namespace, argv: Sequence[str]) -> tuple[dict[str, str], set[str]]:
    """The options of ``args.command`` (destination -> its flag) and the destinations ``argv`` gives a value."""
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    flags: dict[str, str] = {}
    for action in commands.choices[args.command]._actions:
        if action.dest in ("help", argparse.SUPPRESS):
            continue
        flags[action.dest] = action.option_strings[0] if action.option_strings else action.dest
        action.default = argparse.SUPPRESS  # so that only the options given on the command line are set
    return flags, set(vars(parser.parse_args(list(argv)))) & set(flags)


def _run_options(args: argparse.Namespace, **resolved: Any) -> dict[str, Any]:
    """The options to record with a new run: every option of its command, with ``resolved`` values (the model
    and dataset a default stood for) in place of what was given."""
    from micronet.engine.resume import recordable_options

    options = {name: getattr(args, name) for name in args.option_flags if hasattr(args, name)}
    options.update({name: value for name, value in resolved.items() if name in args.option_flags})
    return recordable_options(options)


def _resume_state(args: argparse.Namespace):
    """(checkpoint meta of OUT/last, saved TrainConfig) when --resume is given, else (None, None). The options
    the run was started with are restored into ``args``; one given again with another value is refused."""
    from micronet.engine import TrainConfig, load_checkpoint
    from micronet.engine.resume import resume_options

    if not args.resume:
        return None, None
    run = Path(args.resume)
    last = load_checkpoint(run / "last" if (run / "last").exists() else run)
    saved = (last.training or {}).get("config")
    if not saved:
        from micronet.errors import CheckpointError

        raise CheckpointError(f"{last.path} holds no training state: resume from the run directory `micronet train --out` wrote")
    given = {name: getattr(args, name) for name in args.given_options}
    restored, unchecked = resume_options(str(run), last.training, last.arch.name, given, args.option_flags)
    for name, value in restored.items():
        if name in args.option_flags:
            setattr(args, name, value)
    if unchecked:
        print(f"note: {run} was started before runs recorded their options: {', '.join(unchecked)} could not be "
              "checked against it and are used as given", file=sys.stderr)
    config = TrainConfig.from_json(saved)  # continue exactly as started; only --epochs may grow
    if args.epochs is not None:
        config.epochs = args.epochs
    config.progress = args.progress
    return last, config


def _claim_run(args: argparse.Namespace, run_dir: Path):
    """Claim the run folder a command writes; None for a resumed run, which continues in its own folder."""
    from micronet.engine.trainer import RUN_OUTPUT
    from micronet.outputs import same_path

    if getattr(args, "resume", None) and same_path(run_dir, args.resume):
        return None
    return _claim(run_dir, RUN_OUTPUT, args)


def _train_and_report(args, ctx, model, config, splits, run_dir: Path, label: str, hooks=(), output=None) -> None:
    """Fit ``model`` with the shared engine, then test the best checkpoint once and print the summary."""
    from micronet.data import BatchLoader, default_augment
    from micronet.engine import Trainer, load_checkpoint
    from micronet.engine.checkpoint import resolve_checkpoint
    from micronet.errors import ConfigError

    info = splits.info
    if len(splits.train) == 0:
        raise ConfigError("the training split is empty: lower --val-fraction or raise --train-subset")
    train_loader = BatchLoader(splits.train, config.batch_size, shuffle=True, augment=default_augment(info.name),
                               seed=config.seed, drop_last=True, rank=ctx.rank, world_size=ctx.world_size,
                               channels_last=config.channels_last)
    if len(train_loader) == 0:
        raise ConfigError(f"batch size {config.batch_size} is larger than the {len(splits.train)} training images: lower --batch-size")
    val_loader = BatchLoader(splits.val, config.eval_batch_size, channels_last=config.channels_last) if len(splits.val) else None
    if ctx.is_main:
        print(f"{label} | data {info.name}: {len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test "
              f"| device {ctx.device} x{ctx.world_size}", flush=True)
    if output is not None and ctx.is_main:
        output.prepare()
    options = None if args.resume else _run_options(args, data=info.name, model=model.arch.name, cfg=list(model.arch.cfg))
    result = Trainer(model, config, train_loader, val_loader, hooks=hooks, ctx=ctx, out_dir=run_dir,
                     data_info=info, options=options).fit(resume=args.resume)
    if ctx.is_main:
        best = load_checkpoint(resolve_checkpoint(run_dir))
        best_model = best.build_model()
        test = _test_and_record(best_model, best, splits, ctx.device, config.eval_batch_size)
        epoch = (result.best or {}).get("epoch")
        print(f"best epoch {epoch} ({best.path}): test accuracy {test * 100:.2f}% on {len(splits.test)} images")
        print(_summary_table(best_model.cpu(), (info.in_channels, *info.image_size),
                             {"model": best.arch.name, "test acc (%)": f"{test * 100:.2f}"}))


def _test_and_record(model, checkpoint, splits, device, batch_size: int, **extra_metrics: float) -> float:
    """Test accuracy of ``model``, written into ``checkpoint``'s metrics (reporting only, never selection)."""
    from micronet.data import BatchLoader
    from micronet.engine import evaluate, save_checkpoint

    stats = evaluate(model.to(device), BatchLoader(splits.test, batch_size), device)
    metrics = {**checkpoint.metrics, **extra_metrics, "test_loss": stats["loss"], "test_acc": stats["acc"]}
    save_checkpoint(checkpoint.path, model, data_info=splits.info, metrics=metrics, training=checkpoint.training,
                    extra={k: v for k, v in (checkpoint.meta.get("extra") or {}).items() if k != "quantization"})
    return stats["acc"]


def _with_devices(command):
    """Run ``command(args, ctx)`` on the chosen devices: one DDP process per GPU when several are given,
    the process group joined under torchrun, and always torn down."""

    def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
        relaunched = _maybe_relaunch(args, argv)
        if relaunched is not None:
            return relaunched
        from micronet.engine import setup, teardown
        from micronet.engine.distributed import parse_gpu_ids

        args.option_flags, args.given_options = _command_options(args, argv)
        ctx = setup(cpu=args.cpu, gpu_ids=parse_gpu_ids(args.gpu_id))
        try:
            return command(args, ctx)
        finally:
            teardown()

    return run


@_with_devices
def cmd_train(args: argparse.Namespace, ctx) -> int:
    import torch

    from micronet.engine import load_checkpoint
    from micronet.engine.checkpoint import resolve_checkpoint
    from micronet.models import build_model

    last, config = _resume_state(args)
    pruned = _pruned_source(args) if last is None else None
    if last is not None:
        arch, data_name = last.arch, (last.data_info.name if last.data_info else args.data)
        model_name, cfg = arch.name, list(arch.cfg)
    elif pruned is not None:
        config, model_name, cfg, data_name = _config_from_args(args), pruned.arch.name, list(pruned.arch.cfg), args.data
    else:
        config, data_name = _config_from_args(args), args.data
        init = load_checkpoint(resolve_checkpoint(args.init)) if args.init else None
        model_name = args.model or (init.arch.name if init else "nin")
        # fine-tuning without --model/--cfg continues the architecture of the --init checkpoint
        same_model = init is not None and model_name == init.arch.name
        cfg = _cfg_list(args.cfg) if args.cfg else (list(init.arch.cfg) if same_model else None)
    run_dir = Path(args.out or args.resume or f"runs/{model_name}")
    output = _claim_run(args, run_dir)
    splits = _load_data(args, data_name)
    torch.manual_seed(config.seed)
    if pruned is not None or (last is not None and last.pruning_record):
        # a pruned network's channels come from its record (the cfg alone may not express them)
        source = pruned or last
        _check_data_fits(source, splits.info)
        model = source.build_model()
    else:
        model = build_model(model_name, num_classes=splits.info.num_classes, in_channels=splits.info.in_channels, cfg=cfg)
    if args.init and last is None and pruned is None:
        init.load_into(model)
    from micronet.compression.pruning import BatchNormL1

    if last is not None:  # a resumed run continues with the sparse training it was started with
        hooks = [BatchNormL1.from_state(state) for state in _saved_hook_states(last, "batchnorm_l1")]
        if args.sr and not hooks:
            from micronet.errors import ConfigError

            raise ConfigError(f"{args.resume} was not started with --sr: sparse training cannot be added on resume")
    else:
        hooks = [BatchNormL1(args.s, ramp_epochs=args.sr_ramp, prunable_only=not args.sr_all_bn)] if args.sr else []
    label = f"model {model_name} cfg {list(model.arch.cfg)}" + "".join(
        f" | sparse training s={hook.s:g}" for hook in hooks)
    distillation = _distillation_hooks(args, last, splits.info)
    hooks += distillation
    label += "".join(f" | distilling from {hook.source} (T={hook.temperature:g}, weight {hook.weight:g})"
                     for hook in distillation)
    if pruned is not None:
        label += f" | fine-tuning the pruned {pruned.path}"
    _train_and_report(args, ctx, model, config, splits, run_dir, label, hooks, output)
    return 0


def _pruned_source(args: argparse.Namespace):
    """The pruned checkpoint to fine-tune (``--prune_refine``, or ``--init`` naming a pruned checkpoint), else
    None. A pruned network is rebuilt from its checkpoint (architecture + channel record), so ``--model`` /
    ``--cfg`` must agree with it or be left out. ``--gc_prune_refine`` only selects nin_gc with that cfg."""
    from micronet.engine import load_checkpoint
    from micronet.engine.checkpoint import resolve_checkpoint
    from micronet.errors import ConfigError

    if args.gc_prune_refine:
        if args.model not in (None, "nin_gc") or args.cfg or args.init or args.prune_refine:
            raise ConfigError("--gc_prune_refine C0 ... C7 trains nin_gc with that cfg from a fresh initialisation: "
                              "drop --model, --cfg, --init and --prune_refine")
        args.model, args.cfg = "nin_gc", args.gc_prune_refine
        return None
    if args.init and args.prune_refine:
        raise ConfigError("pass either --init or --prune_refine, not both (--prune_refine is --init for pruned checkpoints)")
    path = args.prune_refine or args.init
    if path is None:
        return None
    checkpoint = load_checkpoint(resolve_checkpoint(path))
    if checkpoint.pruning_record is None:
        if args.prune_refine:
            raise ConfigError(f"{checkpoint.path} is not a pruned checkpoint (no pruning record): fine-tune it with "
                              "--init, or prune it first with `micronet prune`")
        return None  # plain fine-tuning: the weights go into --model / --cfg
    if checkpoint.quant_scheme is not None:
        raise ConfigError(f"{checkpoint.path} is pruned and quantized: fine-tune it with "
                          "`micronet quantize iao --qaft --checkpoint ...` instead")
    arch = checkpoint.arch
    if (args.model is not None and args.model.strip().lower() != arch.name) or \
            (args.cfg and _cfg_list(args.cfg) != list(arch.cfg)):
        raise ConfigError(f"{checkpoint.path} holds a pruned {arch.name} with cfg {list(arch.cfg)}: drop --model and "
                          "--cfg, fine-tuning rebuilds the pruned architecture from the checkpoint")
    return checkpoint


def _check_data_fits(checkpoint, info) -> None:
    from micronet.errors import ConfigError

    arch = checkpoint.arch
    if (info.in_channels, info.num_classes) != (arch.in_channels, arch.num_classes):
        raise ConfigError(f"{checkpoint.path} expects {arch.in_channels}-channel inputs and {arch.num_classes} classes, "
                          f"but {info.name} has {info.in_channels} and {info.num_classes}: use the dataset it was trained on")


def _lowbit_scheme(args: argparse.Namespace):
    """The DoReFa or WbWtAb scheme the flags describe (None for iao), after refusing flags of other methods."""
    from dataclasses import replace

    from micronet.errors import ConfigError

    if args.method != "wbwtab" and (args.W is not None or args.A is not None or args.center_weights):
        raise ConfigError(f"--W, --A and --center-weights belong to `micronet quantize wbwtab`; {args.method} takes --w_bits and --a_bits")
    if args.method != "wbwtab" and getattr(args, "clamp_weights", False):
        raise ConfigError(f"--clamp-weights clamps binary weights of `micronet quantize wbwtab --W 2`; drop it for {args.method}")
    if args.method != "wbwtab" and getattr(args, "float_weight_epochs", None) is not None:
        raise ConfigError(f"--float-weight-epochs belongs to `micronet quantize wbwtab --W 2/3`; drop it for {args.method}")
    if args.method != "wbwtab" and args.sign_gradient != "hardtanh":
        raise ConfigError(f"--sign-gradient belongs to `micronet quantize wbwtab --A 2`; drop it for {args.method}")
    if args.method == "iao":
        return None
    if getattr(args, "ptq", False):
        raise ConfigError(f"{args.method} quantizers have no observers to calibrate: drop --ptq and train them (QAT)")
    iao_only = [flag for flag, on in (("--bn_fuse", args.bn_fuse), ("--bn_fuse_calib", args.bn_fuse_calib),
                                      ("--bn_fold_method", getattr(args, "bn_fold_method", None)),
                                      ("--freeze_bn_after", getattr(args, "freeze_bn_after", None) is not None),
                                      ("--lsq", getattr(args, "lsq", False)),
                                      ("--signed_activations", getattr(args, "signed_activations", False))) if on]
    if iao_only:
        raise ConfigError(f"{' and '.join(iao_only)} apply to iao only: drop them for {args.method}")
    if args.method == "dorefa":
        from micronet.compression.quantization.wqaq.dorefa.quantize import dorefa_scheme

        scheme = dorefa_scheme(args.a_bits, 8 if args.w_bits is None else args.w_bits, pre_scale=args.pre_scale)
        return replace(scheme, target=args.target)
    from micronet.compression.quantization.wbwtab.quantize import wbwtab_scheme

    W = 2 if args.W is None else args.W  # noqa: N806 - the original's flag name
    for flag, on in (("--center-weights", args.center_weights), ("--clamp-weights", getattr(args, "clamp_weights", False))):
        if on and W != 2:
            raise ConfigError(f"{flag} applies to binary weights (--W 2), not --W {W}")
    A = 2 if args.A is None else args.A  # noqa: N806
    float_epochs = getattr(args, "float_weight_epochs", None)
    epochs = args.epochs if getattr(args, "epochs", None) is not None else getattr(args, "default_epochs", None)
    if float_epochs is not None and (W == 32 or not 1 <= float_epochs < (epochs or 0)):
        raise ConfigError(f"--float-weight-epochs {float_epochs} needs binary or ternary weights (--W 2 or 3) and "
                          f"must be at least 1 and below --epochs ({epochs}), so some epochs train the binarized weights")
    if args.sign_gradient != "hardtanh" and A != 2:
        raise ConfigError(f"--sign-gradient applies to sign activations (--A 2), not --A {A}")
    return replace(wbwtab_scheme(A=A, W=W, center=args.center_weights, sign_gradient=args.sign_gradient),
                   target=args.target)


def _iao_options(args: argparse.Namespace) -> dict[str, Any]:
    """The IAO preset's options (besides bit widths and ``ptq``) the scheme flags describe."""
    return dict(q_type=args.q_type, q_level=args.q_level, weight_observer=args.weight_observer, bn_fuse=args.bn_fuse,
                bn_fuse_calib=args.bn_fuse_calib, pretrained_model=True, percentile=args.percentile,
                activation_observer=args.activation_observer, bn_fold_method=args.bn_fold_method,
                learned_scale=args.lsq, signed_activations=args.signed_activations, target=args.target)


def _scheme(args: argparse.Namespace, lowbit, *, ptq: bool):
    """The scheme the method and scheme flags describe: ``lowbit`` (what _lowbit_scheme returned), else IAO."""
    from micronet.compression.quantization.wqaq.iao.quantize import iao_scheme

    return lowbit or iao_scheme(args.a_bits, args.w_bits, ptq=ptq, **_iao_options(args))


def _ptq_recipes(args: argparse.Namespace) -> list[str]:
    """The post-training recipe flags given, after refusing the combinations that cannot work."""
    from micronet.errors import ConfigError

    recipes = [flag for flag, on in (("--equalize", args.equalize), ("--bias-correction", args.bias_correction),
                                     ("--adaround", args.adaround)) if on]
    if args.adaround_iters is not None and not args.adaround:
        raise ConfigError("--adaround-iters sets AdaRound's iterations: add --adaround or drop it")
    if not recipes:
        return recipes
    named = f"post-training recipes ({', '.join(recipes)})"
    if args.method != "iao":
        raise ConfigError(f"{named} work on IAO's integer weights, not {args.method}: use `micronet quantize iao --ptq`")
    if args.qaft or args.resume:
        raise ConfigError(f"{named} start from a float checkpoint: drop {'--qaft' if args.qaft else '--resume'} "
                          "and pass the float checkpoint with --ptq")
    if not args.ptq:
        raise ConfigError(f"{named} calibrate instead of training: add --ptq")
    if args.lsq and args.adaround:
        raise ConfigError("--adaround learns the rounding of fixed-scale weights and --lsq learns scales by training: drop one")
    if args.adaround_iters is not None and args.adaround_iters < 1:
        raise ConfigError(f"--adaround-iters must be at least 1 (got {args.adaround_iters})")
    return recipes


def _skip_list(values: list[str]) -> list[str]:
    """``--skip`` values: module names, and files read with read_skip_list (an existing file, a path with / or
    ending in .txt/.json, or @FILE)."""
    from micronet.analysis.sensitivity import read_skip_list

    names: list[str] = []
    for value in values:
        if value.startswith("@") or os.path.isfile(value) or "/" in value or value.endswith((".txt", ".json")):
            names += read_skip_list(value[1:] if value.startswith("@") else value)
        else:
            names.append(value)
    return list(dict.fromkeys(names))


@_with_devices
def cmd_quantize(args: argparse.Namespace, ctx) -> int:
    from micronet.compression.quantization.core import calibrate, freeze, is_prepared, prepare
    from micronet.data import BatchLoader
    from micronet.engine import load_checkpoint, save_checkpoint
    from micronet.engine.checkpoint import resolve_checkpoint
    from micronet.errors import ConfigError

    recipes = _ptq_recipes(args)
    last, config = _resume_state(args)
    if args.ptq and args.distill:
        raise ConfigError("--distill adds a loss term to training, and --ptq does not train: drop one of them")
    lowbit = _lowbit_scheme(args) if last is None and not args.qaft else None  # bad flags fail before loading
    skip = _skip_list(args.skip)
    if last is not None:  # an interrupted QAT/QAFT run: rebuild the quantized model it was training
        model, source = last.build_model(), last
    else:
        if not args.checkpoint:
            raise ConfigError("pass --checkpoint (the trained model to quantize) or --resume (an interrupted run)")
        source = load_checkpoint(resolve_checkpoint(args.checkpoint))
        model = source.build_model()
        config = _config_from_args(args)
    held = source.data_info
    data_name = args.data or (held.name if held else None)
    if data_name is None:
        raise ConfigError(f"{source.path} does not record its dataset: pass --data")
    run_dir = Path(args.out or args.resume or f"{Path(args.checkpoint).as_posix().rstrip('/')}_{args.method}")
    output = _claim_run(args, run_dir)
    splits = _load_data(args, data_name)
    float_acc = source.metrics.get("test_acc")

    if last is None and args.qaft:
        if not is_prepared(model):
            raise ConfigError(f"--qaft fine-tunes a quantized model, but {source.path} is a float checkpoint: "
                              "quantize it first (micronet quantize iao --ptq or QAT)")
        freeze(model)
        label = f"QAFT of {source.path} ({model.quant_scheme.name})"
    elif last is None:
        if is_prepared(model):
            raise ConfigError(f"{source.path} is already quantized ({model.quant_scheme.name}): "
                              "use --qaft to fine-tune it, or start from the float checkpoint")
        scheme = _scheme(args, lowbit, ptq=args.ptq)
        if recipes:
            from micronet.compression.quantization.ptq import describe, post_training_quantize

            calibration = BatchLoader(splits.train, config.batch_size, shuffle=True, seed=config.seed)
            model = post_training_quantize(model.to(ctx.device), calibration, w_bits=args.w_bits, a_bits=args.a_bits,
                                           num_batches=args.ptq_batch, equalize=args.equalize,
                                           bias_correction=args.bias_correction, adaround=args.adaround,
                                           adaround_iterations=args.adaround_iters, skip=skip,
                                           progress=config.progress, **_iao_options(args))
            if ctx.is_main:
                print(model.quantization_report.summary(), describe(model), sep="\n", flush=True)
        else:
            model = prepare(model, scheme, skip=skip)
            if ctx.is_main:
                print(model.quantization_report.summary(), flush=True)
        label = f"QAT {scheme.name}"
        if args.ptq:
            model.to(ctx.device)
            if not recipes:
                calibration = BatchLoader(splits.train, config.batch_size, shuffle=True, seed=config.seed)
                calibrate(model, calibration, num_batches=args.ptq_batch)
            recipe = getattr(model, "ptq_recipe", None)
            output.prepare()
            save_checkpoint(run_dir / "best", model, data_info=splits.info,
                            metrics={"calibration_batches": model.calibrated_batches},
                            extra={"ptq": recipe} if recipe else None)
            best = load_checkpoint(run_dir / "best")
            extra = {"float_test_acc": float_acc} if float_acc is not None else {}
            acc = _test_and_record(model, best, splits, ctx.device, config.eval_batch_size, **extra)
            with_recipes = " with " + ", ".join(flag.lstrip("-") for flag in recipes) if recipes else ""
            line = f"PTQ {scheme.name}{with_recipes}: {model.calibrated_batches} calibration batches of {config.batch_size}, " \
                   f"test accuracy {acc * 100:.2f}%"
            if float_acc is not None:
                line += f" (float {float_acc * 100:.2f}%, loss {(float_acc - acc) * 100:.2f} pt)"
            print(line)
            print(_summary_table(model.cpu(), (splits.info.in_channels, *splits.info.image_size),
                                 {"model": model.arch.name, "test acc (%)": f"{acc * 100:.2f}"}))
            return 0
    else:
        label = f"resumed {model.quant_scheme.name if is_prepared(model) else 'float'} run"
    from micronet.compression.quantization.core.schedule import FreezeBNStatistics

    saved = [FreezeBNStatistics.from_state(state) for state in _saved_hook_states(last, "freeze_bn_statistics")]
    freeze_after = getattr(args, "freeze_bn_after", None)
    if saved and freeze_after is not None and freeze_after != saved[0].after_epochs:
        raise ConfigError(f"{args.resume} was started with --freeze-bn-after {saved[0].after_epochs}: "
                          "a resumed run keeps it (drop the flag)")
    hooks = saved or ([FreezeBNStatistics(freeze_after)] if freeze_after is not None else [])
    from micronet.compression.quantization.core.schedule import ClampBinaryWeights

    if last is not None:  # a resumed run keeps clamping if it was started so
        hooks += [ClampBinaryWeights() for _ in _saved_hook_states(last, "clamp_binary_weights")]
    elif args.clamp_weights:
        hooks.append(ClampBinaryWeights())
    from micronet.compression.quantization.core.schedule import FloatWeightsFirst

    if last is not None:  # a resumed run keeps its two stages
        hooks += [FloatWeightsFirst.from_state(state) for state in _saved_hook_states(last, "float_weights_first")]
    elif getattr(args, "float_weight_epochs", None) is not None:
        hooks.append(FloatWeightsFirst(args.float_weight_epochs))
        label += f" | float weights for {args.float_weight_epochs} epoch(s), then binarized"
    if any(isinstance(hook, ClampBinaryWeights) for hook in hooks):
        label += " | binary latent weights clamped to [-1, 1] after each step"
    distillation = _distillation_hooks(args, last, splits.info)
    hooks += distillation
    label += "".join(f" | distilling from {hook.source} (T={hook.temperature:g}, weight {hook.weight:g})"
                     for hook in distillation)
    _train_and_report(args, ctx, model, config, splits, run_dir, label, hooks, output)
    return 0


def cmd_sensitivity(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import json

    from micronet.analysis import format_table
    from micronet.analysis.sensitivity import SENSITIVITY_OUTPUT, choose_skip, layer_sensitivity
    from micronet.compression.quantization.core import is_prepared
    from micronet.data import BatchLoader
    from micronet.data.dataset import balanced_subset
    from micronet.engine import load_checkpoint, setup
    from micronet.engine.checkpoint import resolve_checkpoint
    from micronet.engine.distributed import parse_gpu_ids
    from micronet.errors import ConfigError
    from micronet.io import atomic_write_text

    if args.top is not None and args.max_drop is not None:
        raise ConfigError("pass either --top K or --max-drop PT (the rule that picks the layers to keep in float), not both")
    if args.images < 1 or (args.top or 0) < 0:
        raise ConfigError(f"--images must be at least 1 and --top at least 0 (got {args.images} and {args.top})")
    scheme = _scheme(args, _lowbit_scheme(args), ptq=True)
    rule = dict(top=args.top) if args.top is not None else dict(max_drop=0.2 if args.max_drop is None else args.max_drop)
    _claim(args.out, SENSITIVITY_OUTPUT, args)
    checkpoint = load_checkpoint(resolve_checkpoint(args.checkpoint))
    model = checkpoint.build_model()
    if is_prepared(model):
        raise ConfigError(f"{checkpoint.path} is already quantized ({model.quant_scheme.name}): measure the float "
                          "checkpoint it was quantized from")
    held = checkpoint.data_info
    name = args.data or (held.name if held else None)
    if name is None:
        raise ConfigError(f"{checkpoint.path} does not record its dataset: pass --data")
    splits = _load_data(args, name)
    _check_data_fits(checkpoint, splits.info)
    if len(splits.val) == 0:
        raise ConfigError("the validation split is empty: raise --val-fraction (the skip list is a model-selection "
                          "decision, made on validation images, never on test images)")
    ctx = setup(cpu=args.cpu, gpu_ids=parse_gpu_ids(args.gpu_id)[:1])
    val = balanced_subset(splits.val, args.images, args.data_seed, "sensitivity")
    print(f"{checkpoint.path}: {scheme.name}, {args.calibration_batches} calibration batches of {args.batch_size} "
          f"training images, {len(val)} {splits.info.name} validation images | device {ctx.device}", flush=True)
    report = layer_sensitivity(model, scheme, BatchLoader(splits.train, args.batch_size, shuffle=True, seed=0),
                               BatchLoader(val, args.eval_batch_size), calibration_batches=args.calibration_batches,
                               device=ctx.device, log=lambda line: print(line, file=sys.stderr, flush=True))
    report.checkpoint = str(checkpoint.path)
    report.skip = choose_skip(report, **rule)
    out = Path(args.out)
    atomic_write_text(out / "sensitivity.json", json.dumps(report.to_json(), indent=2) + "\n")
    how = f"the {args.top} most sensitive" if args.top is not None else f"drop alone > {rule['max_drop']:g} pt"
    atomic_write_text(out / "skip.txt", f"# layers to keep in float ({how}): micronet sensitivity {scheme.name} on "
                                        f"{checkpoint.path}\n" + "".join(f"{layer}\n" for layer in report.skip))
    print(format_table(report.rows(), floatfmt=".2f"))
    print(f"validation accuracy: float {report.float_acc:.2f}%, all {len(report.layers)} layers quantized "
          f"{report.all_quantized_acc:.2f}% | keep in float ({how}): {', '.join(report.skip) or 'none'}")
    print(f"wrote {out / 'sensitivity.json'} and {out / 'skip.txt'} (use: micronet quantize {args.method} ... "
          f"--skip {out / 'skip.txt'})")
    return 0


def cmd_evaluate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from micronet.errors import ConfigError

    if args.checkpoint and args.onnx:
        raise ConfigError("pass either --checkpoint DIR or --onnx FILE, not both")
    if args.onnx and args.runtime == "packed":
        raise ConfigError("--runtime packed runs a checkpoint, not an ONNX file: pass --checkpoint DIR instead of --onnx")
    if args.checkpoint and args.runtime in ("onnxruntime", "openvino"):
        raise ConfigError(f"--runtime {args.runtime} runs an ONNX file: pass --onnx FILE (micronet export writes one)")
    if args.onnx:
        return _evaluate_onnx(args)
    if not args.checkpoint:
        raise ConfigError("pass --checkpoint DIR or --onnx FILE")
    return _evaluate_checkpoint(args)


def _evaluate_onnx(args: argparse.Namespace) -> int:
    from micronet.deploy.onnx import read_metadata
    from micronet.deploy.onnxruntime import build_session, evaluate, runtime_label
    from micronet.errors import ConfigError

    name = args.data or read_metadata(args.onnx).get("micronet.dataset")
    if not name:
        raise ConfigError(f"{args.onnx} does not record its dataset: pass --data (e.g. --data fashion-mnist)")
    runtime = _onnx_runtime(args)
    session = build_session(args.onnx, threads=args.threads, runtime=runtime)
    splits = _load_data(args, name)
    stats = evaluate(session, getattr(splits, args.split), batch_size=args.batch_size)
    print(f"{args.onnx} on {splits.info.name} {args.split}: accuracy {stats['acc'] * 100:.2f}%, loss {stats['loss']:.4f}, "
          f"{stats['samples']} images ({runtime_label(args.threads, runtime)})")
    return 0


def _int_list(text: str, option: str) -> list[int]:
    from micronet.errors import ConfigError

    try:
        values = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{option} takes positive integers such as 1,64 (got {text})")
    return values


def cmd_benchmark(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import json

    from micronet.analysis import format_table
    from micronet.deploy.onnxruntime import benchmark, int8_coverage, machine_header, runtime_label
    from micronet.deploy.onnxruntime.benchmark import BENCHMARK_JSON_OUTPUT
    from micronet.io import atomic_write_text

    batch_sizes, threads = _int_list(args.batch_sizes, "--batch-sizes"), _int_list(args.threads, "--threads")
    if args.json:
        _claim(args.json, BENCHMARK_JSON_OUTPUT, args, flag="--json")
    if args.runtime == "packed" or args.checkpoint:
        return _benchmark_packed(args, batch_sizes, threads)
    if not args.onnx:
        from micronet.errors import ConfigError

        raise ConfigError("pass --onnx FILE, or --checkpoint DIR --runtime packed")
    runtime = _onnx_runtime(args)
    results = benchmark(args.onnx, batch_sizes=batch_sizes, threads=threads, warmup=args.warmup,
                        repeats=args.repeats, optimization=args.optimization, runtime=runtime)
    where = f"optimization {args.optimization}" if runtime == "onnxruntime" else runtime_label(threads[0], runtime)
    print(f"{args.onnx}: input {'x'.join(map(str, results[0].input_shape))}, {where}, "
          f"{args.warmup} warm-up + {args.repeats} timed runs each")
    print(machine_header(results[0].machine))
    print(format_table([r.row() for r in results]))
    shared = [r for r in results if r.others_cores is not None and r.others_cores >= 0.25]
    if shared:
        print(f"!! other processes used {max(r.others_cores for r in shared):.2f} cores during {len(shared)} of "
              f"{len(results)} measurements: the machine was shared, rerun for comparable numbers")
    report = int8_coverage(args.onnx, optimization=args.optimization) if args.coverage else None
    if report is not None:
        print(report.to_text())
    if args.json:
        payload = {"machine": results[0].machine, "results": [{k: v for k, v in r.to_json().items() if k != "machine"}
                                                              for r in results],
                   "coverage": report.to_json() if report else None}
        atomic_write_text(args.json, json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_export(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import numpy as np
    import torch

    from micronet.analysis import format_table
    from micronet.compression.quantization.core.workflow import calibrate, is_prepared
    from micronet.data import BatchLoader
    from micronet.deploy.onnx import export
    from micronet.deploy.onnx.export import ONNX_OUTPUT
    from micronet.deploy.onnxruntime import build_session, run, top1_agreement
    from micronet.engine import load_checkpoint
    from micronet.engine.checkpoint import resolve_checkpoint
    from micronet.engine.numerics import require_finite, require_finite_weights
    from micronet.errors import ConfigError

    _claim(args.out, ONNX_OUTPUT, args)
    checkpoint = load_checkpoint(resolve_checkpoint(args.checkpoint))
    model = checkpoint.build_model().cpu().eval()
    require_finite_weights(model, str(checkpoint.path))
    name = args.data or (checkpoint.data_info.name if checkpoint.data_info else None)
    needs_data = args.int8 and not is_prepared(model) or args.check_images > 0
    if needs_data and name is None:
        raise ConfigError(f"{checkpoint.path} does not record its dataset: pass --data")
    splits = _load_data(args, name) if needs_data else None
    arch = checkpoint.arch
    shape = (arch.in_channels, *splits.info.image_size) if splits else (arch.in_channels, 28, 28)
    if splits is not None:
        _check_data_fits(checkpoint, splits.info)
    if args.int8 and not is_prepared(model):
        from micronet.compression.quantization.wqaq.iao.quantize import prepare

        model = prepare(model, a_bits=8, ptq=True, target=args.target or "portable")
        calibrate(model, BatchLoader(splits.train, args.batch_size, shuffle=True, seed=0), num_batches=args.calib_batches)
        model.eval()
        print(f"quantized with IAO PTQ, {model.quant_scheme.name} ({model.calibrated_batches} calibration batches of "
              f"{args.batch_size})")
    report = export(model, args.out, torch.zeros(1, *shape), exporter=args.exporter, opset=args.opset,
                    dynamic_batch=not args.static_batch, activation_dtype=args.activation_dtype,
                    weight_dtype=args.weight_dtype, target=args.target, metadata={"micronet.dataset": name or "",
                                                              "micronet.model": arch.name})
    print(report.summary())
    if report.quantized:
        print(format_table(report.form.rows()))
    if args.check_images > 0:
        images = torch.cat([x for x, _ in BatchLoader(splits.test, 256)])[: args.check_images]
        with torch.no_grad():
            reference = torch.cat([model(part) for part in images.split(args.batch_size)]).numpy()
        session = build_session(report.path)
        got = np.concatenate([run(session, part.numpy()) for part in images.split(1 if args.static_batch else args.batch_size)])
        require_finite(reference, f"{checkpoint.path} in PyTorch")
        require_finite(got, f"{report.path} in ONNX Runtime")
        step = float(np.abs(reference).max()) / 127
        agree = top1_agreement(got, reference)
        print(f"ONNX Runtime check on {len(images)} test images: max |difference| {np.abs(got - reference).max():.3g} "
              f"({np.abs(got - reference).max() / step:.2f} output steps of max|y|/127), top-1 agreement {agree * 100:.2f}%")
    return 0


def _evaluate_checkpoint(args: argparse.Namespace) -> int:
    from micronet.compression.packing import is_packed_artifact, load_packed, read_packed_meta
    from micronet.data import BatchLoader
    from micronet.engine import evaluate, load_checkpoint, setup
    from micronet.engine.checkpoint import Checkpoint, resolve_checkpoint
    from micronet.engine.distributed import parse_gpu_ids
    from micronet.errors import ConfigError
    from micronet.io import resolve_directory

    ctx = setup(cpu=args.cpu, gpu_ids=parse_gpu_ids(args.gpu_id)[:1])
    if is_packed_artifact(args.checkpoint):  # `micronet pack` output: weights unpacked from their codes
        path = resolve_directory(args.checkpoint)
        checkpoint = Checkpoint(path, read_packed_meta(path), {})
        model = load_packed(path).to(ctx.device)
    else:
        checkpoint = load_checkpoint(resolve_checkpoint(args.checkpoint))
        model = checkpoint.build_model().to(ctx.device)
    held = checkpoint.data_info
    name = args.data or (held.name if held else None)
    if name is None:
        raise ConfigError(f"{checkpoint.path} does not record its dataset: pass --data")
    splits = _load_data(args, name)
    info = splits.info
    arch = checkpoint.arch
    if (info.in_channels, info.num_classes) != (arch.in_channels, arch.num_classes):
        raise ConfigError(f"{checkpoint.path} expects {arch.in_channels}-channel inputs and {arch.num_classes} classes, "
                          f"but {info.name} has {info.in_channels} and {info.num_classes}: evaluate on the dataset it was trained on")
    split = getattr(splits, args.split)
    runtime = ""
    if args.runtime == "packed":
        model, runtime = _packed_model(model, args.threads), f" (packed runtime, {args.threads} thread(s))"
    stats = evaluate(model, BatchLoader(split, args.batch_size), ctx.device)
    print(f"{arch.name} ({checkpoint.path}) on {info.name} {args.split}: accuracy {stats['acc'] * 100:.2f}%, "
          f"loss {stats['loss']:.4f}, {stats['samples']} images{runtime}")
    return 0


def _packed_model(model: Any, threads: int, float_layout: str = "model") -> Any:
    """``model`` compiled for the packed runtime on ``threads`` threads; prints what runs where."""
    import warnings

    import torch

    from micronet.deploy.packed import compile_packed

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed = compile_packed(model.cpu(), float_layout=float_layout)
    for warning in caught:
        print(f"warning: {warning.message}")
    torch.set_num_threads(threads)
    print(f"packed runtime: {packed.report.summary()}")
    return packed


def _benchmark_packed(args: argparse.Namespace, batch_sizes: list[int], threads: list[int]) -> int:
    import os

    from micronet.analysis import format_table
    from micronet.compression.packing import is_packed_artifact, load_packed, read_packed_meta
    from micronet.deploy.packed.benchmark import benchmark_packed
    from micronet.engine import load_checkpoint
    from micronet.engine.checkpoint import resolve_checkpoint
    from micronet.errors import ConfigError
    from micronet.machine import cpu_flags, cpu_model

    if args.onnx or not args.checkpoint or args.runtime != "packed":
        raise ConfigError("the packed runtime times a checkpoint: pass --checkpoint DIR --runtime packed (without --onnx)")
    if is_packed_artifact(args.checkpoint):
        meta, model = read_packed_meta(args.checkpoint), load_packed(args.checkpoint)
        info = meta.get("data") or {}
    else:
        checkpoint = load_checkpoint(resolve_checkpoint(args.checkpoint))
        model, info = checkpoint.build_model(), (checkpoint.data_info.to_json() if checkpoint.data_info else {})
    if not info.get("image_size"):
        raise ConfigError(f"{args.checkpoint} does not record its input size: train it with micronet")
    packed = _packed_model(model, threads[0], "channels_last")  # timed in its fast form
    shape = (int(info["in_channels"]), *map(int, info["image_size"]))
    rows = benchmark_packed(packed, shape, batch_sizes, threads, args.warmup, args.repeats)
    print(f"{args.checkpoint}: input {'x'.join(map(str, shape))}, {args.warmup} warm-up + {args.repeats} timed runs each")
    print(f"{cpu_model()} | flags: {cpu_flags()} | load avg {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(format_table(rows))
    return 0


def _parse_shape(text: str) -> tuple[int, ...]:
    from micronet.errors import ConfigError

    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape takes C,H,W such as 3,32,32 (got {text})")
    return shape


def cmd_prune(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import json
    import warnings

    import torch

    from micronet.compression.pruning import prune
    from micronet.data import BatchLoader
    from micronet.engine import evaluate, load_checkpoint, save_checkpoint, setup
    from micronet.engine.checkpoint import resolve_checkpoint
    from micronet.engine.distributed import parse_gpu_ids
    from micronet.engine.trainer import PRUNE_REPORT_FILE
    from micronet.errors import ConfigError, DatasetError
    from micronet.io import atomic_write_text

    if not 0 <= args.percent < 1:
        raise ConfigError(f"--percent is the share of channels to remove, in [0, 1) (got {args.percent:g}): e.g. --percent 0.5")
    if args.normal_regular is not None and args.normal_regular < 1:
        raise ConfigError(f"--normal_regular N rounds each layer to a multiple of N and must be at least 1 (got {args.normal_regular})")
    if args.min_channels < 1:
        raise ConfigError(f"--min_channels must be at least 1 (got {args.min_channels}): a layer cannot lose every channel")
    output = _claim_run(args, Path(args.out))
    checkpoint = load_checkpoint(resolve_checkpoint(args.checkpoint))
    if checkpoint.quant_scheme is not None:
        raise ConfigError(f"{checkpoint.path} is quantized ({checkpoint.quant_scheme.name}): prune first, then quantize "
                          "- prune the float checkpoint it was quantized from")
    if checkpoint.fusion_record is not None:
        raise ConfigError(f"{checkpoint.path} has its BatchNorms folded: prune first, then fuse - prune the checkpoint "
                          "that `micronet fuse` started from")
    ctx = setup(cpu=args.cpu, gpu_ids=parse_gpu_ids(args.gpu_id)[:1])
    model = checkpoint.build_model().eval()
    arch, held = checkpoint.arch, checkpoint.data_info
    if args.input_shape:
        shape = _parse_shape(args.input_shape)
    elif held is not None:
        shape = (held.in_channels, *held.image_size)
    else:
        shape = (arch.in_channels, 28, 28)
        print(f"{checkpoint.path} does not record its dataset: GFLOPs at {'x'.join(map(str, shape))} (pass --input-shape)")
    if shape[0] != arch.in_channels:
        raise ConfigError(f"--input-shape has {shape[0]} channels but {arch.name} takes {arch.in_channels}")

    with warnings.catch_warnings(record=True) as caught:  # layers left whole are listed in the table below
        warnings.simplefilter("always")
        pruned = prune(model, torch.randn(1, *shape), percent=args.percent, normal_regular=args.normal_regular,
                       ignored_layers=args.ignore or None, importance=args.importance,
                       min_channels=args.min_channels).eval()
    report = pruned.pruning_report
    print(f"{checkpoint.path}: {arch.name} cfg {list(arch.cfg)} -> cfg {list(pruned.arch.cfg)} "
          f"({args.percent:g} of the channels by {args.importance}"
          + (f", multiples of {args.normal_regular}" if args.normal_regular else "") + ")")
    print(report.table())
    for warning in caught:
        if not str(warning.message).startswith("channel pruning left"):
            print(f"warning: {warning.message}")
    before, after = report.flops_before, report.flops_after
    if before and after is not None:
        print(f"GFLOPs: {before / 1e9:.4f} -> {after / 1e9:.4f} at {'x'.join(map(str, shape))} "
              f"({after / before:.1%} kept)")
    metrics: dict[str, Any] = {"pruned_from": str(checkpoint.path), "percent": args.percent,
                               "normal_regular": args.normal_regular, "importance": args.importance,
                               "params_before": report.params_before, "params_after": report.params_after,
                               "flops_before": before, "flops_after": after}
    name = args.data or (held.name if held else None)
    splits = None
    if args.evaluate and name is None:
        print("no dataset recorded in the checkpoint: pass --data to compare accuracy before and after")
    elif args.evaluate:
        try:
            splits = _load_data(args, name)
        except DatasetError as exc:
            if args.data:
                raise
            print(f"test accuracy not measured ({exc})")
    if splits is not None:
        _check_data_fits(checkpoint, splits.info)
        loader = BatchLoader(splits.test, args.batch_size)
        was = evaluate(model.to(ctx.device), loader, ctx.device)
        now = evaluate(pruned.to(ctx.device), loader, ctx.device)
        print(f"{splits.info.name} test ({now['samples']} images): accuracy {was['acc'] * 100:.2f}% before, "
              f"{now['acc'] * 100:.2f}% after pruning, before fine-tuning (loss {was['loss']:.4f} / {now['loss']:.4f})")
        metrics.update(unpruned_test_acc=was["acc"], test_acc=now["acc"], test_loss=now["loss"], test_images=now["samples"])
    output.prepare()
    out = save_checkpoint(Path(args.out) / "best", pruned.cpu(), data_info=held or (splits.info if splits else None),
                          metrics=metrics, extra=checkpoint.meta.get("extra"))
    atomic_write_text(Path(args.out) / PRUNE_REPORT_FILE, json.dumps(report.to_json(), indent=2) + "\n")
    print(f"pruned checkpoint: {out} (fine-tune: micronet train --prune_refine {args.out})")
    return 0


def cmd_info(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from micronet.analysis import format_table
    from micronet.compression.packing import is_packed_artifact, layer_size_rows
    from micronet.data import list_datasets
    from micronet.engine import load_checkpoint
    from micronet.engine.checkpoint import MODEL_FILE, resolve_checkpoint
    from micronet.errors import ConfigError
    from micronet.models import build_model, default_cfg, list_models

    if args.list:
        for name in list_models():
            print(f"model    {name:12s} default cfg {default_cfg(name)}")
        for name in list_datasets():
            print(f"dataset  {name}")
        return 0
    shape = _parse_shape(args.input_shape) if args.input_shape else None
    sizes = None
    if args.checkpoint and is_packed_artifact(args.checkpoint):
        model, header, held, sizes = _packed_info(args.checkpoint)
        if shape is None:
            shape = (held.in_channels, *held.image_size) if held else (model.arch.in_channels, 28, 28)
    elif args.checkpoint:
        checkpoint = load_checkpoint(resolve_checkpoint(args.checkpoint))
        model = checkpoint.build_model()
        sizes = layer_size_rows(model, checkpoint.path / MODEL_FILE)
        held = checkpoint.data_info
        if shape is None:
            shape = (held.in_channels, *held.image_size) if held else (model.arch.in_channels, 28, 28)
        header = f"{checkpoint.path}: {model.arch.name} cfg {list(model.arch.cfg)}"
        if checkpoint.pruning_record:
            origin = checkpoint.metrics.get("pruned_from")
            header += " (pruned" + (f" from {origin})" if origin else ")")
        metrics = {k: v for k, v in checkpoint.metrics.items() if k.endswith("acc")}
        if metrics:
            header += " | " + ", ".join(f"{k} {v * 100:.2f}%" for k, v in metrics.items())
    else:
        in_channels = shape[0] if shape else 1
        model = build_model(args.model, num_classes=args.num_classes, in_channels=in_channels, cfg=_cfg_list(args.cfg))
        shape = shape or (1, 28, 28)
        header = f"{args.model} cfg {list(model.arch.cfg)}"
    if shape[0] != model.arch.in_channels:
        raise ConfigError(f"--input-shape has {shape[0]} channels but the model takes {model.arch.in_channels}")
    print(header)
    print(_summary_table(model, shape, {"input": "x".join(map(str, shape))}))
    if sizes:
        print("quantized layers (on disk: bytes in the tensor file, from its header):")
        print(format_table(sizes))
    return 0


def _packed_info(path: str):
    """(model, header line, dataset info, size rows) of a packed artifact."""
    from micronet.compression.packing import TENSOR_FILE, layer_size_rows, load_packed, read_packed_meta
    from micronet.data import DatasetInfo
    from micronet.io import resolve_directory

    directory = resolve_directory(path)
    meta = read_packed_meta(directory)
    model = load_packed(directory)
    held = DatasetInfo.from_json(meta["data"]) if meta.get("data") else None
    packed = sum(1 for layer in meta.get("layers", []) if layer.get("stored") == "packed")
    header = f"{directory}: packed {model.arch.name} cfg {list(model.arch.cfg)} | {packed} packed layers, " \
             f"{meta['files'][TENSOR_FILE]['bytes']} bytes"
    return model, header, held, layer_size_rows(model, directory / TENSOR_FILE)


def cmd_fuse(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from micronet.analysis import format_table
    from micronet.compression.fusion import fuse
    from micronet.data import BatchLoader
    from micronet.engine import evaluate, load_checkpoint, save_checkpoint, setup
    from micronet.engine.checkpoint import CHECKPOINT_OUTPUT, resolve_checkpoint
    from micronet.engine.distributed import parse_gpu_ids

    _claim(args.out, CHECKPOINT_OUTPUT, args)
    ctx = setup(cpu=args.cpu, gpu_ids=parse_gpu_ids(args.gpu_id)[:1])
    checkpoint = load_checkpoint(resolve_checkpoint(args.checkpoint))
    model = checkpoint.build_model().eval()
    fused, report = fuse(model)
    print(f"{checkpoint.path}: {report.summary()}")
    if report.layers:
        print(format_table(report.rows()))
    metrics = dict(checkpoint.metrics)
    held = checkpoint.data_info
    name = args.data or (held.name if held else None)
    if args.evaluate and name is None:
        print("no dataset recorded in the checkpoint: pass --data to compare accuracy before and after")
    elif args.evaluate:
        splits = _load_data(args, name)
        loader = BatchLoader(splits.test, args.batch_size)
        before = evaluate(model.to(ctx.device), loader, ctx.device)
        after = evaluate(fused.to(ctx.device), loader, ctx.device)
        print(f"{splits.info.name} test ({before['samples']} images): accuracy {before['acc'] * 100:.2f}% before, "
              f"{after['acc'] * 100:.2f}% after fusion (loss {before['loss']:.4f} / {after['loss']:.4f})")
        metrics.update(unfused_test_acc=before["acc"], fused_test_acc=after["acc"], fused_test_images=after["samples"])
    out = save_checkpoint(args.out, fused.cpu(), data_info=held, metrics=metrics, extra=checkpoint.meta.get("extra"))
    print(f"fused checkpoint: {out}")
    return 0


def cmd_pack(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from micronet.analysis import format_table
    from micronet.compression.packing import PACKED_OUTPUT, TENSOR_FILE, layer_size_rows, read_packed_meta, save_packed
    from micronet.engine import load_checkpoint
    from micronet.engine.checkpoint import resolve_checkpoint

    _claim(args.out, PACKED_OUTPUT, args)
    checkpoint = load_checkpoint(resolve_checkpoint(args.checkpoint))
    model = checkpoint.build_model()
    out = save_packed(model, args.out, data_info=checkpoint.data_info, metrics=checkpoint.metrics)
    print(f"packed artifact: {out}")
    rows = layer_size_rows(model, Path(out) / TENSOR_FILE)
    if rows:
        print(format_table(rows))
    for layer in read_packed_meta(out)["layers"]:
        if layer["stored"] != "packed":
            print(f"kept in float32: {layer['name']} ({layer['reason']})")
    return 0


def cmd_pipeline(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from micronet.pipeline import run_pipeline

    def echo(line: str) -> None:
        print(line, flush=True)

    report = run_pipeline(args.config, out=args.out, echo=echo)
    from micronet.pipeline.report import consistency_problems

    problems = consistency_problems(report)
    print(f"{len(report['rows'])} rows, {report['wall_time_s'] / 60:.1f} min of compute "
          f"({report['this_run_s'] / 60:.1f} min this run); consistency: " + ("all checks pass" if not problems else
                                                                              "; ".join(problems)))
    return 0


def cmd_report(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from micronet.pipeline.report import consistency_problems, load_report, render_report

    for path in render_report(args.directory):
        print(f"wrote {path}")
    problems = consistency_problems(load_report(args.directory))
    print("consistency: " + ("all checks pass" if not problems else "; ".join(problems)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from micronet.errors import MicronetError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args, argv)
    except MicronetError as exc:
        print(f"micronet {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"micronet {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which exited: not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep Python from failing on flush at exit
        return 0
    except OSError as exc:  # a path that vanished or became unwritable while the command ran
        where = f" {exc.filename}" if exc.filename else ""
        print(f"micronet {args.command}: error: cannot access{where}: {exc.strerror or exc} "
              "(check the path, its permissions and the free space)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
