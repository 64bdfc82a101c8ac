"""Post-training quantization accuracy, side by side: micronet's recipes vs NNCF and ONNX Runtime.

Same trained float checkpoints, same calibration images (the first ``--calibration-batches`` batches of
``--batch-size`` shuffled training images, seed 0 unless ``--calibration-seeds``), same test set (full Fashion-MNIST test split unless
``--test-subset``). Rows per model and bit width where each tool can: W8A8 (8-bit per-channel weights:
micronet's ``vnni`` target), W8A8-tensor (one weight scale per layer), W7A8 (micronet's default ``portable``
target, 7-bit weights; ORT's ``reduce_range``), W4A8 and W4A4:

* micronet ``post_training_quantize``: plain (percentile observer), ``--range-search``, ``--equalize``,
  ``--bias-correction``, ``--adaround`` (layer by layer, and with ``--adaround-blocks``), all three (no range
  search), all four (and all four with block reconstruction); accuracy of the fake-quant
  model in PyTorch (which adds the int32 biases the export writes, so it is the deployed accuracy: exported ==
  fake-quant is tested elsewhere);
* NNCF ``nncf.quantize`` (ONNX backend, on micronet's FP32 export, evaluated in ORT; its torch backend
  refuses ``fast_bias_correction=False``): its defaults (fast bias correction) and with its full bias
  correction; other bit widths through its advanced quantization parameters;
* ONNX Runtime ``quantize_static`` (QDQ, per-channel symmetric weights) on micronet's FP32 export, with the
  MinMax, Entropy and Percentile calibrators; 4-bit through ORT's int4 QDQ types; evaluated in ORT.

Every tool is measured on the arithmetic its quantized model specifies: micronet's fake-quant model, the NNCF
and ORT files in ONNX Runtime with graph optimizations at ``basic``, which runs their Q/DQ nodes in float
instead of fusing them into the CPU's int8 kernels. Those kernels round the same way on VNNI CPUs but saturate
8-bit weights on AVX2 and AVX-512 CPUs without VNNI (an NIN's W8A8 ORT file: 0.4% of test predictions differ
from the float model's with ``basic``, 4.6% with ``all``, on an AVX2 machine), which would blame a tool's
quantization for the CPU; ``--ort-optimization all`` measures them on this CPU's kernels instead.

Every row reports, besides test accuracy, two measures of how far the quantized model strays from its float
model on the test set: "flips", the share of test images whose top-1 class differs from the float model's,
and "logit error", the mean squared logit error relative to the float logits' mean square. At 8 bits the
accuracy of one row moves by a few test images with the calibration draw (images near a decision boundary
flip either way); these two do not hinge on those images' labels. ``--calibration-seeds 0 1 2 3 4`` runs
every row on five calibration draws and ends with each row's mean ± standard deviation.

Wall time per row is the quantization alone (not the test evaluation), single process on a machine that may
be shared: the load average is printed at start and end. Usage:

    python bench/ptq_accuracy.py --checkpoint nin=runs/nin --checkpoint resnet20=runs/resnet20 --json out.json
    python bench/ptq_accuracy.py --checkpoint nin=runs/nin --bits W8A8 --calibration-seeds 0 1 2 3 4
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
from micronet.engine import load_model  # noqa: E402


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
    "micronet + AdaRound blocks": {"adaround": True, "adaround_blocks": True},
    "micronet all three": {"equalize": True, "bias_correction": True, "adaround": True},
    "micronet all four": {"range_search": True, "equalize": True, "bias_correction": True, "adaround": True},
    "micronet all four, blocks": {"range_search": True, "equalize": True, "bias_correction": True, "adaround": True,
                                  "adaround_blocks": True},
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


def _torch_logits(model, test) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in BatchLoader(test, 500)])


def _ort_logits(path, test, optimization: str) -> torch.Tensor:
    from micronet.deploy.onnxruntime.session import build_session, run

    session = build_session(path, threads=torch.get_num_threads(), optimization=optimization)
    return torch.cat([torch.from_numpy(run(session, x.numpy())) for x, _ in BatchLoader(test, 500)])


def _scores(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, and two measures of how far the quantized model strays from its float model on the test set
    that do not hinge on the few images near a decision boundary: the share of top-1 predictions that differ
    from the float model's, and the mean squared logit error relative to the float logits' mean square."""
    if not torch.isfinite(logits).all():
        raise ValueError("non-finite logits")
    predicted = logits.argmax(1)
    return {"acc": float((predicted == labels).float().mean()),
            "flips": float((predicted != reference.argmax(1)).float().mean()),
            "logit_error": float((logits - reference).pow(2).mean() / reference.pow(2).mean())}


