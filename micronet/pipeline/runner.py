"""Run a pipeline: each step once, cached by fingerprint, resumed where it was interrupted.

A step's fingerprint hashes its command line, its data options and the fingerprints of the steps it reads,
so changing one step re-runs it and everything downstream, and nothing else. Each step folder holds
``pipeline_step.json``: ``running`` while the step works, ``done`` once its artifact is complete (written
atomically, so a SIGKILL leaves either the old record or the new one). A training step found ``running``
with the same fingerprint continues from its last epoch checkpoint; any other unfinished step starts over.

A ``done`` step is trusted only while its artifact verifies (the checkpoint's tensor files against the
sizes and SHA-256 in its ``micronet.json``); a damaged or missing one is rebuilt. A step folder is cleared
before a step starts over only when the pipeline wrote it (it holds ``pipeline_step.json``), and then only
of the files micronet writes there: a folder of someone else's, or one with foreign files, is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from micronet.errors import MicronetError, PipelineError
from micronet.io import atomic_write_text
from micronet.outputs import MEASURE_RECORD, STEP_RECORD, check_writable, foreign_entries, holds_nothing, remove_path
from micronet.pipeline.config import PipelineConfig, Step, load_config, step_argv, step_options

REPORT_FILE = "report.json"
SENSITIVITY_FILE = "sensitivity.json"
CONFIG_COPY = "pipeline.yaml"
_RESUMABLE = {"train", "finetune", "quantize"}  # commands that write OUT/last every epoch


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprints(config: PipelineConfig) -> dict[str, str]:
    """Each step's fingerprint: its command line with input folders replaced by the inputs' fingerprints."""
    out: dict[str, str] = {}
    for step in config.steps:
        argv = step_argv(config, step)
        source = None
        if step.source is not None:
            source = out[step.source] if config.is_step(step.source) else _checkpoint_fingerprint(step.source)
            argv = [arg.replace(str(config.step_dir(step.source)), f"<{source}>") for arg in argv]
        skip = out[step.skip_from] if step.skip_from else None  # a new ranking re-runs the step
        if step.skip_from:
            argv = [arg.replace(str(config.step_dir(step.skip_from)), f"<{skip}>") for arg in argv]
        teacher = None  # a retrained teacher re-runs the step
        if step.distill_from:
            teacher = out[step.distill_from] if config.is_step(step.distill_from) else _checkpoint_fingerprint(step.distill_from)
            argv = [arg.replace(str(config.step_dir(step.distill_from)), f"<{teacher}>") for arg in argv]
        argv = [arg.replace(str(config.step_dir(step.name)), "<out>") for arg in argv]
        user = _user_model_fingerprint(step)  # an edited model file or new weights re-run the step
        out[step.name] = _hash({"argv": argv, "source": source, **({"skip": skip} if skip else {}),
                                **({"teacher": teacher} if teacher else {}), **({"user_model": user} if user else {})})
    return out


def _user_model_fingerprint(step: Step) -> str | None:
    """The contents of a step's own model: its .py file (an importable module is named only) and weights file."""
    if step.model is None:
        return None
    files = [Path(step.model.rpartition(":")[0]), *([Path(step.weights)] if step.weights else [])]
    return _hash([hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else str(file) for file in files])


def _checkpoint_fingerprint(folder: str) -> str:
    """A checkpoint given by path: its description (architecture, metrics, tensor file hashes) names it."""
    from micronet.engine.checkpoint import META_FILE, resolve_checkpoint

    return _hash((resolve_checkpoint(folder) / META_FILE).read_text())


def _artifact_problem(folder: Path, step: Step) -> str | None:
    """Why the artifact of a finished step cannot be trusted (missing, truncated, edited), or None."""
    if step.run == "sensitivity":
        from micronet.analysis.sensitivity import SENSITIVITY_OUTPUT, SKIP_FILE

        if not SENSITIVITY_OUTPUT.recognise(folder) or not (folder / SKIP_FILE).is_file():
            return f"{folder / SENSITIVITY_FILE} or {folder / SKIP_FILE} is missing or unreadable"
        return None
    from micronet.engine.checkpoint import resolve_checkpoint, verify_checkpoint

    try:
        verify_checkpoint(resolve_checkpoint(folder))
    except MicronetError as exc:
        return str(exc)
    return None


