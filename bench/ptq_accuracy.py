"""Post-training quantization accuracy, side by side: micronet's recipes vs NNCF and ONNX Runtime.

Same trained float checkpoints, same calibration images (the first ``--calibration-batches`` batches of
``--batch-size`` shuffled training images, seed 0), same test set (full Fashion-MNIST test split unless
``--test-subset``). Rows per model and bit width where each tool can: W8A8 (8-bit per-channel weights:
micronet's ``vnni`` target), W8A8-tensor (one weight scale per layer), W7A8 (micronet's default ``portable``
target, 7-bit weights; ORT's ``reduce_range``), W4A8 and W4A4:

* micronet ``post_training_quantize``: plain (percentile observer), ``--equalize``, ``--bias-correction``,
  ``--adaround``, all three; accuracy of the fake-quant model in PyTorch (which adds the int32 biases the
  export writes, so it is the deployed accuracy: exported == fake-quant is tested elsewhere);
* NNCF ``nncf.quantize`` (ONNX backend, on micronet's FP32 export, evaluated in ORT; its torch backend
  refuses ``fast_bias_correction=False``): its defaults (fast bias correction) and with its full bias
  correction; other bit widths through its advanced quantization parameters;
* ONNX Runtime ``quantize_static`` (QDQ, per-channel symmetric weights) on micronet's FP32 export, with the
  MinMax, Entropy and Percentile calibrators; 4-bit through ORT's int4 QDQ types; evaluated in ORT.

Wall time per row is the quantization alone (not the test evaluation), single process on a machine that may
be shared: the load average is printed at start and end. Usage:

    python bench/ptq_accuracy.py --checkpoint nin=runs/nin --checkpoint resnet20=runs/resnet20 --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import finish, machine_header, machine_meta, write_results  # noqa: E402

from micronet.compression.quantization import post_training_quantize  # noqa: E402
from micronet.data import BatchLoader, load_dataset  # noqa: E402
from micronet.engine import evaluate, load_model  # noqa: E402


@dataclass(frozen=True)
class Bits:
    """One column of the comparison: weight and activation bits, weight granularity, micronet's target."""

    w: int
    a: int
    per_channel: bool = True
    target: str = "portable"  # micronet's deployment target (other tools ignore it)


BITS = {
    "W8A8": Bits(8, 8, target="vnni"),                       # 8-bit weights, exact on VNNI/AMX CPUs
    "W8A8-tensor": Bits(8, 8, per_channel=False, target="vnni"),  # one weight scale per layer
    "W7A8": Bits(7, 8),                                      # the default portable target (±63 weights)
    "W4A8": Bits(4, 8),
    "W4A4": Bits(4, 4),
}
MICRONET_ROWS = {
    "micronet PTQ": {},
    "micronet + range search": {"range_search": True},
    "micronet + equalize": {"equalize": True},
    "micronet + bias correction": {"bias_correction": True},
    "micronet + AdaRound": {"adaround": True},
    "micronet all three": {"equalize": True, "bias_correction": True, "adaround": True},
    "micronet all four": {"range_search": True, "equalize": True, "bias_correction": True, "adaround": True},
}


def _micronet(model, calibration, bits: Bits, options, args):
    extra = {"adaround_iterations": args.adaround_iters} if options.get("adaround") else {}
    return post_training_quantize(model, calibration, w_bits=bits.w, a_bits=bits.a, num_batches=len(calibration),
                                  progress=False, target=bits.target, q_level=0 if bits.per_channel else 1,
                                  **options, **extra)


def _fp32_onnx(model, calibration, workdir: Path) -> Path:
    from micronet.deploy.onnx import export

    fp32 = workdir / "fp32.onnx"
    if not fp32.exists():
        export(model, fp32, calibration[0][:1], exporter="legacy")
    return fp32


def _nncf(model, calibration, bits: Bits, full_bias_correction, workdir: Path):
    """NNCF's ONNX backend (its torch backend refuses fast_bias_correction=False), evaluated in ORT."""
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    advanced = None
    if (bits.w, bits.a, bits.per_channel) != (8, 8, True):
        weights = QuantizationParameters(num_bits=bits.w, per_channel=None if bits.per_channel else False)
        advanced = AdvancedQuantizationParameters(weights_quantization_params=weights,
                                                  activations_quantization_params=QuantizationParameters(num_bits=bits.a))
    fp32 = onnx.load(str(_fp32_onnx(model, calibration, workdir)))
    dataset = nncf.Dataset(calibration, lambda x: {"input": x.numpy()})
    quantized = nncf.quantize(fp32, dataset, subset_size=sum(len(x) for x in calibration),
                              fast_bias_correction=not full_bias_correction, advanced_parameters=advanced)
    out = workdir / f"nncf_{int(full_bias_correction)}_w{bits.w}a{bits.a}_{int(bits.per_channel)}.onnx"
    onnx.save(quantized, str(out))
    return out


