"""The pipeline: config checks before anything runs, caching, resume after SIGINT / SIGKILL, the smoke run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from micronet.engine import save_checkpoint
from micronet.errors import MicronetError, PipelineError
from micronet.models import build_model
from micronet.pipeline import load_config, run_pipeline
from micronet.pipeline.report import consistency_problems

ROOT = Path(__file__).resolve().parents[1]

TINY = """\
name: tiny
data: {{data: fashion-mnist, train_subset: {train}, test_subset: 200}}
measure: {{onnx: false}}
steps:
  - name: fp32
    run: train
    args: {{model: lenet, epochs: 1, no-progress: true}}
    row: FP32
  - name: tuned
    run: train
    from: fp32
    args: {{epochs: {tuned_epochs}, lr: 0.01, no-progress: true}}
  - name: ptq
    run: quantize
    from: fp32
    args: {{method: iao, ptq: true, ptq_batch: {ptq_batch}, batch-size: 32}}
    row: W8A8 PTQ
"""


def _write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _tiny(tmp_path: Path, *, train: int = 600, tuned_epochs: int = 1, ptq_batch: int = 2) -> Path:
    return _write(tmp_path, TINY.format(train=train, tuned_epochs=tuned_epochs, ptq_batch=ptq_batch))


def _run(path: Path, out: Path) -> list[str]:
    lines: list[str] = []
    run_pipeline(path, out=out, echo=lines.append)
    return lines


def _ran(lines: list[str]) -> list[str]:
    """Steps that ran (not cached) according to the pipeline's messages."""
    return [line.split("]")[0][1:] for line in lines if line.startswith("[") and "] micronet " in line]


BAD_CONFIGS = [
    ("steps:\n  - name: a\n    run: distill\n", ["line 2", "unknown step kind 'distill'", "train"]),
    ("steps:\n  - name: a\n    run: train\n    args: {epochz: 1}\n", ["line 2", "has no option --epochz"]),
    ("steps:\n  - name: a\n    run: train\n    args: {optimizer: rmsprop}\n", ["line 2", "invalid choice"]),
    ("steps:\n  - name: a\n    run: quantize\n    from: nowhere\n    args: {method: iao}\n",
     ["line 2", "neither an earlier step", "nor an existing checkpoint folder"]),
    ("steps:\n  - name: a\n    run: prune\n", ["line 2", "needs `from: <an earlier step>`"]),
    ("steps:\n  - name: a\n    run: train\n    args: {out: x}\n", ["the pipeline sets out itself"]),
    ("steps:\n  - name: a\n    run: train\n    args: {\"--out\": /elsewhere}\n", ["line 2", "the pipeline sets --out itself"]),
    ("steps:\n  - name: a\n    run: train\n    args: {data-root: x}\n", ["line 2", "the pipeline sets data-root itself"]),
    ("steps:\n  - name: a\n    run: train\n    args: {overwrite: true}\n", ["line 2", "the pipeline sets overwrite itself"]),
    ("steps:\n  - name: a\n    run: train\n  - name: b\n    run: finetune\n    from: a\n",
     ["line 4", "finetune starts from a prune step"]),
    ("steps:\n  - name: a\n    run: train\n  - name: a\n    run: train\n", ["line 4", "two steps are named 'a'"]),
    ("data: {data: cifar10}\nsteps:\n  - name: a\n    run: train\n", ["CIFAR-10", "data_root"]),
    ("steps:\n  - name: a\n    run: train\n    args: {epochs: [1, 2\n", ["YAML error at line"]),
    ("stepz: []\n", ["unknown key(s) stepz"]),
    ("steps:\n  - name: a\n    run: train\n  - name: b\n    run: quantize\n    from: a\n    skip_from: a\n"
     "    args: {method: iao}\n", ["line 4", "skip_from: a is not an earlier sensitivity step"]),
    ("steps: []\n", ["`steps` must be a non-empty list"]),
    ("steps:\n  - name: a\n    run: train\n  - name: b\n    run: prune\n    from: a\n    distill_from: a\n",
     ["line 4", "distill_from belongs to a train, finetune or quantize step"]),
    ("steps:\n  - name: a\n    run: train\n    distill_from: later\n", ["line 2", "`distill_from: later` is neither"]),
]


