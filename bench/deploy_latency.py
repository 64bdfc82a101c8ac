"""Is micronet's ONNX export fast and accurate on CPUs? Every file of one network, both CPU runtimes, one run.

For each model it trains (a few Adam steps on Fashion-MNIST, or loads ``--checkpoint name=DIR``), then
writes these ONNX files of it:

* **fp32**: ``micronet.deploy.onnx.export`` of the float model (BatchNorm folded);
* **micronet int8**: IAO post-training quantization for ``--target`` (default ``portable``: 7-bit weights,
  exact and on u8s8 kernels on every x86 CPU), 8-bit activations, percentile observer;
* **micronet vnni**: the same with 8-bit weights for the ``vnni`` target (exact on VNNI/AMX CPUs only);
* **ort int8** and **ort int8 reduce_range**: ONNX Runtime's own ``quantize_static`` of the fp32 file on
  the same calibration images (QDQ, per-channel, U8S8, MinMax), without and with ``reduce_range``
  (7-bit weights);
* the low-bit presets, prepared from the same float model without training (so their accuracy means
  nothing; they are here for latency): **dorefa w4a4**, **ternary w/float a**, **binary w/binary a**, and
  DoReFa and binary with 8-bit edges (``edge_bits=8``: first layer, last layer and pools quantized, so every
  conv is integer; their edge quantizers are calibrated on the calibration images).

Each file runs in ONNX Runtime and, when installed, in OpenVINO (CPU, pinned threads); the files are timed
round-robin (fp32, micronet, ..., fp32, ...) so that machine noise hits all alike. Every row carries the
CPU class (AVX2, AVX-512, AVX-512 VNNI) because the int8 kernels, and so the ratios, depend on it.
Accuracy on ``--test-images`` Fashion-MNIST test images. Ratios are against files of the same run, never
against another run. Nothing here is asserted in a test.

    .venv/bin/python bench/deploy_latency.py                              # all models, long
    .venv/bin/python bench/deploy_latency.py --models nin,plain-cnn --quick
    .venv/bin/python bench/deploy_latency.py --models nin --checkpoint nin=runs/demo
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, Path(__file__).resolve().parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _machine import busy_ticks, finish, machine_header, machine_meta, others_cores, percentile, wait_idle  # noqa: E402
from torch import nn  # noqa: E402

from micronet.compression.quantization.core.workflow import calibrate  # noqa: E402
from micronet.compression.quantization.wbwtab import quantize as wbwtab  # noqa: E402
from micronet.compression.quantization.wqaq.dorefa import quantize as dorefa  # noqa: E402
from micronet.compression.quantization.wqaq.iao import quantize as iao  # noqa: E402
from micronet.data import BatchLoader, load_dataset  # noqa: E402
from micronet.deploy.onnx import export  # noqa: E402
from micronet.deploy.onnxruntime import build_session, int8_coverage, quantize_with_onnxruntime, run  # noqa: E402
from micronet.deploy.openvino import openvino_version  # noqa: E402
from micronet.machine import cpu_class  # noqa: E402
from micronet.models import build_model, list_models  # noqa: E402

ORT_PTQ = ("ort int8", "ort int8 reduce_range")
LOW_BIT = {"dorefa w4a4": lambda m: dorefa.prepare(m, a_bits=4, w_bits=4, pre_scale=0.33),
           "dorefa w4a4 edges8": lambda m: dorefa.prepare(m, a_bits=4, w_bits=4, pre_scale=0.33, edge_bits=8),
           "ternary w/float a": lambda m: wbwtab.prepare(m, W=3, A=32),
           "binary w/binary a": lambda m: wbwtab.prepare(m, W=2, A=2),
           "binary w/binary a edges8": lambda m: wbwtab.prepare(m, W=2, A=2, edge_bits=8)}
VARIANTS = ("fp32", "micronet int8", "micronet vnni", *ORT_PTQ, *LOW_BIT)


class PlainCNN(nn.Module):
    """conv-relu-maxpool ×2 → linear: the small network where naive Q/DQ placement loses to FP32."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(64 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _model(name: str, checkpoints: dict[str, str], data, steps: int) -> tuple[nn.Module, str]:
    if name in checkpoints:
        from micronet.engine import load_checkpoint
        from micronet.engine.checkpoint import resolve_checkpoint

        return load_checkpoint(resolve_checkpoint(checkpoints[name])).build_model().eval(), f"checkpoint {checkpoints[name]}"
    torch.manual_seed(0)
    model = PlainCNN() if name == "plain-cnn" else build_model(name, num_classes=10, in_channels=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for step, (x, y) in enumerate(BatchLoader(data.train, 64, shuffle=True, seed=0)):
        if step >= steps:
            break
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), f"{steps} Adam steps of 64 images ({time.perf_counter() - start:.0f} s)"