def _ort(model, calibration, bits: Bits, method, workdir: Path):
    """7-bit weights are ORT's ``reduce_range``."""
    from micronet.deploy.onnxruntime.ort_quantizer import quantize_with_onnxruntime

    fp32 = _fp32_onnx(model, calibration, workdir)
    out = workdir / f"ort_{method}_w{bits.w}a{bits.a}_{int(bits.per_channel)}.onnx"
    quantize_with_onnxruntime(fp32, out, calibration, calibrate_method=method, weight_bits=8 if bits.w == 7 else bits.w,
                              activation_bits=bits.a, reduce_range=bits.w == 7, per_channel=bits.per_channel)
    return out


def _accuracy(model, test) -> float:
    with torch.no_grad():
        return evaluate(model, BatchLoader(test, 500), "cpu")["acc"]


def _ort_accuracy(path, test) -> float:
    from micronet.deploy.onnxruntime import evaluate as ort_evaluate

    return ort_evaluate(path, test, batch_size=500, threads=torch.get_num_threads())["acc"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--bits", nargs="+", default=list(BITS), choices=list(BITS),
                        help="W8A8: 8-bit per-channel weights (micronet's vnni target); W8A8-tensor: one weight scale per "
                             "layer; W7A8: the portable target's 7-bit weights (ORT: reduce_range)")
    parser.add_argument("--tools", nargs="+", default=["micronet", "nncf", "ort"], choices=["micronet", "nncf", "ort"])
    parser.add_argument("--rows", nargs="+", default=list(MICRONET_ROWS), help="micronet rows to run")
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--adaround-iters", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = machine_meta()
    print(machine_header(meta), flush=True)
    splits = load_dataset("fashion-mnist", test_subset=args.test_subset)
    loader = BatchLoader(splits.train, args.batch_size, shuffle=True, seed=0)
    calibration = []
    for x, _ in loader:
        calibration.append(x)
        if len(calibration) == args.calibration_batches:
            break
    images = sum(len(x) for x in calibration)
    print(f"calibration: {images} training images ({len(calibration)} batches of {args.batch_size}); "
          f"test: {len(splits.test)} images; AdaRound iterations per layer: {args.adaround_iters or 'default (1000)'}\n")
    results = []
    print("| model | bits | tool / recipe | test acc (%) | loss vs FP32 (pt) | quantize time (s) |")
    print("|---|---|---|---|---|---|", flush=True)
    for item in args.checkpoint:
        name, _, directory = item.partition("=")
        model = load_model(directory).eval()
        fp32 = _accuracy(model, splits.test)
        print(f"| {name} | FP32 | float | {fp32 * 100:.2f} | – | – |", flush=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"ptq-bench-{name}-"))
        for bits in args.bits:
            spec = BITS[bits]
            jobs = []
            for tool in args.tools:  # in the order given
                if tool == "micronet":
                    jobs += [(row, lambda o=MICRONET_ROWS[row]: (_micronet(model, calibration, spec, o, args), "torch"))
                             for row in args.rows]
                elif tool == "nncf":
                    jobs += [("NNCF defaults", lambda: (_nncf(model, calibration, spec, False, workdir), "ort")),
                             ("NNCF + bias correction", lambda: (_nncf(model, calibration, spec, True, workdir), "ort"))]
                else:
                    jobs += [(f"ORT {m}", lambda m=m: (_ort(model, calibration, spec, m, workdir), "ort"))
                             for m in ("minmax", "entropy", "percentile")]
            for label, job in jobs:
                started = time.perf_counter()
                try:
                    quantized, runtime = job()
                    seconds = time.perf_counter() - started
                    acc = _accuracy(quantized, splits.test) if runtime == "torch" else _ort_accuracy(quantized, splits.test)
                except Exception as error:  # noqa: BLE001 - a tool that cannot do these bits gets a dash
                    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:90] if str(error) else ''}"
                    if os.environ.get("PTQ_BENCH_TRACEBACK"):
                        traceback.print_exc()
                    print(f"| {name} | {bits} | {label} | – ({reason}) | – | – |", flush=True)
                    results.append({"model": name, "bits": bits, "row": label, "error": reason})
                    write_results(meta, results, args.json)
                    continue
                recipe = getattr(quantized, "ptq_recipe", {})
                choices = {step: recipe[key] for step, key in (("ranges", "ranges"), ("equalization", "equalization"))
                           if recipe.get(key, {}).get("chosen")}
                kept = "; ".join(f"{step}: {record['chosen']}" for step, record in choices.items())
                shown = f"{label} ({kept} kept)" if kept else label
                print(f"| {name} | {bits} | {shown} | {acc * 100:.2f} | {(fp32 - acc) * 100:.2f} | {seconds:.1f} |", flush=True)
                measured = {f"{step}_{what}": record[field] for step, record in choices.items()
                            for what, field in (("kept", "chosen"), ("errors", "output_errors"))}
                results.append({"model": name, "bits": bits, "row": label, "acc": acc, "fp32": fp32, "seconds": seconds,
                                "load": os.getloadavg()[0], **measured})
                write_results(meta, results, args.json)
    finish(meta, results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
