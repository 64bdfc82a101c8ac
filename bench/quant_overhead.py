"""QAT training-step overhead of every quantization preset and of distillation, against FP32, in one process.

For each model (``nin`` with its default cfg, ``resnet20``) it times one training step — forward,
cross-entropy, backward, SGD-momentum step — of these configurations, all built from the *same* float model:

* ``fp32``          the float model;
* ``iao``           ``iao.prepare(model)``: the portable target's W7A8, symmetric per-channel weights,
                    moving-average activation observers, train (QAT) mode;
* ``iao-bnfold``    ``iao.prepare(model, bn_fuse=True)``: the same with Conv→BN folded (QuantBNFuseConv2d);
* ``iao-lsq``       ``iao.prepare(model, learned_scale=True)``: learned step sizes (``--lsq``);
* ``dorefa-w4a4``   ``dorefa.prepare(model, a_bits=4, w_bits=4, pre_scale=0.33)`` (the default pipeline's row);
* ``ternary``       ``wbwtab.prepare(model, W=3, A=32)``: ternary weights, float activations;
* ``binary``        ``wbwtab.prepare(model, W=2, A=2)``: binary weights and sign activations;
* ``fp32+kd`` / ``binary+kd`` / ``dorefa-w4a4+kd``: the same student steps plus the
                    :class:`~micronet.engine.distillation.Distillation` hook with the FP32 model as teacher
                    (its forward and the KL term): the cost of ``--distill`` is the ratio to the same row without;
* ``torch.ao``      torch.ao eager QAT: ``get_default_qat_qconfig("x86")``, conv-bn(-relu) fused with
                    ``fuse_modules_qat`` where the model's structure allows it, ``QuantWrapper`` (so the
                    input is fake-quantized, as micronet does), ``prepare_qat``. Skipped (with the reason
                    in its row) when torch.ao is missing or fails on the model.

``--configs`` picks a subset (``fp32`` is always timed: every ratio is to it).

Like the ``micronet`` command, the script first makes glibc keep freed memory
(:func:`micronet.allocator.retain_freed_memory`), so no configuration pays page faults for its
activations each step; ``--default-allocator`` measures with the C library's default instead.

Noise control: pinned threads, warm-up steps, configurations interleaved
round-robin (A B C D A B C D ...) so machine noise hits all alike, medians and p90 over the timed steps,
ratios to FP32 of the same model, and the CPU capability, load average and torch version logged.
Never assert on these numbers in tests.

    .venv/bin/python bench/quant_overhead.py                       # defaults: ~6 min on 2 idle cores
    .venv/bin/python bench/quant_overhead.py --steps 5 --batch-size 16 --models resnet20   # smoke
    .venv/bin/python bench/quant_overhead.py --json /tmp/quant_overhead.json
    .venv/bin/python bench/quant_overhead.py --configs binary,binary+kd --profile 5   # + torch.profiler top ops
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from micronet.allocator import retain_freed_memory  # noqa: E402
from micronet.models import build_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import busy_ticks, cpu_busy, finish, machine_header, machine_meta, others_cores, percentile, wait_idle  # noqa: E402

# torch.ao.quantization is deprecated (pytorch/pytorch PR #153892) and says so on import and on use.
warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao.*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.ao.*")
warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao.*")

CONFIGS = ("fp32", "iao", "iao-bnfold", "iao-lsq", "dorefa-w4a4", "ternary", "binary",
           "fp32+kd", "dorefa-w4a4+kd", "binary+kd", "torch.ao")
LABELS = {
    "fp32": "FP32",
    "iao": "micronet IAO W7A8 QAT",
    "iao-bnfold": "micronet IAO W7A8 QAT + BN fold",
    "iao-lsq": "micronet IAO W7A8 QAT, LSQ",
    "dorefa-w4a4": "DoReFa W4A4",
    "ternary": "ternary W / float A",
    "binary": "binary W / binary A",
    "fp32+kd": "FP32 + distillation",
    "dorefa-w4a4+kd": "DoReFa W4A4 + distillation",
    "binary+kd": "binary W/A + distillation",
    "torch.ao": "torch.ao eager QAT (x86)",
}
DISTILLED = {"fp32+kd": "fp32", "dorefa-w4a4+kd": "dorefa-w4a4", "binary+kd": "binary"}


# ---------------------------------------------------------------------------------------------- setup
def _quantizer_note(prepared: nn.Module) -> str:
    from micronet.compression.quantization.core.quantizers import Quantizer

    names = [n for n, m in prepared.named_modules() if isinstance(m, Quantizer)]
    weights = sum(1 for n in names if n.endswith("weight_quantizer"))
    return f"{weights} weight + {len(names) - weights} other quantizers"


def _micronet_iao(model: nn.Module, bn_fuse: bool, learned_scale: bool = False) -> tuple[nn.Module, str]:
    from micronet.compression.quantization.core.quantizers import Quantizer
    from micronet.compression.quantization.core.workflow import prepare
    from micronet.compression.quantization.wqaq.iao import quantize as iao

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if learned_scale:
            prepared = prepare(model, iao.iao_scheme(learned_scale=True))
        else:
            prepared = iao.prepare(model, bn_fuse=bn_fuse)
    prepared.train()
    names = [n for n, m in prepared.named_modules() if isinstance(m, Quantizer)]
    weights = sum(1 for n in names if n.endswith("weight_quantizer"))
    report = getattr(prepared, "quantization_report", None)
    folded = len(report.folded_bn) if report is not None else 0
    note = f"{weights} weight + {len(names) - weights} activation quantizers"
    if bn_fuse:
        note += f", {folded} BN folded"
    if report is not None and report.kept_float:
        note += f", {len(report.kept_float)} float: " + ",".join(sorted({r for _, r in report.kept_float}))
    if caught:
        note += f" [prepare warned: {str(caught[0].message)[:80]}]"
    return prepared, note


def _ao_fusion_groups(model: nn.Module) -> tuple[list[list[str]], list[str]]:
    """conv-bn(-relu) groups of micronet's models that fuse_modules_qat can fuse, and the Conv2d names
    left unfused (an unfused conv keeps its float BatchNorm in torch.ao QAT)."""
    from micronet.models.layers import ConvBNAct
    from micronet.models.resnet import BasicBlock, CifarResNet

    groups: list[list[str]] = []

    def pre(name: str) -> str:
        return f"{name}." if name else ""

    for name, m in model.named_modules():
        p = pre(name)
        if isinstance(m, ConvBNAct):
            if isinstance(m.act, nn.ReLU):
                groups.append([p + "conv", p + "bn", p + "act"])
            elif m.act is None:
                groups.append([p + "conv", p + "bn"])
            # ReLU6 has no fused torch.ao QAT module: left unfused
        elif isinstance(m, CifarResNet):
            groups.append([p + "conv1", p + "bn1", p + "relu"])
        elif isinstance(m, BasicBlock):
            groups.append([p + "conv1", p + "bn1", p + "relu1"])
            groups.append([p + "conv2", p + "bn2"])  # relu2 follows the residual add: not fusable
            if isinstance(m.shortcut, nn.Sequential):
                groups.append([p + "shortcut.0", p + "shortcut.1"])
    fused_convs = {g[0] for g in groups}
    unfused = [n for n, m in model.named_modules() if type(m) is nn.Conv2d and n not in fused_convs]
    return groups, unfused


def _torch_ao(model: nn.Module) -> tuple[nn.Module, str]:
    import torch.ao.quantization as tq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = copy.deepcopy(model).train()
        groups, unfused = _ao_fusion_groups(model)
        fuse_note = f"{len(groups)} conv-bn(-relu) fused"
        try:
            if groups:
                tq.fuse_modules_qat(model, groups, inplace=True)
        except Exception as exc:  # noqa: BLE001 - fall back to unfused QAT and say so
            model = copy.deepcopy(model).train()
            fuse_note = f"UNFUSED (fusion failed: {type(exc).__name__}: {exc})"
        if unfused and "UNFUSED" not in fuse_note:
            fuse_note += f", {len(unfused)} conv unfused"
        wrapped = tq.QuantWrapper(model)
        wrapped.qconfig = tq.get_default_qat_qconfig("x86")
        prepared = tq.prepare_qat(wrapped.train(), inplace=False)
    fq = [n for n, m in prepared.named_modules() if isinstance(m, tq.FakeQuantizeBase)]
    weights = sum(1 for n in fq if n.endswith("weight_fake_quant"))
    note = f"{fuse_note}; {weights} weight + {len(fq) - weights} activation fake-quants"
    return prepared, note


def _dorefa(model: nn.Module) -> tuple[nn.Module, str]:
    from micronet.compression.quantization.wqaq.dorefa import quantize as dorefa

    prepared = dorefa.prepare(model, a_bits=4, w_bits=4, pre_scale=0.33).train()
    return prepared, _quantizer_note(prepared)


def _wbwtab(model: nn.Module, W: int, A: int) -> tuple[nn.Module, str]:  # noqa: N803
    from micronet.compression.quantization.wbwtab import quantize as wbwtab

    prepared = wbwtab.prepare(model, W=W, A=A).train()
    return prepared, _quantizer_note(prepared)


def build_configs(float_model: nn.Module, names: tuple[str, ...] = CONFIGS) -> dict[str, tuple[nn.Module | None, str]]:
    """name -> (model or None when it could not be built, note/reason). Distilled configurations get a
    student of their own (built like the row they extend) and are trained with the FP32 model as teacher."""
    builders: dict[str, Callable[[], tuple[nn.Module, str]]] = {
        "fp32": lambda: (copy.deepcopy(float_model).train(), ""),
        "iao": lambda: _micronet_iao(float_model, bn_fuse=False),
        "iao-bnfold": lambda: _micronet_iao(float_model, bn_fuse=True),
        "iao-lsq": lambda: _micronet_iao(float_model, bn_fuse=False, learned_scale=True),
        "dorefa-w4a4": lambda: _dorefa(float_model),
        "ternary": lambda: _wbwtab(float_model, W=3, A=32),
        "binary": lambda: _wbwtab(float_model, W=2, A=2),
        "torch.ao": lambda: _torch_ao(float_model),
    }
    for distilled, student in DISTILLED.items():
        builders[distilled] = builders[student]
    out: dict[str, tuple[nn.Module | None, str]] = {}
    for name in names:
        build = builders[name]
        try:
            out[name] = build()
        except ImportError as exc:
            out[name] = (None, f"not importable: {exc}")
        except Exception as exc:  # noqa: BLE001 - report the reason in the row, keep benchmarking the rest
            out[name] = (None, f"failed to prepare: {type(exc).__name__}: {exc}")
    return out


# ---------------------------------------------------------------------------------------------- timing
class Runner:
    """One configuration: its model, optimizer, optional distillation hook and per-step timings."""

    def __init__(self, name: str, model: nn.Module, lr: float, channels_last: bool,
                 teacher: nn.Module | None = None) -> None:
        from micronet.compression.fusion import fold_for_inference
        from micronet.engine.distillation import Distillation

        self.name = name
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)
        self.distill = None if teacher is None else Distillation(fold_for_inference(teacher))  # as --distill
        self.times: list[float] = []
        self.error: str | None = None
        self.last_loss = math.nan

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        if self.distill is not None:
            self.distill.on_batch(None, x, y)  # the trainer's calls, in its order
        outputs = self.model(x)
        loss = F.cross_entropy(outputs, y)
        if self.distill is not None:
            loss = loss + self.distill.extra_loss(None, outputs, y)
        loss.backward()
        self.opt.step()
        elapsed = time.perf_counter() - start
        self.last_loss = float(loss.detach())  # outside the timed region
        return elapsed


def bench_model(name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    float_model = build_model(name, 10, 3, None).train()
    built = build_configs(float_model, args.configs)
    teacher = copy.deepcopy(float_model).eval()
    if args.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    runners: list[Runner] = []
    rows: dict[str, dict] = {}
    for cfg in args.configs:
        model, note = built[cfg]
        if cfg in DISTILLED:
            note = f"teacher: the FP32 model; student: {note or 'FP32'}"
        rows[cfg] = {"label": LABELS[cfg], "note": note, "error": None if model is not None else note}
        if model is not None:
            runners.append(Runner(cfg, model, args.lr, args.channels_last, teacher if cfg in DISTILLED else None))

    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=gen)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)

    busy_before, waited = wait_idle(args.wait_idle) if args.wait_idle > 0 else (cpu_busy(), 0.0)
    load_before = os.getloadavg()
    ticks0 = busy_ticks()
    t0 = time.perf_counter()
    round_others: list[float | None] = []  # cores other processes used during each timed round
    for i in range(args.warmup + args.steps):
        round_ticks, round_t0 = busy_ticks(), time.perf_counter()
        for r in runners:  # round-robin: A B C D A B C D ...
            if r.error is not None:
                continue
            try:
                dt = r.step(x, y)
            except Exception as exc:  # noqa: BLE001
                r.error = f"failed at step {i}: {type(exc).__name__}: {exc}"
                if args.verbose:
                    traceback.print_exc()
                continue
            if i >= args.warmup:
                r.times.append(dt)
        if i >= args.warmup:
            round_others.append(others_cores(round_ticks, busy_ticks(), time.perf_counter() - round_t0))
    wall = time.perf_counter() - t0
    ticks1 = busy_ticks()
    load_after = os.getloadavg()

    fp32 = next((r for r in runners if r.name == "fp32" and r.error is None and r.times), None)
    base = statistics.median(fp32.times) if fp32 else math.nan
    for r in runners:
        row = rows[r.name]
        row["error"] = r.error
        row["final_loss"] = r.last_loss
        if r.times and r.error is None:
            med = statistics.median(r.times)
            row.update(
                median_ms=med * 1e3,
                p90_ms=percentile(r.times, 0.9) * 1e3,
                min_ms=min(r.times) * 1e3,
                ratio_to_fp32=med / base if base == base else math.nan,
                samples_ms=[round(t * 1e3, 3) for t in r.times],
            )
    ao = rows.get("torch.ao", {}).get("median_ms")
    summary = {
        cfg: (rows[cfg]["median_ms"] / ao if ao and rows.get(cfg, {}).get("median_ms") else None)
        for cfg in ("iao", "iao-bnfold")
    }
    for distilled, student in DISTILLED.items():
        if rows.get(distilled, {}).get("median_ms") and rows.get(student, {}).get("median_ms"):
            rows[distilled]["added_to_student"] = rows[distilled]["ratio_to_fp32"] - rows[student]["ratio_to_fp32"]
    profiles = {r.name: profile_step(r, x, y, args.profile) for r in runners if args.profile and r.error is None}
    return {
        "model": name,
        "params_M": sum(p.numel() for p in float_model.parameters()) / 1e6,
        "rows": rows,
        "micronet_over_torch_ao": summary,
        "loadavg_before": load_before,
        "cpu_busy_before": busy_before,
        "waited_idle_s": waited,
        "other_processes_cores": others_cores(ticks0, ticks1, wall),
        "other_processes_cores_per_round": round_others,
        "loadavg_after": load_after,
        "wall_s": wall,
        "profiles": profiles,
    }


def profile_step(runner: Runner, x: torch.Tensor, y: torch.Tensor, steps: int) -> str:
    """torch.profiler's table of the operators that took the most CPU time over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.step(x, y)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