def _calibration(splits, args, seed: int) -> list[torch.Tensor]:
    """The first ``--calibration-batches`` batches of the training split shuffled with ``seed``."""
    calibration = []
    for x, _ in BatchLoader(splits.train, args.batch_size, shuffle=True, seed=seed):
        calibration.append(x)
        if len(calibration) == args.calibration_batches:
            break
    return calibration


def _spread(results: list[dict]) -> None:
    """Mean and standard deviation over the calibration draws of each (model, bits, row)."""
    groups: dict[tuple, list[dict]] = {}
    for record in results:
        if "acc" in record:
            groups.setdefault((record["model"], record["bits"], record["row"]), []).append(record)
    print("\n| model | bits | tool / recipe | draws | test acc (%) | flips vs FP32 (%) | logit error vs FP32 (%) |")
    print("|---|---|---|---|---|---|---|")
    for (model, bits, row), records in groups.items():
        cells = []
        for key in ("acc", "flips", "logit_error"):
            values = torch.tensor([r[key] * 100 for r in records], dtype=torch.float64)
            std = f" ± {values.std():.{3 if key == 'logit_error' else 2}f}" if len(values) > 1 else ""
            cells.append(f"{values.mean():.{3 if key == 'logit_error' else 2}f}{std}")
        print(f"| {model} | {bits} | {row} | {len(records)} | " + " | ".join(cells) + " |", flush=True)


def _jobs(model, calibration, spec: Bits, workdir: Path, args) -> list[tuple[str, object]]:
    """(row label, callable returning (quantized model or ONNX path, "torch" | "ort")) per tool, in --tools order."""
    jobs = []
    for tool in args.tools:
        if tool == "micronet":
            jobs += [(row, lambda o=MICRONET_ROWS[row]: (_micronet(model, calibration, spec, o, args), "torch"))
                     for row in args.rows]
        elif tool == "nncf":
            jobs += [("NNCF defaults", lambda: (_nncf(model, calibration, spec, False, workdir), "ort")),
                     ("NNCF + bias correction", lambda: (_nncf(model, calibration, spec, True, workdir), "ort"))]
        else:
            jobs += [(f"ORT {m}", lambda m=m: (_ort(model, calibration, spec, m, workdir), "ort"))
                     for m in ("minmax", "entropy", "percentile")]
    return jobs


