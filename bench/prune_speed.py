"""Is a pruned model really smaller and faster? Params, GFLOPs and measured CPU latency, in one process.

For each case it builds the float model, prunes it with micronet (``prune(model, x, percent)``, channel
importance = BatchNorm |γ|) and, when ``torch_pruning`` is installed, with Torch-Pruning's
``BNScalePruner`` at the same ratio (global threshold, the classifier ignored), then times inference of
the original and the pruned copies:

* torch eager, ``torch.inference_mode()``, batch 1 and batch 64, warm-up runs, then timed runs
  interleaved round-robin (original, micronet, Torch-Pruning, original, ...) so machine noise hits all
  alike; median and p90 per variant; speed-ups against the original of the same case and batch;
* ONNX Runtime (CPUExecutionProvider, same thread count) when ``onnxruntime`` imports, else the table
  says "not installed".

Cases: ``nin`` (default cfg, 3×32×32), ``resnet20`` (3×32×32) and ``nin-slim`` (the demo's slim NIN cfg
``64,48,32,64,64,64,128,128`` at 1×28×28). Without ``--checkpoint`` the BatchNorm scales are drawn at
random (seeded) so that the selection is not a tie between equal γ = 1; ``--checkpoint DIR`` prunes a
trained checkpoint instead (its dataset's input shape). FLOPs come from ``micronet.analysis`` (torch's
FlopCounterMode, FLOPs = 2 × MACs). Nothing here is asserted in a test.

    .venv/bin/python bench/prune_speed.py                          # all cases, a few minutes
    .venv/bin/python bench/prune_speed.py --quick                  # smoke: few runs
    .venv/bin/python bench/prune_speed.py --regular 8              # also widths that are multiples of 8
    .venv/bin/python bench/prune_speed.py --checkpoint runs/nin_sparse --percent 0.5
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, Path(__file__).resolve().parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import torch  # noqa: E402
from _machine import busy_ticks, cpu_busy, finish, machine_header, machine_meta, others_cores, percentile, wait_idle  # noqa: E402
from torch import nn  # noqa: E402

from micronet.analysis import summarize  # noqa: E402
from micronet.models import build_model  # noqa: E402

CASES = {  # name -> (registry model, cfg, input shape)
    "nin": ("nin", None, (3, 32, 32)),
    "resnet20": ("resnet20", None, (3, 32, 32)),
    "nin-slim": ("nin", [64, 48, 32, 64, 64, 64, 128, 128], (1, 28, 28)),
}


# ------------------------------------------------------------------------------------------- models
def _random_gammas(model: nn.Module, seed: int) -> None:
    """|γ| uniform in (0.01, 1) and mild running statistics: a trained-looking net whose selection is not a tie."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 0.99 + 0.01)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def _micronet(model: nn.Module, x: torch.Tensor, percent: float, normal_regular: int | None = None
              ) -> tuple[nn.Module, str]:
    from micronet.compression.pruning import prune

    pruned = prune(model, x, percent=percent, normal_regular=normal_regular)
    return pruned, f"cfg {list(pruned.arch.cfg)}"


