"""What every benchmark script reports about the machine, and how busy it was while timing.

Shared by the ``bench/*.py`` scripts so that they describe the CPU, the threads and the load the same
way: a timing taken while another job held a core is not comparable to an idle one , so
each script prints how many cores *other* processes used during its timed rounds. The helpers the library's
own benchmarks need too (CPU model and flags, busy ticks, percentiles) live in :mod:`micronet.machine`.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from pathlib import Path

from micronet.machine import busy_ticks, cpu_flags, cpu_model, others_cores, percentile

__all__ = ["busy_ticks", "cpu_busy", "cpu_flags", "cpu_model", "machine_header", "machine_meta", "others_cores",
           "percentile", "wait_idle"]


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy (any process, ours included) over ``seconds``, from /proc/stat."""
    def read() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle
    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_idle(limit_s: float, threshold: float = 0.25) -> tuple[float | None, float]:
    """Wait (up to ``limit_s``) until the CPUs are less than ``threshold`` busy for two seconds in a row.
    Returns (last busy fraction seen, seconds waited). Other jobs holding a core make 2-thread OpenMP
    regions wait on a descheduled thread: steps then run several times slower, and models with many
    small ops suffer most, which distorts the ratios too."""
    start = time.perf_counter()
    busy = cpu_busy()
    calm = 0
    while busy is not None and time.perf_counter() - start < limit_s:
        calm = calm + 1 if busy < threshold else 0
        if calm >= 2:
            break
        busy = cpu_busy()
    return busy, time.perf_counter() - start


def machine_meta() -> dict:
    """Date, versions, CPU, threads and load, as a JSON-ready dict (call after setting the thread count)."""
    import torch

    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "os_cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "loadavg": os.getloadavg(),
        "cpu_busy_at_start": cpu_busy(),
    }


def machine_header(meta: dict) -> str:
    """Two lines describing :func:`machine_meta`'s result."""
    load, busy = meta["loadavg"], meta["cpu_busy_at_start"]
    return (f"torch {meta['torch']} | cpu capability {meta['cpu_capability']} | {meta['cpu']} | flags: {meta['cpu_flags']}\n"
            f"threads {meta['threads']} (OMP_NUM_THREADS={meta['OMP_NUM_THREADS']}, {meta['os_cpu_count']} CPUs) | "
            f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} | CPUs "
            + ("?" if busy is None else f"{100 * busy:.0f}%") + " busy now (load avg lags by a minute or more)")


def write_results(meta: dict, results: list, json_path: str | None, *, complete: bool = False) -> None:
    """Write the meta data and the results so far as JSON (atomically), marked ``complete`` or not: a run cut
    off by a time limit keeps the rows it finished."""
    import json

    if not json_path:
        return
    path = Path(json_path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"meta": meta, "complete": complete, "results": results}, indent=1))
    partial.replace(path)


def finish(meta: dict, results: list, json_path: str | None) -> None:
    """Print the closing load average and, with ``json_path``, write the meta data and results as JSON."""
    end = os.getloadavg()
    print(f"\nload avg at end {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}")
    if json_path:
        meta["loadavg_end"] = end
        write_results(meta, results, json_path, complete=True)
        print(f"wrote {json_path}")