def _run_column(name, model, calibration, bits: str, seed: int, reference, labels, fp32: float, workdir: Path,
                splits, args, meta, results: list) -> None:
    """Every row of one model and bit width on one calibration draw: printed and appended to ``results``."""
    for label, job in _jobs(model, calibration, BITS[bits], workdir, args):
        started = time.perf_counter()
        try:
            quantized, runtime = job()
            seconds = time.perf_counter() - started
            logits = (_torch_logits(quantized, splits.test) if runtime == "torch"
                      else _ort_logits(quantized, splits.test, args.ort_optimization))
            scores = _scores(logits, reference, labels)
        except Exception as error:  # noqa: BLE001 - a tool that cannot do these bits gets a dash
            reason = f"{type(error).__name__}: {str(error).splitlines()[0][:90] if str(error) else ''}"
            if os.environ.get("PTQ_BENCH_TRACEBACK"):
                traceback.print_exc()
            print(f"| {name} | {bits} | {seed} | {label} | – ({reason}) | – | – | – | – |", flush=True)
            results.append({"model": name, "bits": bits, "seed": seed, "row": label, "error": reason})
            write_results(meta, results, args.json)
            continue
        recipe = getattr(quantized, "ptq_recipe", {})
        choices = {step: recipe[key] for step, key in (("ranges", "ranges"), ("equalization", "equalization"))
                   if recipe.get(key, {}).get("chosen")}
        kept = "; ".join(f"{step}: {record['chosen']}" for step, record in choices.items())
        shown = f"{label} ({kept} kept)" if kept else label
        print(f"| {name} | {bits} | {seed} | {shown} | {scores['acc'] * 100:.2f} | {(fp32 - scores['acc']) * 100:.2f} "
              f"| {scores['flips'] * 100:.2f} | {scores['logit_error'] * 100:.3f} | {seconds:.1f} |", flush=True)
        measured = {f"{step}_{what}": record[field] for step, record in choices.items()
                    for what, field in (("kept", "chosen"), ("errors", "output_errors"))}
        results.append({"model": name, "bits": bits, "seed": seed, "row": label, **scores, "fp32": fp32,
                        "seconds": seconds, "load": os.getloadavg()[0], **measured})
        write_results(meta, results, args.json)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--bits", nargs="+", default=list(BITS), choices=list(BITS),
                        help="W8A8: 8-bit per-channel weights (micronet's vnni target); W8A8-tensor: one weight scale per "
                             "layer; W7A8: the portable target's 7-bit weights (ORT: reduce_range)")
    parser.add_argument("--tools", nargs="+", default=["micronet", "nncf", "ort"], choices=["micronet", "nncf", "ort"])
    parser.add_argument("--rows", nargs="+", default=list(MICRONET_ROWS), help="micronet rows to run")
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--calibration-seeds", type=int, nargs="+", default=[0],
                        help="draw the calibration images once per seed (shuffles of the training split) and run every "
                             "row on each draw; with several, a last table gives each row's mean ± standard deviation")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--adaround-iters", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ort-optimization", choices=["basic", "all"], default="basic",
                        help="ONNX Runtime graph optimization for the NNCF and ORT files: basic (default) runs their "
                             "Q/DQ nodes as written, in float, the exact arithmetic the files specify (as micronet's "
                             "rows are measured); all fuses them into this CPU's int8 kernels, which saturate 8-bit "
                             "weights on CPUs without VNNI")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = machine_meta()
    print(machine_header(meta), flush=True)
    splits = load_dataset("fashion-mnist", test_subset=args.test_subset)
    images = args.calibration_batches * args.batch_size
    print(f"NNCF and ORT files evaluated in ONNX Runtime at graph optimization {args.ort_optimization!r}")
    print(f"calibration: {images} training images ({args.calibration_batches} batches of {args.batch_size}, "
          f"shuffle seeds {' '.join(map(str, args.calibration_seeds))}); test: {len(splits.test)} images; "
          f"AdaRound iterations per layer: {args.adaround_iters or 'default (1000)'}\n")
    results = []
    print("| model | bits | seed | tool / recipe | test acc (%) | loss vs FP32 (pt) | flips vs FP32 (%) "
          "| logit error vs FP32 (%) | quantize time (s) |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    labels = torch.cat([y for _, y in BatchLoader(splits.test, 500)])
    for item in args.checkpoint:
        name, _, directory = item.partition("=")
        model = load_model(directory).eval()
        reference = _torch_logits(model, splits.test)
        fp32 = _scores(reference, reference, labels)["acc"]
        print(f"| {name} | FP32 | – | float | {fp32 * 100:.2f} | – | – | – | – |", flush=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"ptq-bench-{name}-"))
        for seed in args.calibration_seeds:
            calibration = _calibration(splits, args, seed)
            for bits in args.bits:
                _run_column(name, model, calibration, bits, seed, reference, labels, fp32, workdir, splits, args,
                            meta, results)
    if len(args.calibration_seeds) > 1:
        _spread(results)
    finish(meta, results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
