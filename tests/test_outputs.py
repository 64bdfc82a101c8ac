"""Output paths: no command replaces what micronet did not write for that purpose, or writes before checking.

Every command that writes is checked three ways: an existing output of its own kind is refused without
``--overwrite``; a folder (or file) holding something else is refused even with it, and left untouched; a path
that cannot be written fails in one line before any work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from micronet.cli import main
from micronet.compression.packing import save_packed
from micronet.engine import load_checkpoint, save_checkpoint
from micronet.engine.checkpoint import verify_checkpoint
from micronet.errors import CheckpointError, OutputError
from micronet.io import atomic_write_text, remove_leftovers
from micronet.models import build_model


def _lenet():
    torch.manual_seed(0)
    return build_model("lenet", 10, 1)


@pytest.fixture
def run(tmp_path) -> Path:
    """A training run folder as `micronet train` leaves it: best/, last/ and log.jsonl."""
    folder = tmp_path / "run"
    save_checkpoint(folder / "best", _lenet())
    save_checkpoint(folder / "last", _lenet(), training={"epoch": 1})
    (folder / "log.jsonl").write_text('{"epoch": 1}\n')
    return folder


@pytest.fixture
def user_folder(tmp_path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's own file\n")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ the library's last line of defence
def test_save_checkpoint_never_swaps_away_a_run_or_a_users_folder(run, user_folder):
    before = _snapshot(run)
    with pytest.raises(OutputError, match="holds best, last, log.jsonl, which are not the files of a checkpoint"):
        save_checkpoint(run, _lenet())
    assert _snapshot(run) == before
    with pytest.raises(OutputError, match="notes.txt"):
        save_packed(_lenet(), user_folder)
    assert (user_folder / "notes.txt").read_text() == "the user's own file\n"


def test_save_checkpoint_replaces_its_own_kind(tmp_path):
    save_checkpoint(tmp_path / "ck", _lenet())
    model = _lenet()
    with torch.no_grad():
        model.fc2.weight.add_(1)  # a different model, so the replacement is visible
    save_checkpoint(tmp_path / "ck", model)
    assert torch.equal(load_checkpoint(tmp_path / "ck").state_dict["fc2.weight"], model.fc2.weight)


# ------------------------------------------------------------------ one test per command
def test_train_refuses_an_existing_run_and_overwrite_replaces_only_micronets_files(run, cli_fails):
    args = ["train", "--model", "lenet", "--data", "synthetic", "--train-subset", "256", "--test-subset", "64", "--epochs",
            "1", "--batch-size", "32", "--no-progress", "--out", str(run)]
    before = _snapshot(run)
    cli_fails(args, f"--out {run} already holds a training run", "--overwrite")
    assert _snapshot(run) == before
    (run / "prune_report.json").write_text("{}")  # a stale file of the old run must not survive the overwrite
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["best", "last", "log.jsonl"]
    assert load_checkpoint(run / "best").metrics["test_acc"] >= 0  # the new run, tested
    assert len((run / "log.jsonl").read_text().splitlines()) == 1


def test_train_into_a_users_folder_is_refused_even_with_overwrite(user_folder, cli_fails):
    for extra in ([], ["--overwrite"]):
        cli_fails(["train", "--model", "lenet", "--data", "synthetic", "--out", str(user_folder), *extra],
                  f"--out {user_folder} already exists and holds notes.txt", "which are not the files of a training run")
    assert [p.name for p in user_folder.iterdir()] == ["notes.txt"]


def test_quantize_refuses_a_users_folder(run, user_folder, cli_fails):
    cli_fails(["quantize", "iao", "--checkpoint", str(run), "--data", "synthetic", "--ptq", "--out", str(user_folder),
               "--overwrite"], "holds notes.txt")
    cli_fails(["quantize", "iao", "--checkpoint", str(run), "--data", "synthetic", "--ptq", "--out", str(run)],
              f"--out {run} already holds a training run", "--overwrite")


def test_prune_refuses_an_existing_run(run, user_folder, cli_fails):
    cli_fails(["prune", "--checkpoint", str(run), "--out", str(run), "--no-eval"], "already holds a training run")
    cli_fails(["prune", "--checkpoint", str(run), "--out", str(user_folder), "--no-eval", "--overwrite"], "holds notes.txt")


def test_fuse_into_its_own_run_is_refused_and_the_run_survives(run, tmp_path, cli_fails):
    before = _snapshot(run)
    for extra in ([], ["--overwrite"]):
        cli_fails(["fuse", "--checkpoint", str(run), "--out", str(run), "--no-eval", *extra],
                  "holds best, last, log.jsonl", "not the files of a checkpoint")
    cli_fails(["fuse", "--checkpoint", str(run), "--out", str(tmp_path), "--no-eval", "--overwrite"], "holds")
    assert _snapshot(run) == before
    fused = tmp_path / "fused"
    assert main(["fuse", "--checkpoint", str(run), "--out", str(fused), "--no-eval"]) == 0
    cli_fails(["fuse", "--checkpoint", str(run), "--out", str(fused), "--no-eval"],
              f"--out {fused} already holds a checkpoint", "--overwrite")
    assert main(["fuse", "--checkpoint", str(run), "--out", str(fused), "--no-eval", "--overwrite"]) == 0
    verify_checkpoint(fused)


def test_pack_refuses_a_users_folder_and_replaces_its_own_artifact(run, user_folder, tmp_path, cli_fails):
    cli_fails(["pack", "--checkpoint", str(run), "--out", str(user_folder), "--overwrite"], "holds notes.txt")
    assert (user_folder / "notes.txt").is_file()
    packed = tmp_path / "packed"
    assert main(["pack", "--checkpoint", str(run), "--out", str(packed)]) == 0
    cli_fails(["pack", "--checkpoint", str(run), "--out", str(packed)], "already holds a packed artifact", "--overwrite")
    assert main(["pack", "--checkpoint", str(run), "--out", str(packed), "--overwrite"]) == 0


def test_export_refuses_a_file_it_did_not_write(run, tmp_path, cli_fails):
    other = tmp_path / "model.onnx"
    other.write_bytes(b"someone else's model")
    for extra in ([], ["--overwrite"]):
        cli_fails(["export", "--checkpoint", str(run), "--check-images", "0", "--exporter", "legacy", "--out", str(other), *extra],
                  f"--out {other} already exists and is not an ONNX file micronet wrote")
    assert other.read_bytes() == b"someone else's model"
    cli_fails(["export", "--checkpoint", str(run), "--check-images", "0", "--exporter", "legacy", "--out", str(tmp_path)],
              "is a folder, not a file")
    mine = tmp_path / "mine.onnx"
    assert main(["export", "--checkpoint", str(run), "--check-images", "0", "--exporter", "legacy", "--out", str(mine)]) == 0
    cli_fails(["export", "--checkpoint", str(run), "--check-images", "0", "--exporter", "legacy", "--out", str(mine)],
              "already holds an ONNX file", "--overwrite")
    assert main(["export", "--checkpoint", str(run), "--check-images", "0", "--exporter", "legacy", "--out", str(mine), "--overwrite"]) == 0


def test_sensitivity_refuses_a_users_folder(run, user_folder, cli_fails):
    cli_fails(["sensitivity", "iao", "--checkpoint", str(run), "--data", "synthetic", "--out", str(user_folder),
               "--overwrite"], "holds notes.txt", "not the files of a sensitivity result")


def test_benchmark_json_refuses_a_file_it_did_not_write(tmp_path, cli_fails):
    other = tmp_path / "results.json"
    other.write_text('{"mine": 1}')
    cli_fails(["benchmark", "--onnx", str(tmp_path / "m.onnx"), "--json", str(other), "--overwrite"],
              f"--json {other} already exists and is not a benchmark result micronet wrote")
    assert other.read_text() == '{"mine": 1}'


# ------------------------------------------------------------------ paths that cannot be written
def test_out_under_a_file_fails_before_any_work(tmp_path, cli_fails):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    start = time.perf_counter()
    cli_fails(["train", "--model", "lenet", "--data", "synthetic", "--epochs", "50", "--out", str(blocker / "run")],
              f"--out {blocker / 'run'} cannot be created: {blocker} is a file")
    assert time.perf_counter() - start < 10  # refused before 50 epochs of training
    cli_fails(["fuse", "--checkpoint", str(tmp_path), "--out", str(blocker)], f"--out {blocker} is a file")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_out_fails_before_any_work(tmp_path, cli_fails):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        cli_fails(["train", "--model", "lenet", "--data", "synthetic", "--epochs", "50", "--out", str(locked / "run")],
                  f"--out {locked / 'run'} cannot be written", "choose a folder you can write to")
    finally:
        locked.chmod(0o700)


def test_an_oserror_while_writing_is_one_line(tmp_path, cli_fails, monkeypatch):
    import micronet.engine.checkpoint as checkpoint

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "fused"))

    save_checkpoint(tmp_path / "ck", _lenet())
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    cli_fails(["fuse", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "fused"), "--no-eval"],
              "No space left on device", str(tmp_path / "fused"))
    assert not (tmp_path / "fused").exists()


def test_negative_momentum_is_refused(cli_fails):
    cli_fails(["train", "--model", "lenet", "--data", "synthetic", "--momentum", "-1"], "momentum must be in [0, 1)")


# ------------------------------------------------------------------ leftovers of killed writers
def _leftover_of_a_killed_writer(folder: Path, name: str, suffix: str) -> Path:
    """A temporary file named as micronet names them, by a process that has exited."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = folder / f".{name}.{int(dead.stdout)}.abcd1234.{suffix}"
    if suffix == "staging":
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    else:
        path.write_bytes(b"half")
    return path