def _accuracy(predict, images: torch.Tensor, labels: torch.Tensor) -> float:
    logits = np.concatenate([predict(part) for part in images.split(256)])
    return float((logits.argmax(1) == labels.numpy()).mean())


def _time_round_robin(sessions: dict, x: np.ndarray, warmup: int, runs: int) -> tuple[dict[str, list[float]], float | None]:
    for session in sessions.values():
        for _ in range(warmup):
            run(session, x)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    before, start = busy_ticks(), time.perf_counter()
    for _ in range(runs):
        for name, session in sessions.items():
            t = time.perf_counter()
            run(session, x)
            times[name].append(time.perf_counter() - t)
    return times, others_cores(before, busy_ticks(), time.perf_counter() - start)


def _write_files(model: nn.Module, args: argparse.Namespace, calibration: list, example: torch.Tensor,
                 folder: Path, name: str) -> tuple[dict[str, Path], dict[str, nn.Module]]:
    paths = {variant: folder / f"{name}_{variant.replace(' ', '_').replace('/', '_')}.onnx" for variant in VARIANTS}
    export(model, paths["fp32"], example, exporter="legacy")
    torch_models = {"fp32": model}
    for variant, target in (("micronet int8", args.target), ("micronet vnni", "vnni")):
        quantized = iao.prepare(model, a_bits=8, ptq=True, target=target)
        calibrate(quantized, calibration)
        torch_models[variant] = quantized.eval()
        export(quantized, paths[variant], example, exporter="legacy")
    for variant, reduce_range in zip(ORT_PTQ, (False, True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_with_onnxruntime(paths["fp32"], paths[variant], [x.numpy() for x in calibration],
                                      reduce_range=reduce_range)
    for variant, prepare in LOW_BIT.items():
        lowbit = prepare(model)
        if "edges" in variant:  # the 8-bit edges observe the calibration images, as PTQ would
            calibrate(lowbit, calibration)
        torch_models[variant] = lowbit.eval()
        export(lowbit, paths[variant], example, exporter="legacy")
    return paths, torch_models


def bench_model(name: str, args: argparse.Namespace, data, test_x, test_y, folder: Path) -> dict:
    model, origin = _model(name, args.checkpoints, data, args.train_steps)
    calibration = [x for _, (x, _) in zip(range(args.calib_batches), BatchLoader(data.train, 64, shuffle=True, seed=1))]
    paths, torch_models = _write_files(model, args, calibration, test_x[:1], folder, name)
    accuracy = {}
    with torch.no_grad():
        for variant, module in torch_models.items():
            accuracy[f"torch {variant}"] = _accuracy(lambda x, m=module: m(x).numpy(), test_x, test_y)
    runtimes = ["onnxruntime"] + (["openvino"] if openvino_version() and not args.no_openvino else [])
    top1 = {}
    for runtime in runtimes:
        for variant in VARIANTS:
            session = build_session(paths[variant], threads=1, runtime=runtime)
            accuracy[f"{runtime} {variant}"] = _accuracy(lambda x, s=session: run(s, x.numpy()), test_x, test_y)
            if runtime == "openvino":
                ort_session = build_session(paths[variant], threads=1)
                a = np.concatenate([run(session, p.numpy()) for p in test_x.split(256)]).argmax(1)
                b = np.concatenate([run(ort_session, p.numpy()) for p in test_x.split(256)]).argmax(1)
                top1[variant] = float((a == b).mean())
    coverage = {variant: int8_coverage(paths[variant]).summary() for variant in VARIANTS if variant != "fp32"}
    timings = []
    for runtime in runtimes:
        for threads in args.threads:
            sessions = {variant: build_session(paths[variant], threads=threads, runtime=runtime) for variant in VARIANTS}
            for batch in args.batch_sizes:
                times, others = _time_round_robin(sessions, test_x[:batch].numpy(), args.warmup, args.runs)
                timings.append({"runtime": runtime, "threads": threads, "batch": batch, "others_cores": others,
                                "median ms": {v: percentile(times[v], 0.5) * 1e3 for v in VARIANTS},
                                "p90 ms": {v: percentile(times[v], 0.9) * 1e3 for v in VARIANTS}})
    return {"model": name, "origin": origin, "cpu_class": cpu_class(), "target": args.target, "accuracy": accuracy,
            "openvino_top1_agreement": top1, "coverage": coverage,
            "bytes": {v: paths[v].stat().st_size for v in VARIANTS}, "timings": timings}


def print_model(result: dict) -> None:
    acc = result["accuracy"]
    print(f"\n== {result['model']} ({result['origin']}; CPU class {result['cpu_class']}; micronet target {result['target']})")
    print("accuracy (low-bit presets untrained): " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items()))
    if result["openvino_top1_agreement"]:
        print("OpenVINO vs ONNX Runtime top-1 agreement: "
              + ", ".join(f"{k} {100 * v:.2f}%" for k, v in result["openvino_top1_agreement"].items()))
    for variant, text in result["coverage"].items():
        print(f"int8 coverage ({variant}): {text}")
    print("| CPU class | runtime | threads | batch | file | median ms | p90 ms | × fp32 latency | × best ORT "
          "quantize_static | × micronet int8 | other cores |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for t in result["timings"]:
        median = t["median ms"]
        best_ort = min(median[v] for v in ORT_PTQ)
        others = "?" if t["others_cores"] is None else f"{t['others_cores']:.2f}"
        for variant in VARIANTS:
            m = median[variant]
            print(f"| {result['cpu_class']} | {t['runtime']} | {t['threads']} | {t['batch']} | {variant} | {m:.2f} | "
                  f"{t['p90 ms'][variant]:.2f} | {m / median['fp32']:.2f} | {m / best_ort:.2f} | "
                  f"{m / median['micronet int8']:.2f} | {others} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", default=",".join(["plain-cnn", *list_models()]), help="comma-separated registry names or plain-cnn")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR", help="use a trained checkpoint for NAME")
    ap.add_argument("--train-steps", type=int, default=150, help="Adam steps of 64 images for models without a checkpoint")
    ap.add_argument("--target", default="portable", choices=["portable", "vnni"], help="micronet int8 file's target")
    ap.add_argument("--no-openvino", action="store_true", help="time ONNX Runtime only, even if OpenVINO is installed")
    ap.add_argument("--calib-batches", type=int, default=8, help="calibration batches of 64 training images (both quantizers)")
    ap.add_argument("--test-images", type=int, default=2000, help="Fashion-MNIST test images for the accuracies")
    ap.add_argument("--batch-sizes", default="1,64", help="comma-separated")
    ap.add_argument("--threads", default="1", help="comma-separated runtime thread counts")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per file, batch size and thread count")
    ap.add_argument("--quick", action="store_true", help="smoke settings: 30 training steps, 2 warm-up and 5 timed runs")
    ap.add_argument("--wait-idle", type=float, default=60.0, metavar="S", help="wait up to S seconds for an idle CPU first")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)
    args.batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    args.threads = [int(v) for v in args.threads.split(",")]
    args.checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    if args.quick:
        args.train_steps, args.warmup, args.runs, args.wait_idle = 30, 2, 5, 0.0
    torch.set_num_threads(2)
    busy, waited = wait_idle(args.wait_idle) if args.wait_idle > 0 else (None, 0.0)
    meta = machine_meta()
    print(machine_header(meta))
    if waited:
        print(f"waited {waited:.0f} s for an idle CPU (busy {busy if busy is None else f'{100 * busy:.0f}%'})")
    data = load_dataset("fashion-mnist", test_subset=args.test_images)
    test = [(x, y) for x, y in BatchLoader(data.test, 256)]
    test_x, test_y = torch.cat([x for x, _ in test]), torch.cat([y for _, y in test])
    results = []
    with tempfile.TemporaryDirectory(prefix="micronet-deploy-bench-") as tmp:
        for name in args.models.split(","):
            result = bench_model(name, args, data, test_x, test_y, Path(tmp))
            print_model(result)
            results.append(result)
    finish(meta, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