def _step_folder_entries() -> frozenset[str]:
    """Everything a step's command and the measurements write into a step folder."""
    from micronet.analysis.sensitivity import SENSITIVITY_OUTPUT
    from micronet.engine.checkpoint import CHECKPOINT_OUTPUT
    from micronet.engine.trainer import RUN_OUTPUT
    from micronet.pipeline.measure import ONNX_FILE, PACKED_DIR

    return RUN_OUTPUT.entries | CHECKPOINT_OUTPUT.entries | SENSITIVITY_OUTPUT.entries | {ONNX_FILE, PACKED_DIR}


def _clear_step_folder(folder: Path, step: Step) -> None:
    """Empty a step folder before its step starts over, removing only what the pipeline wrote there."""
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir():
        raise PipelineError(f"{folder} is a file, not the folder of step {step.name!r}: move it away or choose another out")
    entries = _step_folder_entries()
    if not holds_nothing(folder, entries) and not (folder / STEP_RECORD).is_file():
        raise PipelineError(f"{folder} exists and the pipeline did not write it (no {STEP_RECORD}), so step "
                            f"{step.name!r} will not replace it: move it away or choose another out")
    foreign = foreign_entries(folder, entries)
    if foreign:
        raise PipelineError(f"{folder} holds {', '.join(foreign[:3])}{' and more' if len(foreign) > 3 else ''}, which "
                            f"the pipeline did not write: move it out of the folder of step {step.name!r}, which runs again")
    for child in folder.iterdir():
        remove_path(child)


def _check_out(config: PipelineConfig) -> None:
    """Refuse an output folder that is a file, that cannot be written, or that holds other files than a
    pipeline's, before any step runs."""
    out = config.out
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{config.path}: the output folder {out} is a file: choose another `out` (or --out)")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_COPY).is_file():
        raise PipelineError(f"{config.path}: the output folder {out} is not empty and holds no {CONFIG_COPY}, so it is "
                            "not a pipeline's output: choose another `out` (or --out)")
    check_writable(out, flag="out")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _run_workflow(config: PipelineConfig, step: Step, resume: Path | None) -> None:
    """Run the workflow of ``step`` in this process; its errors propagate as exceptions."""
    from micronet.workflows import VERBS

    options, given = step_options(config, step, resume=resume)
    workflow = VERBS[step.command][1]
    if step.command in ("train", "quantize"):  # the workflows that resume: they check the options given again
        workflow(options, given=given)
    else:
        workflow(options)