def _classifier(model: nn.Module) -> nn.Module:
    """The last conv/linear in module order: its outputs are the classes, never pruned."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]


def _torch_pruning(model: nn.Module, x: torch.Tensor, percent: float) -> tuple[nn.Module, str]:
    import torch_pruning as tp

    copied = copy.deepcopy(model).eval()
    pruner = tp.pruner.BNScalePruner(copied, x, importance=tp.importance.BNScaleImportance(), global_pruning=True,
                                     pruning_ratio=percent, ignored_layers=[_classifier(copied)])
    pruner.step()
    head = _classifier(copied)
    widths = [m.out_channels for m in copied.modules() if isinstance(m, nn.Conv2d) and m is not head]
    return copied, f"torch_pruning {getattr(tp, '__version__', '?')}, BNScalePruner global; conv widths {widths}"


def _prune_checked(build: Callable[[], tuple[nn.Module, str]], x: torch.Tensor, reference: torch.Tensor | None
                   ) -> tuple[nn.Module | None, str]:
    """(pruned model or None, note or the reason it is missing)."""
    try:
        model, note = build()
    except ImportError as exc:
        return None, f"not installed ({exc.name or exc})"
    except Exception as exc:  # noqa: BLE001 - report the reason in the row, keep measuring the rest
        return None, f"failed: {type(exc).__name__}: {exc}"
    with torch.inference_mode():
        out = model.eval()(x)
    if reference is not None and out.shape != reference.shape:
        return None, f"wrong output shape {tuple(out.shape)}"
    return model, note


# ------------------------------------------------------------------------------------------- timing
def _eager(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(x)
    return run


def _onnxruntime(model: nn.Module, x: torch.Tensor, threads: int) -> Callable[[], None]:
    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"], opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def _time_round_robin(runners: dict[str, Callable[[], None]], warmup: int, runs: int) -> tuple[dict[str, list[float]], list]:
    times: dict[str, list[float]] = {name: [] for name in runners}
    shared: list[float | None] = []
    for i in range(warmup + runs):
        ticks, t0 = busy_ticks(), time.perf_counter()
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
        if i >= warmup:
            shared.append(others_cores(ticks, busy_ticks(), time.perf_counter() - t0))
    return times, shared


def bench_case(name: str, args: argparse.Namespace) -> dict:
    if args.checkpoint:
        from micronet.engine import load_checkpoint
        from micronet.engine.checkpoint import resolve_checkpoint

        checkpoint = load_checkpoint(resolve_checkpoint(args.checkpoint))
        original = checkpoint.build_model().eval()
        held = checkpoint.data_info
        shape = (held.in_channels, *held.image_size) if held else (original.arch.in_channels, 28, 28)
    else:
        model_name, cfg, shape = CASES[name]
        torch.manual_seed(args.seed)
        original = build_model(model_name, 10, shape[0], cfg).eval()
        _random_gammas(original, args.seed)
    example = torch.randn(1, *shape, generator=torch.Generator().manual_seed(args.seed))
    with torch.inference_mode():
        reference = original(example)
    built = {
        "original": (original, f"cfg {list(original.arch.cfg)}"),
        "micronet": _prune_checked(lambda: _micronet(original, example, args.percent), example, reference),
        "torch-pruning": _prune_checked(lambda: _torch_pruning(original, example, args.percent), example, reference),
    }
    if args.regular:
        built[f"micronet /{args.regular}"] = _prune_checked(
            lambda: _micronet(original, example, args.percent, args.regular), example, reference)
    rows: dict[str, dict] = {}
    for variant, (model, note) in built.items():
        row: dict = {"note": note, "available": model is not None}
        if model is not None:
            s = summarize(model, shape)
            row.update(params=s.params, flops=s.flops)
        rows[variant] = row

    result: dict = {"case": name, "shape": list(shape), "rows": rows, "timings": {}}
    busy_before, waited = wait_idle(args.wait_idle) if args.wait_idle > 0 else (cpu_busy(), 0.0)
    result.update(cpu_busy_before=busy_before, waited_idle_s=waited, loadavg_before=os.getloadavg())
    t_start, ticks_start = time.perf_counter(), busy_ticks()
    for batch in args.batch_sizes:
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(args.seed + batch))
        for engine in ("eager", "onnxruntime"):
            runners: dict[str, Callable[[], None]] = {}
            missing: dict[str, str] = {}
            for variant, (model, _) in built.items():
                if model is None:
                    continue
                try:
                    runners[variant] = _eager(model, x) if engine == "eager" else _onnxruntime(model, x, args.threads)
                except ImportError:
                    missing[variant] = "not installed"
                except Exception as exc:  # noqa: BLE001
                    missing[variant] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    if args.verbose:
                        traceback.print_exc()
            key = f"{engine} batch {batch}"
            if not runners:
                result["timings"][key] = {"missing": missing}
                continue
            times, shared = _time_round_robin(runners, args.warmup, args.runs)
            base = statistics.median(times["original"]) if times.get("original") else None
            entry: dict = {"missing": missing, "others_cores_per_round": shared}
            for variant, samples in times.items():
                med = statistics.median(samples)
                entry[variant] = {"median_ms": med * 1e3, "p90_ms": percentile(samples, 0.9) * 1e3,
                                  "speedup": base / med if base else None,
                                  "samples_ms": [round(t * 1e3, 3) for t in samples]}
            result["timings"][key] = entry
    wall = time.perf_counter() - t_start
    result.update(wall_s=wall, other_processes_cores=others_cores(ticks_start, busy_ticks(), wall),
                  loadavg_after=os.getloadavg())
    return result


# ------------------------------------------------------------------------------------------- output
def print_case(result: dict, args: argparse.Namespace) -> None:
    rows, base = result["rows"], result["rows"]["original"]
    shape = "x".join(map(str, result["shape"]))
    lb, la, busy = result["loadavg_before"], result["loadavg_after"], result["cpu_busy_before"]
    print(f"\n## {result['case']} at {shape}, prune {args.percent:g}: load avg {lb[0]:.2f} before / {la[0]:.2f} after, "
          f"CPUs {'?' if busy is None else f'{100 * busy:.0f}%'} busy before start (waited {result['waited_idle_s']:.0f} s), "
          f"{result['wall_s']:.0f} s")
    others = result["other_processes_cores"]
    if others is not None:
        rounds = [c for t in result["timings"].values() for c in t.get("others_cores_per_round", []) if c is not None]
        print(f"other processes used {others:.2f} cores on average while timing; "
              f"{sum(1 for c in rounds if c >= 0.25)} of {len(rounds)} timed rounds shared the CPUs (>= 0.25 core)")
        if others >= 0.25 or (busy is not None and busy >= 0.25):
            print("!! the machine was shared: latencies are inflated and noisy; rerun idle before trusting them")
    print(f"| {'variant':<14} | {'params':>9} | {'x':>5} | {'GFLOPs':>7} | {'x':>5} | structure")
    print(f"|{'-' * 16}|{'-' * 11}|{'-' * 7}|{'-' * 9}|{'-' * 7}|----------")
    for variant in rows:
        row = rows[variant]
        if not row["available"]:
            print(f"| {variant:<14} | {'-':>9} | {'-':>5} | {'-':>7} | {'-':>5} | {row['note']}")
            continue
        print(f"| {variant:<14} | {row['params']:>9,} | {row['params'] / base['params']:>5.2f} | {row['flops'] / 1e9:>7.4f} | "
              f"{row['flops'] / max(base['flops'], 1):>5.2f} | {row['note']}")
    timed = [k for k, t in result["timings"].items() if any(v in t for v in rows)]
    for key, timing in result["timings"].items():
        if key not in timed and key.endswith(f"batch {args.batch_sizes[0]}"):  # say once per engine why it is absent
            reasons = sorted(set(timing["missing"].values())) or ["no variant available"]
            print(f"{key.split(' batch')[0]}: {'; '.join(reasons)}")
    if not timed:
        return
    pruned = [v for v in list(rows)[1:] if rows[v]["available"]]
    print(f"\n| {'latency (ms)':<20} | {'original':>17} |" + "".join(f" {v:>17} | {'speed-up':>8} |" for v in pruned))
    print(f"|{'-' * 22}|{'-' * 19}|" + f"{'-' * 19}|{'-' * 10}|" * len(pruned))
    for key in timed:
        timing = result["timings"][key]

        def cell(variant: str) -> str:
            t = timing.get(variant)
            return f"{t['median_ms']:8.2f} ({t['p90_ms']:6.2f})" if t else f"{timing['missing'].get(variant, '-'):>17}"
        line = f"| {key:<20} | {cell('original'):>17} |"
        for variant in pruned:
            t = timing.get(variant)
            speedup = f"{t['speedup']:.2f}" if t and t["speedup"] else "-"
            line += f" {cell(variant):>17} | {speedup:>8} |"
        print(line)
    print("(median and p90 in parentheses; speed-up = original median / variant median)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cases", default="nin,resnet20,nin-slim", help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--checkpoint", default=None, help="prune this trained checkpoint instead of the random-γ cases")
    ap.add_argument("--percent", type=float, default=0.5, help="share of channels removed (both pruners)")
    ap.add_argument("--batch-sizes", default="1,64", help="comma-separated inference batch sizes")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and ONNX Runtime intra-op threads")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs per variant and batch size")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per variant and batch size (median, p90)")
    ap.add_argument("--quick", action="store_true", help="smoke settings: 1 warm-up and 5 timed runs, no idle wait")
    ap.add_argument("--regular", type=int, default=None, metavar="N",
                    help="also time micronet's prune(normal_regular=N): every pruned width a multiple of N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-idle", type=float, default=60.0, metavar="S",
                    help="before each case, wait up to S seconds for the CPUs to be <25%% busy (0: don't wait)")
    ap.add_argument("--json", metavar="PATH", help="write the results (with every run's time) as JSON")
    ap.add_argument("--verbose", action="store_true", help="tracebacks of failing variants")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.runs, args.wait_idle = 1, 5, 0.0
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        ap.error("--batch-sizes takes integers such as 1,64")
    cases = ["checkpoint"] if args.checkpoint else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c != "checkpoint" and c not in CASES]
    if unknown or not 0 <= args.percent < 1 or args.runs < 1 or args.warmup < 0 or args.threads < 1 or not args.batch_sizes:
        ap.error(f"need known --cases ({', '.join(CASES)}; got {unknown}), 0 <= --percent < 1, --runs >= 1, "
                 "--warmup >= 0, --threads >= 1")

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    meta = {**machine_meta(), "percent": args.percent, "batch_sizes": args.batch_sizes, "warmup": args.warmup,
            "runs": args.runs, "checkpoint": args.checkpoint}
    print(f"# prune_speed  {meta['date']}")
    print(machine_header(meta))
    print(f"inference latency: torch eager (inference_mode) and ONNX Runtime, batches {args.batch_sizes}, "
          f"{args.warmup} warm-up + {args.runs} timed runs per variant, round-robin; speed-up = original / variant")
    results = []
    for case in cases:
        result = bench_case(case, args)
        results.append(result)
        print_case(result, args)
    finish(meta, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
