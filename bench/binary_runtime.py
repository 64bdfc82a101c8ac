"""Is a binary network faster on the packed runtime than its float and int8 twins in ONNX Runtime?

One process, one machine, three forms of the default pipeline's NIN (cfg 64,48,32,64,64,64,128,128 on
28×28 Fashion-MNIST-sized inputs; ``--cfg`` for another):

* **ort fp32**: the float NIN (BatchNorm folded), exported to ONNX, in ONNX Runtime;
* **ort int8**: IAO post-training quantization of the same NIN for the ``portable`` target (W7A8: int8
  weights within ±63, exact and on ONNX Runtime's fast u8s8 kernels on every x86 CPU; 8-bit weights would
  export as uint8 for this target and run on the slower u8u8 kernels), micronet's QDQ export, in ONNX Runtime;
* **ort binary**: the binary NIN with 8-bit edges (wbwtab W=2 A=2 ``edge_bits=8``: every conv on ONNX
  Runtime's int8 kernels, signs as int8 codes), micronet's QDQ export, in ONNX Runtime;
* **packed**: the binary NIN (wbwtab W=2 A=2, BatchNorm sign-folded) on :mod:`micronet.deploy.packed`,
  at the fastest kernels this CPU has (``--isa`` for another).

Weights are random (speed does not depend on them). End-to-end rows: median ms per forward for batch 1
and 64 at 1 and 2 threads, the three runtimes timed round-robin so machine noise hits all alike.
Per-layer rows: each binary conv of the packed model on its real input, against the same convolution
alone in ONNX Runtime FP32 and int8 (ORT's own static quantizer, QDQ U8S8 per channel). Also: the
resident bytes of the packed binary weights against FP32. Ratios compare numbers from this run only.

    .venv/bin/python bench/binary_runtime.py              # ~2 minutes
    .venv/bin/python bench/binary_runtime.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
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
from _machine import finish, machine_header, machine_meta  # noqa: E402
from torch import nn  # noqa: E402

from micronet.analysis import format_table  # noqa: E402
from micronet.compression.fusion import fuse  # noqa: E402
from micronet.compression.quantization.core.workflow import calibrate  # noqa: E402
from micronet.compression.quantization.wbwtab import quantize as wbwtab  # noqa: E402
from micronet.compression.quantization.wqaq.iao import quantize as iao  # noqa: E402
from micronet.deploy.onnx import export  # noqa: E402
from micronet.deploy.onnxruntime import build_session, quantize_with_onnxruntime  # noqa: E402
from micronet.deploy.packed import compile_packed  # noqa: E402
from micronet.deploy.packed.layers import PackedConv2d  # noqa: E402
from micronet.models import build_model  # noqa: E402

PIPELINE_CFG = "64,48,32,64,64,64,128,128"


def median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def round_robin(runners: dict, warmup: int, repeats: int, rounds: int = 3) -> dict[str, float]:
    """Median over ``rounds`` of each runner's median, the runners interleaved round by round. Each runner
    starts after a short pause, so the thread pool of the one before (ONNX Runtime's spin, OpenMP's) has
    parked and does not compete for the cores."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            time.sleep(0.05)
            samples[name].append(median_ms(fn, warmup, repeats))
    return {name: statistics.median(values) for name, values in samples.items()}


def ort_runner(session, x: np.ndarray):
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def build_models(cfg: list[int], calibration: list[torch.Tensor], folder: Path) -> tuple[Path, Path, Path, nn.Module]:
    torch.manual_seed(0)
    float_model = build_model("nin", 10, 1, cfg).eval()
    for m in float_model.modules():  # trained-looking statistics, so the signs are not all one way
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2)
    example = calibration[0][:1]
    export(fuse(float_model)[0], folder / "fp32.onnx", example, exporter="legacy")
    quantized = iao.prepare(float_model, a_bits=8, ptq=True)  # the portable target's W7A8
    calibrate(quantized, calibration)
    export(quantized.eval(), folder / "int8.onnx", example, exporter="legacy")
    edged = wbwtab.prepare(float_model, A=2, W=2, edge_bits=8)
    calibrate(edged, calibration)
    export(edged.eval(), folder / "binary.onnx", example, exporter="legacy")
    binary, _ = fuse(wbwtab.prepare(float_model, A=2, W=2).eval())
    return folder / "fp32.onnx", folder / "int8.onnx", folder / "binary.onnx", binary


def conv_inputs(packed, x: torch.Tensor) -> dict[str, object]:
    """The input each packed conv receives on ``x``."""
    seen: dict[str, object] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: seen.__setitem__(n, args[0]))
               for name, m in packed.graph_module.named_modules() if isinstance(m, PackedConv2d)]
    packed(x)
    for h in handles:
        h.remove()
    return seen


def single_conv_files(layer: PackedConv2d, shape: tuple[int, ...], folder: Path, name: str) -> tuple[Path, Path]:
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups, bias=True).eval()
    example = torch.randn(shape).sign()
    fp32 = folder / f"{name}_fp32.onnx"
    export(conv, fp32, example, exporter="legacy")
    int8 = quantize_with_onnxruntime(fp32, folder / f"{name}_int8.onnx", [example.numpy()])
    return fp32, int8


