"""What a latency number needs next to it: the CPU, its vector extensions and how busy the machine was.

Shared by the library's benchmarks (:mod:`micronet.deploy.onnxruntime.benchmark`) and the ``bench/``
scripts, so every timing describes the machine the same way. On a shared machine a timing taken while
another job held a core is not comparable to an idle one, hence :func:`busy_ticks` / :func:`others_cores`.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

__all__ = ["busy_ticks", "cpu_class", "cpu_flags", "cpu_has_vnni", "cpu_model", "others_cores", "percentile"]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    """The vector extensions that decide which kernels torch and ONNX Runtime can use."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in wanted if f in have) or "none of " + ",".join(wanted)
    except OSError:
        pass
    return "unknown"


def cpu_has_vnni() -> bool:
    """Whether this CPU has the int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX) that ONNX
    Runtime's u8s8 kernels use on x86. Without them (AVX2 only) those kernels add pairs of uint8×int8
    products in saturating int16, which loses accuracy with 8-bit weights. Non-x86 CPUs count as yes."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return True
    flags = cpu_flags()
    return flags == "unknown" or any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def cpu_class() -> str:
    """The x86 class that decides ONNX Runtime's int8 kernels: "AVX-512 VNNI" (or "AVX-VNNI", "AMX"),
    "AVX-512" (no VNNI), "AVX2", or the architecture on other CPUs."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return platform.machine() or "unknown"
    flags = set(cpu_flags().split())
    if "amx_int8" in flags:
        return "AMX"
    if "avx512_vnni" in flags:
        return "AVX-512 VNNI"
    if "avx_vnni" in flags:
        return "AVX-VNNI"
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2" if "avx2" in flags else "pre-AVX2"


def busy_ticks() -> tuple[int, int] | None:
    """(non-idle clock ticks of all CPUs, ticks used by this process) — their difference over an interval
    is what *other* processes took from the machine while we were timing."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return busy, int(own[11]) + int(own[12])  # utime, stime (fields 14, 15)
    except (OSError, ValueError, IndexError):
        return None


def others_cores(before: tuple[int, int] | None, after: tuple[int, int] | None, wall_s: float) -> float | None:
    """Average number of cores used by other processes between two :func:`busy_ticks` readings."""
    if before is None or after is None or wall_s <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(other, 0) / hz / wall_s