def _run_step(config: PipelineConfig, step: Step, fingerprint: str, echo: Callable[[str], None]) -> str:
    """Bring one step up to date; returns what happened: cached, resumed or ran."""
    folder = config.step_dir(step.name)
    record = _read_json(folder / STEP_RECORD) or {}
    same = record.get("fingerprint") == fingerprint
    if same and record.get("status") == "done":
        problem = _artifact_problem(folder, step)
        if problem is None:
            echo(f"[{step.name}] up to date ({record.get('seconds', 0):.0f} s when it ran)")
            return "cached"
        echo(f"[{step.name}] its artifact in {folder} is gone or damaged ({problem}): running it again")
        record = {}
    argv = step_argv(config, step)
    resume = same and record.get("status") == "running" and step.run in _RESUMABLE and (folder / "last").is_dir()
    if resume:
        argv += ["--resume", str(folder)]
        echo(f"[{step.name}] resuming the interrupted run: micronet {' '.join(argv)}")
    else:
        _clear_step_folder(folder, step)
        echo(f"[{step.name}] micronet {' '.join(argv)}")
    folder.mkdir(parents=True, exist_ok=True)
    spent = float(record.get("seconds", 0.0)) if resume else 0.0
    _write_json(folder / STEP_RECORD, {"status": "running", "fingerprint": fingerprint, "argv": argv, "seconds": spent})
    start = time.perf_counter()
    _run_workflow(config, step, folder if resume else None)
    seconds = spent + time.perf_counter() - start
    _write_json(folder / STEP_RECORD, {"status": "done", "fingerprint": fingerprint, "argv": argv, "seconds": seconds,
                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return "resumed" if resume else "ran"


def _load_splits(config: PipelineConfig) -> Any:
    from micronet.data import load_dataset

    data = config.data
    return load_dataset(str(data.get("data", "fashion-mnist")), data.get("data_root"),
                        val_fraction=float(data.get("val_fraction", 0.1)), seed=int(data.get("data_seed", 0)),
                        train_subset=data.get("train_subset"), test_subset=data.get("test_subset"))


def _measure_rows(config: PipelineConfig, prints: dict[str, str], echo: Callable[[str], None]) -> list[dict[str, Any]]:
    from micronet.pipeline.measure import measure_model

    splits = None
    rows = []
    for step in config.rows:
        folder = config.step_dir(step.name)
        key = _hash({"step": prints[step.name], "row": step.row, "measure": config.measure})
        cached = _read_json(folder / MEASURE_RECORD)
        if cached and cached.get("fingerprint") == key:
            rows.append(cached["row"])
            continue
        echo(f"[{step.name}] measuring: size, FLOPs, ONNX export, ONNX Runtime accuracy and latency")
        splits = splits or _load_splits(config)
        start = time.perf_counter()
        row = {"name": step.name, **measure_model(folder, step.row, splits, config.measure)}
        row["seconds"] = time.perf_counter() - start
        _write_json(folder / MEASURE_RECORD, {"fingerprint": key, "row": row})
        rows.append(row)
    return rows


def _with_baseline(rows: list[dict[str, Any]], baseline: str | None) -> str | None:
    """Fill ``compression`` and ``loss`` against the FP32 baseline row."""
    name = baseline or next((r["name"] for r in rows if not r["quantized"] and r["w_bits"] == 32), None)
    base = next((r for r in rows if r["name"] == name), None)
    for row in rows:
        row["compression"] = None if base is None else 1 - row["size_mb"] / base["size_mb"]
        row["loss"] = None if base is None else base["acc_torch"] - row["acc_torch"]
    return name


def _publish_sensitivity(config: PipelineConfig) -> None:
    """Put the (last) sensitivity step's result beside report.json, where the report looks for it."""
    target = config.out / SENSITIVITY_FILE
    steps = [step for step in config.steps if step.run == "sensitivity"]
    if not steps:
        target.unlink(missing_ok=True)
        return
    source = config.step_dir(steps[-1].name) / SENSITIVITY_FILE
    if not source.is_file():
        raise PipelineError(f"step {steps[-1].name!r} finished without writing {source}")
    atomic_write_text(target, source.read_text())


def _machine(threads: int) -> dict[str, Any]:
    import os

    import onnxruntime
    import torch

    from micronet.deploy.openvino import openvino_version
    from micronet.machine import cpu_class, cpu_model

    return {"cpu": cpu_model(), "cpu_class": cpu_class(), "cores": os.cpu_count(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "openvino": openvino_version(), "threads": threads}


def run_pipeline(config: PipelineConfig | str | Path, *, out: str | Path | None = None,
                 echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every step of ``config``, measure its table rows, write ``report.json`` and render
    the report; returns the report. Steps whose inputs and options did not change are not re-run."""
    if not isinstance(config, PipelineConfig):
        config = load_config(config, out=out)
    prints = fingerprints(config)
    _check_out(config)
    config.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config.out / CONFIG_COPY, config.path.read_text())
    start = time.perf_counter()
    for step in config.steps:
        try:
            _run_step(config, step, prints[step.name], echo)
        except KeyboardInterrupt:
            echo(f"[{step.name}] interrupted: run the same command again to continue from here")
            raise
    _publish_sensitivity(config)
    rows = _measure_rows(config, prints, echo)
    baseline = _with_baseline(rows, config.baseline)
    step_seconds = [{"step": s.name, "run": s.run,
                      "seconds": float((_read_json(config.step_dir(s.name) / STEP_RECORD) or {}).get("seconds", 0))}
                     for s in config.steps]
    step_seconds += [{"step": row["name"], "run": "measure", "seconds": float(row.get("seconds", 0))} for row in rows]
    compute = sum(entry["seconds"] for entry in step_seconds)
    report = {
        "name": config.name, "config": str(config.path), "data": config.data.get("data", "fashion-mnist"),
        "test_images": rows[0].get("test_images") if rows else None,
        "machine": _machine(int(config.measure.get("threads", 1))), "baseline": baseline,
        "wall_time_s": compute, "this_run_s": time.perf_counter() - start, "rows": rows, "step_seconds": step_seconds,
    }
    _write_json(config.out / REPORT_FILE, report)
    from micronet.pipeline.report import render_report

    for path in render_report(config.out):
        echo(f"wrote {path}")
    return report