def goal_rows(end_to_end: list[dict], per_layer: list[dict], isa: str) -> list[dict]:
    """The goal ratios of this run: end to end against ORT FP32 (≥ 2× at batch 64) and int8 (≥ 1.3×), and
    the slowest binary conv against ORT FP32 (≥ 4× on AVX-512 kernels, ≥ 2.5× on AVX2)."""
    rows = []
    for row in end_to_end:
        for column, target in (("fp32 / packed", 2.0), ("int8 / packed", 1.3)):
            wanted = target if row["batch"] >= 64 else None
            rows.append({"goal": f"end to end, {column.split(' ')[0]} / packed", "threads": row["threads"],
                         "batch": row["batch"], "ratio": row[column], "target": wanted or "-",
                         "met": "-" if wanted is None else ("yes" if row[column] >= wanted else "NO")})
    conv_target = 4.0 if isa.startswith("avx512") else 2.5
    for n_threads in sorted({r["threads"] for r in per_layer}):
        layers = [r for r in per_layer if r["threads"] == n_threads]
        slowest = min(layers, key=lambda r: r["fp32 / packed"])
        met = sum(r["fp32 / packed"] >= conv_target for r in layers)
        rows.append({"goal": f"slowest binary conv ({slowest['layer']}), fp32 / packed", "threads": n_threads,
                     "batch": layers[0].get("batch", "-"), "ratio": slowest["fp32 / packed"], "target": conv_target,
                     "met": f"{'yes' if met == len(layers) else 'NO'} ({met}/{len(layers)} convs)"})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default=PIPELINE_CFG)
    parser.add_argument("--isa", default=None, help="packed kernels (default: the fastest this CPU runs)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--float-layout", default="channels_last", choices=["channels_last", "model"],
                        help="float layers of the packed model (model: bit-exact, slower first conv)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cfg = [int(v) for v in args.cfg.split(",")]
    threads = [int(v) for v in args.threads.split(",")]
    batches = [int(v) for v in args.batch_sizes.split(",")]
    warmup, repeats = (2, 5) if args.quick else (3, 15)
    folder = Path(tempfile.mkdtemp(prefix="binary_runtime_"))
    calibration = [torch.randn(16, 1, 28, 28) for _ in range(4)]
    fp32_path, int8_path, binary_path, binary = build_models(cfg, calibration, folder)
    packed = compile_packed(binary, isa=args.isa, float_layout=args.float_layout)
    torch.set_num_threads(threads[0])
    meta = machine_meta()
    print(machine_header(meta))
    print(f"NIN cfg {args.cfg}, packed kernels {packed.isa}, float layers {args.float_layout}; {packed.report.summary()}")
    weights, fp32_bytes = packed.resident_binary_weight_bytes()
    print(f"binary layers: packed weight bits {weights} B, with offsets/masks/epilogue {packed.resident_binary_bytes()} B, "
          f"FP32 weights {fp32_bytes} B: weights {fp32_bytes / weights:.1f}x smaller, "
          f"all resident {fp32_bytes / packed.resident_binary_bytes():.1f}x smaller\n")

    results = []
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        sessions = {name: build_session(path, threads=n_threads)
                    for name, path in (("fp32", fp32_path), ("int8", int8_path), ("binary", binary_path))}
        for batch in batches:
            x = torch.randn(batch, 1, 28, 28)
            with torch.no_grad():
                ms = round_robin({"ort fp32": ort_runner(sessions["fp32"], x.numpy()),
                                  "ort int8": ort_runner(sessions["int8"], x.numpy()),
                                  "ort binary": ort_runner(sessions["binary"], x.numpy()),
                                  "packed": lambda: packed(x)}, warmup, repeats)
            row = {"threads": n_threads, "batch": batch, **{f"{k} (ms)": round(v, 3) for k, v in ms.items()},
                   "fp32 / packed": round(ms["ort fp32"] / ms["packed"], 2),
                   "int8 / packed": round(ms["ort int8"] / ms["packed"], 2),
                   "ort binary / packed": round(ms["ort binary"] / ms["packed"], 2), "load avg": round(os.getloadavg()[0], 2)}
            rows.append(row)
    print("end to end (NIN, median ms per forward):")
    print(format_table(rows))
    results.append({"end_to_end": rows})

    layer_rows = []
    x = torch.randn(max(batches), 1, 28, 28)
    inputs = conv_inputs(packed, x)
    modules = dict(packed.graph_module.named_modules())
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for name, value in inputs.items():
            layer = modules[name]
            words = value.words if hasattr(value, "words") else None
            shape = (x.shape[0], layer.in_channels, words.shape[1], words.shape[2]) if words is not None else tuple(value.shape)
            fp32_file, int8_file = single_conv_files(layer, shape, folder, name.replace(".", "_"))
            feed = torch.randn(shape).sign().numpy()
            ms = round_robin({"ort fp32": ort_runner(build_session(fp32_file, threads=n_threads), feed),
                              "ort int8": ort_runner(build_session(int8_file, threads=n_threads), feed),
                              "packed": lambda: layer(value)}, warmup, repeats)
            layer_rows.append({"threads": n_threads, "batch": x.shape[0], "layer": name,
                               "shape": f"{layer.in_channels}→{layer.out_channels} {layer.kernel_size[0]}×{layer.kernel_size[1]}"
                                        f" @{shape[2]}×{shape[3]}" + (f" g{layer.groups}" if layer.groups > 1 else ""),
                               **{f"{k} (ms)": round(v, 3) for k, v in ms.items()},
                               "fp32 / packed": round(ms["ort fp32"] / ms["packed"], 2),
                               "int8 / packed": round(ms["ort int8"] / ms["packed"], 2)})
    print(f"\nper binary conv, batch {x.shape[0]} (packed: the conv with its epilogue on packed input; ORT: the same "
          "conv alone):")
    print(format_table(layer_rows))
    results.append({"per_layer": layer_rows})
    goals = goal_rows(rows, layer_rows, packed.isa)
    print(f"\ngoals ({meta.get('cpu', 'cpu')}, packed kernels {packed.isa}; batch 1 has no target, it is reported):")
    print(format_table(goals))
    results.append({"goals": goals})
    finish(meta, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