def test_leftovers_of_killed_writers_are_removed_on_the_next_write(tmp_path):
    tmp = _leftover_of_a_killed_writer(tmp_path, "log.jsonl", "tmp")
    staging = _leftover_of_a_killed_writer(tmp_path, "ck", "staging")
    legacy = tmp_path / ".log.jsonl.k2j4h5g6.tmp"  # named by an older micronet, without the process id
    legacy.write_bytes(b"half")
    alive = tmp_path / f".log.jsonl.{os.getpid()}.abcd1234.tmp"  # a writer that is still running
    alive.write_bytes(b"in progress")
    others = [tmp_path / ".log.jsonl.other", tmp_path / "log.jsonl.1.abcd1234.tmp", tmp_path / ".ck2.1.abcd1234.tmp"]
    for path in others:
        path.write_bytes(b"not ours")
    atomic_write_text(tmp_path / "log.jsonl", "{}\n")
    save_checkpoint(tmp_path / "ck", _lenet())
    assert not tmp.exists() and not staging.exists() and not legacy.exists()
    assert alive.exists() and all(path.exists() for path in others)
    assert remove_leftovers(tmp_path / "log.jsonl") == []


# ------------------------------------------------------------------ integrity records
def test_a_checkpoint_without_file_hashes_is_refused(tmp_path):
    save_checkpoint(tmp_path / "ck", _lenet())
    meta_path = tmp_path / "ck" / "micronet.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))
    for check in (load_checkpoint, verify_checkpoint):
        with pytest.raises(CheckpointError, match="records no size and SHA-256 for model.safetensors"):
            check(tmp_path / "ck")
