"""Is micronet's int8 ONNX export fast and accurate in ONNX Runtime? Three files of one network, one run.

For each model it trains (a few Adam steps on Fashion-MNIST, or loads ``--checkpoint name=DIR``), then
writes three ONNX files and runs them in ONNX Runtime (CPU, all graph optimisations, pinned threads):

* **fp32**: ``micronet.deploy.onnx.export`` of the float model (BatchNorm folded);
* **micronet int8**: IAO post-training quantization, 8-bit activations (percentile observer, calibrated
  on ``--calib-batches`` batches), exported as QDQ; weights 8-bit, or 7-bit on CPUs without VNNI
  (``--weight-bits``), where ONNX Runtime's u8s8 kernels saturate with 8-bit weights — the same remedy
  ORT's quantizer applies (``reduce_range``) — so both int8 files run the same fast, exact kernels;
* **ort int8**: ONNX Runtime's own ``quantize_static`` of the fp32 file on the same calibration images
  (QDQ, per-channel, U8S8, MinMax; 7-bit weights on CPUs without VNNI, as ORT advises).

Latency: median and p90 per ``run`` call for every batch size and thread count, the three files timed
round-robin (fp32, micronet, ort, fp32, ...) so that machine noise hits all alike. Accuracy on
``--test-images`` Fashion-MNIST test images for the PyTorch float and fake-quant models and the three
files. Ratios are against the other files of the same run, never against another run. Nothing here is
asserted in a test.

    .venv/bin/python bench/deploy_latency.py                              # all models, ~10 minutes
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
from torch import nn  # noqa: E402

from _machine import busy_ticks, finish, machine_header, machine_meta, others_cores, percentile, wait_idle  # noqa: E402
from micronet.compression.quantization.core.workflow import calibrate  # noqa: E402
from micronet.compression.quantization.wqaq.iao import quantize as iao  # noqa: E402
from micronet.data import BatchLoader, load_dataset  # noqa: E402
from micronet.deploy.onnx import export  # noqa: E402
from micronet.deploy.onnxruntime import build_session, int8_coverage, quantize_with_onnxruntime, run  # noqa: E402
from micronet.models import build_model, list_models  # noqa: E402

VARIANTS = ("fp32", "micronet", "ort")


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


def bench_model(name: str, args: argparse.Namespace, data, test_x, test_y, folder: Path) -> dict:
    model, origin = _model(name, args.checkpoints, data, args.train_steps)
    example = test_x[:1]
    calibration = [x for _, (x, _) in zip(range(args.calib_batches), BatchLoader(data.train, 64, shuffle=True, seed=1))]
    quantized = iao.prepare(model, a_bits=8, w_bits=args.weight_bits, ptq=True)
    calibrate(quantized, calibration)
    quantized.eval()
    paths = {variant: folder / f"{name}_{variant}.onnx" for variant in VARIANTS}
    export(model, paths["fp32"], example, exporter="legacy")
    ours = export(quantized, paths["micronet"], example, exporter="legacy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_with_onnxruntime(paths["fp32"], paths["ort"], [x.numpy() for x in calibration])
    with torch.no_grad():
        accuracy = {"torch fp32": _accuracy(lambda x: model(x).numpy(), test_x, test_y),
                    "torch fake-quant": _accuracy(lambda x: quantized(x).numpy(), test_x, test_y)}
    for variant in VARIANTS:
        session = build_session(paths[variant], threads=1)
        accuracy[f"ort {variant}"] = _accuracy(lambda x, s=session: run(s, x.numpy()), test_x, test_y)
    coverage = {variant: int8_coverage(paths[variant]).summary() for variant in ("micronet", "ort")}
    timings = []
    for threads in args.threads:
        sessions = {variant: build_session(paths[variant], threads=threads) for variant in VARIANTS}
        for batch in args.batch_sizes:
            x = test_x[:batch].numpy()
            times, others = _time_round_robin(sessions, x, args.warmup, args.runs)
            timings.append({"threads": threads, "batch": batch, "others_cores": others,
                            **{f"{v} median ms": percentile(times[v], 0.5) * 1e3 for v in VARIANTS},
                            **{f"{v} p90 ms": percentile(times[v], 0.9) * 1e3 for v in VARIANTS}})
    weights = "/".join(sorted({layer.weight for layer in ours.form.layers}))
    return {"model": name, "origin": origin, "weights": f"W{args.weight_bits} {weights}", "accuracy": accuracy,
            "coverage": coverage, "bytes": {v: paths[v].stat().st_size for v in VARIANTS}, "timings": timings}


def print_model(result: dict) -> None:
    acc = result["accuracy"]
    print(f"\n== {result['model']} ({result['origin']}; micronet weights {result['weights']})")
    print("accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items())
          + f" | micronet ORT − fake-quant {100 * (acc['ort micronet'] - acc['torch fake-quant']):+.2f} pt")
    print("file bytes: " + ", ".join(f"{k} {v / 1e3:.0f} kB" for k, v in result["bytes"].items()))
    for variant, text in result["coverage"].items():
        print(f"int8 coverage ({variant}): {text}")
    print("| threads | batch | fp32 ms | micronet ms | ort ms | fp32 / micronet | ort / micronet | other cores |")
    print("|---|---|---|---|---|---|---|---|")
    for t in result["timings"]:
        f, m, o = (t[f"{v} median ms"] for v in VARIANTS)
        others = "?" if t["others_cores"] is None else f"{t['others_cores']:.2f}"
        print(f"| {t['threads']} | {t['batch']} | {f:.2f} | {m:.2f} | {o:.2f} | {f / m:.2f}× | {o / m:.2f}× | {others} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", default=",".join(["plain-cnn", *list_models()]), help="comma-separated registry names or plain-cnn")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR", help="use a trained checkpoint for NAME")
    ap.add_argument("--train-steps", type=int, default=150, help="Adam steps of 64 images for models without a checkpoint")
    ap.add_argument("--weight-bits", type=int, default=None, help="micronet weight bits (default: 8, or 7 without VNNI)")
    ap.add_argument("--calib-batches", type=int, default=8, help="calibration batches of 64 training images (both quantizers)")
    ap.add_argument("--test-images", type=int, default=2000, help="Fashion-MNIST test images for the accuracies")
    ap.add_argument("--batch-sizes", default="1,64", help="comma-separated")
    ap.add_argument("--threads", default="1,2", help="comma-separated ONNX Runtime intra-op thread counts")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per file, batch size and thread count")
    ap.add_argument("--quick", action="store_true", help="smoke settings: 30 training steps, 2 warm-up and 5 timed runs")
    ap.add_argument("--wait-idle", type=float, default=60.0, metavar="S", help="wait up to S seconds for an idle CPU first")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)
    args.batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    args.threads = [int(v) for v in args.threads.split(",")]
    args.checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    if args.weight_bits is None:
        from micronet.machine import cpu_has_vnni

        args.weight_bits = 8 if cpu_has_vnni() else 7
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