# ---------------------------------------------------------------------------------------------- output
def print_model(result: dict, args: argparse.Namespace) -> None:
    name = result["model"]
    lb, la = result["loadavg_before"], result["loadavg_after"]
    busy = result["cpu_busy_before"]
    busy_txt = "?" if busy is None else f"{100 * busy:.0f}%"
    print(f"\n## {name} ({result['params_M']:.3f} M params), batch {args.batch_size}, "
          f"load avg {lb[0]:.2f} before / {la[0]:.2f} after, CPUs {busy_txt} busy before start"
          f" (waited {result['waited_idle_s']:.0f} s), {result['wall_s']:.0f} s")
    others = result["other_processes_cores"]
    if others is not None:
        rounds = [c for c in result["other_processes_cores_per_round"] if c is not None]
        shared = sum(1 for c in rounds if c >= 0.25)
        print(f"other processes used {others:.2f} cores on average while this model was timed; "
              f"{shared} of {len(rounds)} timed rounds shared the CPUs (>= 0.25 core)")
    if (busy is not None and busy >= 0.25) or (others is not None and others >= 0.25):
        print("!! the machine was shared: 2-thread OpenMP steps slow down several times when another job holds a"
              " core, and small-op-heavy configurations (fake-quant) suffer most; rerun idle before trusting these")
    print(f"| {'configuration':<32} | {'median ms':>9} | {'p90 ms':>8} | {'x FP32':>6} | notes")
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 10}|{'-' * 8}|------")
    for cfg in args.configs:
        row = result["rows"][cfg]
        if "added_to_student" in row:
            row = {**row, "note": f"+{row['added_to_student']:.2f} x FP32 over {LABELS[DISTILLED[cfg]]}; {row['note']}"}
        if row.get("median_ms") is None:
            print(f"| {row['label']:<32} | {'-':>9} | {'-':>8} | {'-':>6} | {row['error'] or 'no timings'}")
            continue
        print(f"| {row['label']:<32} | {row['median_ms']:>9.1f} | {row['p90_ms']:>8.1f} | "
              f"{row['ratio_to_fp32']:>6.2f} | {row['note']}")
    s = result["micronet_over_torch_ao"]
    if "torch.ao" not in args.configs or "iao" not in args.configs:
        pass
    elif s["iao"] is None and s["iao-bnfold"] is None:
        reason = result["rows"]["torch.ao"]["error"] or result["rows"]["iao"]["error"] or "missing timings"
        print(f"{name}: micronet QAT / torch.ao QAT = n/a ({reason})")
    else:
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{name}: micronet QAT / torch.ao QAT = {fmt(s['iao'])} (with BN folding: {fmt(s['iao-bnfold'])})")
    for cfg, table in result["profiles"].items():
        print(f"\n### torch.profiler, {name} {LABELS[cfg]}, {args.profile} steps\n{table}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", default="nin,resnet20", help="comma-separated registry names")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated configurations, of: {', '.join(CONFIGS)} (fp32 is always included)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile N more steps of each configuration and print torch.profiler's top ops")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per configuration (median, p90)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--channels-last", action="store_true", help="models and input in channels_last")
    ap.add_argument("--wait-idle", type=float, default=60.0, metavar="S",
                    help="before each model, wait up to S seconds for the CPUs to be <25%% busy (0: don't wait)")
    ap.add_argument("--default-allocator", action="store_true",
                    help="leave glibc's malloc as it is (default: retain freed memory, as the micronet command does)")
    ap.add_argument("--json", metavar="PATH", help="write the results (with every step's time) as JSON")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing configurations")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 2 or args.threads < 1:
        ap.error("need --steps >= 1, --warmup >= 0, --batch-size >= 2 (BatchNorm), --threads >= 1")
    picked = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(picked) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configuration(s) {', '.join(unknown)}: choose from {', '.join(CONFIGS)}")
    args.configs = tuple(c for c in CONFIGS if c == "fp32" or c in picked)

    retained = False if args.default_allocator else retain_freed_memory()
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    meta = {
        **machine_meta(),
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "steps": args.steps,
        "channels_last": args.channels_last,
        "input": "random 3x32x32, 10 classes",
        "step": "forward + cross-entropy (+ distillation term) + backward + SGD(momentum 0.9)",
        "configs": list(args.configs),
        "allocator": "freed memory retained" if retained else "C library default",
    }
    print(f"# quant_overhead  {meta['date']}")
    print(machine_header(meta))
    print(f"batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps per configuration, round-robin, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, allocator: {meta['allocator']}")

    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        result = bench_model(name, args)
        results.append(result)
        print_model(result, args)
    finish(meta, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