@pytest.mark.parametrize(("text", "fragments"), BAD_CONFIGS)
def test_bad_config_fails_before_anything_runs(tmp_path, text, fragments):
    path = _write(tmp_path, text)
    with pytest.raises(PipelineError) as error:
        run_pipeline(path, out=tmp_path / "out")
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)
    assert str(path) in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing started


def test_shipped_configs_parse(tmp_path):
    """Every config in configs/ checks out (CIFAR-10 ones against a stand-in folder: the check is the parse)."""
    names = sorted(path.name for path in (ROOT / "configs").glob("*.yaml"))
    assert {"default.yaml", "smoke.yaml", "cifar10_nin.yaml"} <= set(names)
    for name in names:
        text = (ROOT / "configs" / name).read_text().replace("~/cifar-10-batches-py", str(tmp_path))
        config = load_config(_write(tmp_path, text, name))
        assert config.rows, name
    default = load_config(ROOT / "configs" / "default.yaml")
    assert len(default.rows) >= 8


def test_missing_config_file(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_unchanged_steps_are_cached_and_changes_rerun_downstream_only(tmp_path):
    out = tmp_path / "out"
    assert _ran(_run(_tiny(tmp_path), out)) == ["fp32", "tuned", "ptq"]
    record = json.loads((out / "fp32" / "pipeline_step.json").read_text())

    again = _run(_tiny(tmp_path), out)
    assert _ran(again) == []
    assert not any("measuring" in line for line in again)
    assert json.loads((out / "fp32" / "pipeline_step.json").read_text()) == record

    assert _ran(_run(_tiny(tmp_path, ptq_batch=3), out)) == ["ptq"]  # only the changed step
    assert _ran(_run(_tiny(tmp_path, train=700), out)) == ["fp32", "tuned", "ptq"]  # data change: everything

    report = json.loads((out / "report.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["fp32", "ptq"]
    assert report["baseline"] == "fp32"
    assert consistency_problems(report) == []


DISTILLED = """\
name: distilled
data: {{data: fashion-mnist, train_subset: 600, test_subset: 200}}
measure: {{onnx: false}}
steps:
  - name: fp32
    run: train
    args: {{model: lenet, epochs: {teacher_epochs}, no-progress: true}}
  - name: binary
    run: quantize
    from: fp32
    distill_from: fp32
    args: {{method: wbwtab, epochs: 1, lr: 0.005, no-progress: true}}
  - name: student
    run: train
    distill_from: fp32
    args: {{model: lenet, epochs: 1, distill-temperature: 2, no-progress: true}}
"""


def test_distill_from_an_earlier_step(tmp_path):
    out = tmp_path / "out"
    config = _write(tmp_path, DISTILLED.format(teacher_epochs=1))
    assert _ran(_run(config, out)) == ["fp32", "binary", "student"]
    hooks = {name: json.loads((out / name / "last" / "micronet.json").read_text())["training"]["hooks"]
             for name in ("binary", "student")}
    assert hooks["binary"] == [{"kind": "distillation", "teacher": str(out / "fp32"), "weight": 1.0, "temperature": 4.0}]
    assert hooks["student"][0]["temperature"] == 2.0
    assert _ran(_run(config, out)) == []
    # a retrained teacher re-runs the students, even the one that does not start from it
    assert _ran(_run(_write(tmp_path, DISTILLED.format(teacher_epochs=2)), out)) == ["fp32", "binary", "student"]


def test_a_deleted_artifact_is_rebuilt(tmp_path):
    out = tmp_path / "out"
    _run(_tiny(tmp_path), out)
    import shutil

    shutil.rmtree(out / "ptq" / "best")
    lines = _run(_tiny(tmp_path), out)
    assert _ran(lines) == ["ptq"]
    assert any("artifact" in line and "gone" in line for line in lines)


def test_from_an_existing_checkpoint_folder(tmp_path):
    out = tmp_path / "out"
    _run(_tiny(tmp_path), out)
    external = _write(tmp_path, f"""\
        data: {{data: fashion-mnist, train_subset: 600, test_subset: 200}}
        measure: {{onnx: false}}
        steps:
          - name: ptq
            run: quantize
            from: {out / 'fp32'}
            args: {{method: iao, ptq: true, ptq_batch: 2, batch-size: 32}}
            row: W8A8 PTQ
        """, "external.yaml")
    report = run_pipeline(external, out=tmp_path / "external", echo=lambda _: None)
    assert report["rows"][0]["w_bits"] == 7  # the default (portable) target: 7-bit weights
    assert report["baseline"] is None  # no FP32 row in this pipeline: nothing to compare with


def _start(config: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "micronet.cli", "pipeline", "--config", str(config), "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """A test runner started in the background (nohup, CI) ignores SIGINT, and a child that inherits the
    ignore never sees Ctrl-C: restore the default so Python installs its KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_epoch(out: Path, step: str, process: subprocess.Popen, timeout: float = 240) -> None:
    """Until ``step`` is running and has written at least one epoch checkpoint."""
    deadline = time.monotonic() + timeout
    record = out / step / "pipeline_step.json"
    while time.monotonic() < deadline:
        if (out / step / "last").is_dir() and record.is_file() and '"running"' in record.read_text():
            return
        if process.poll() is not None:
            pytest.fail(f"the pipeline ended before {step} ran an epoch:\n{process.stdout.read()}")
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"{step} wrote no epoch checkpoint in {timeout} s")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_pipeline_resumes_where_it_stopped(tmp_path, how):
    config = _tiny(tmp_path, train=3000, tuned_epochs=8)
    out = tmp_path / "out"
    process = _start(config, out)
    _wait_for_epoch(out, "tuned", process)
    os.killpg(process.pid, how)
    output, _ = process.communicate(timeout=60)
    if how == signal.SIGINT:
        assert process.returncode == 130, output
        assert "interrupted" in output
    else:
        assert process.returncode == -signal.SIGKILL
    finished = json.loads((out / "fp32" / "pipeline_step.json").read_text())
    assert json.loads((out / "tuned" / "pipeline_step.json").read_text())["status"] == "running"

    lines = _run(config, out)
    assert json.loads((out / "fp32" / "pipeline_step.json").read_text()) == finished  # not redone
    assert any(line.startswith("[tuned] resuming") for line in lines), lines
    epochs = [json.loads(line)["epoch"] for line in (out / "tuned" / "log.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 9))  # every epoch once: the resumed run continued, it did not restart
    assert json.loads((out / "tuned" / "pipeline_step.json").read_text())["status"] == "done"


def test_smoke_config_end_to_end(tmp_path):
    """configs/smoke.yaml (what CI runs): every step kind, ONNX export, ORT accuracy and latency, the report."""
    out = tmp_path / "smoke"
    report = run_pipeline(ROOT / "configs" / "smoke.yaml", out=out, echo=lambda _: None)
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {"fp32", "pruned_ft", "iao_ptq", "dorefa_w4a4", "binary", "iao_w8a8_mixed"}
    assert consistency_problems(report) == []
    for row in rows.values():
        assert row["errors"] == [], row
        assert row["acc_ort"] is not None and row["latency_ms_b1"] > 0 and row["latency_ms_b64"] > 0
        assert row["file_mb"] == pytest.approx((out / row["name"] / "model.onnx").stat().st_size / 1e6)
    assert rows["binary"]["packed_latency_ms_b1"] > 0 and rows["binary"]["packed_latency_ms_b64"] > 0
    assert all("packed_latency_ms_b1" not in row for name, row in rows.items() if name != "binary")
    assert "Packed b64 (ms)" in (out / "report.md").read_text()
    int8 = [row for row in rows.values() if row["int8_onnx"]]
    assert {row["name"] for row in int8} == {"iao_ptq", "dorefa_w4a4", "binary", "iao_w8a8_mixed"}
    for row in int8:
        assert abs(row["acc_ort"] - row["acc_torch"]) <= 0.5
    assert rows["pruned_ft"]["params_m"] < 0.6 * rows["fp32"]["params_m"]
    assert rows["binary"]["packed_mb"] < rows["fp32"]["size_mb"] / 4
    assert rows["iao_ptq"]["size_mb"] == pytest.approx(rows["fp32"]["size_mb"] / 4, rel=0.1)
    for name in ("report.md", "report.json", "accuracy_vs_size.png", "latency.png", "sensitivity.json",
                 "sensitivity.png"):
        assert (out / name).is_file(), name
    skipped = json.loads((out / "sensitivity.json").read_text())["skip"]
    assert len(skipped) == 1  # top: 1, and the mixed-precision step kept exactly that layer in float
    from micronet.engine import load_checkpoint

    mixed = load_checkpoint(out / "iao_w8a8_mixed" / "best")
    assert list(mixed.quant_scheme.skip) == skipped
    markdown = (out / "report.md").read_text()
    assert f"{rows['binary']['acc_torch']:.2f}" in markdown
    assert "All checks pass" in markdown


SYNTHETIC = """\
name: synth
data: {{data: synthetic, train_subset: 256, test_subset: 64}}
measure: {{onnx: false}}
steps:
  - name: fp32
    run: train
    args: {{model: lenet, epochs: 1, batch-size: 32, no-progress: true}}
  - name: fused
    run: fuse
    from: fp32
    args: {{no-eval: true, batch-size: {batch}}}
"""


def test_a_damaged_artifact_is_rebuilt_and_a_folder_the_pipeline_did_not_write_is_never_removed(tmp_path):
    out = tmp_path / "out"
    config = _write(tmp_path, SYNTHETIC.format(batch=512))
    assert _ran(_run(config, out)) == ["fp32", "fused"]

    weights = out / "fused" / "model.safetensors"  # truncated: the cache must not trust it
    weights.write_bytes(weights.read_bytes()[:100])
    lines = _run(config, out)
    assert _ran(lines) == ["fused"]
    assert any("[fused] its artifact" in line and "truncated" in line for line in lines), lines

    meta_path = out / "fp32" / "best" / "micronet.json"  # no file hashes: nothing to verify, so not trusted
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))
    lines = _run(config, out)
    assert _ran(lines) == ["fp32"]
    assert any("records no size and SHA-256" in line for line in lines), lines
    assert _ran(_run(config, out)) == []

    (out / "fused" / "notes.txt").write_text("mine")  # the user's file in a step folder that must run again
    with pytest.raises(PipelineError, match=r"out/fused holds notes.txt, which the pipeline did not write"):
        _run(_write(tmp_path, SYNTHETIC.format(batch=256)), out)
    assert (out / "fused" / "notes.txt").read_text() == "mine" and (out / "fused" / "micronet.json").is_file()

    import shutil

    shutil.rmtree(out / "fused")  # a folder named like a step, not written by the pipeline
    (out / "fused").mkdir()
    (out / "fused" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match=r"out/fused exists and the pipeline did not write it"):
        _run(config, out)
    assert [p.name for p in (out / "fused").iterdir()] == ["notes.txt"]


def test_output_folder_that_is_a_file_or_holds_other_files_is_refused(tmp_path):
    config = _write(tmp_path, SYNTHETIC.format(batch=512))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(MicronetError, match="a_file is a file"):
        run_pipeline(config, out=tmp_path / "a_file")
    with pytest.raises(MicronetError, match="cannot be created: .*a_file is a file"):
        run_pipeline(config, out=tmp_path / "a_file" / "out")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="is not empty and holds no pipeline.yaml"):
        run_pipeline(config, out=mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_paths_in_a_config_are_relative_to_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    save_checkpoint(folder / "models" / "teacher", build_model("lenet", 10, 1))
    config = _write(tmp_path, "", "unused.yaml")
    (folder / "configs").mkdir()
    config = folder / "configs" / "p.yaml"
    config.write_text("out: ../results\ndata: {data: cifar10, data_root: ../data}\nsteps:\n"
                      "  - name: q\n    run: quantize\n    from: ../models/teacher\n    args: {method: iao, ptq: true}\n")
    (folder / "data").mkdir()
    monkeypatch.chdir(tmp_path)  # anywhere else: the paths do not depend on it
    loaded = load_config(config)
    assert loaded.out == folder / "results"
    assert loaded.data["data_root"] == str(folder / "data")
    assert loaded.step_dir("q") == folder / "results" / "q"
    assert Path(loaded.step("q").source) == folder / "models" / "teacher"
