"""Checkpoints: safetensors + JSON round trips, and one clear error for every bad input."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from micronet.engine import TrainConfig, build_optimizer, load_checkpoint, load_model, save_checkpoint
from micronet.engine.checkpoint import CHECKPOINT_OUTPUT
from micronet.engine.state import optimizer_state_join, optimizer_state_split
from micronet.errors import CheckpointError
from micronet.io import atomic_directory, previous_version
from micronet.models import build_model


def _lenet():
    torch.manual_seed(0)
    return build_model("lenet", num_classes=10, in_channels=1)


def test_round_trip_rebuilds_identical_model(tmp_path):
    model = _lenet()
    save_checkpoint(tmp_path / "ck", model, metrics={"val_acc": 0.5})
    loaded = load_model(tmp_path / "ck")
    x = torch.randn(4, 1, 28, 28)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))
    meta = json.loads((tmp_path / "ck" / "micronet.json").read_text())
    assert meta["arch"]["name"] == "lenet" and meta["metrics"]["val_acc"] == 0.5
    assert meta["versions"]["torch"] == torch.__version__


def test_pruned_cfg_round_trips(tmp_path):
    model = build_model("nin", num_classes=10, in_channels=1, cfg=[8, 8, 8, 16, 16, 16, 16, 16])
    save_checkpoint(tmp_path / "ck", model)
    assert list(load_model(tmp_path / "ck").arch.cfg) == [8, 8, 8, 16, 16, 16, 16, 16]


def test_optimizer_state_round_trip_is_exact():
    model = _lenet()
    opt = build_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 1, 28, 28)).sum().backward()
        opt.step()
    tensors, described = optimizer_state_split(opt)
    described = json.loads(json.dumps(described))  # what the JSON file gives back
    fresh = build_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3))
    fresh.load_state_dict(optimizer_state_join(tensors, described))
    a, b = opt.state_dict(), fresh.state_dict()
    for idx in a["state"]:
        for key, value in a["state"][idx].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][idx][key]))


def test_truncated_safetensors_is_reported(tmp_path):
    save_checkpoint(tmp_path / "ck", _lenet())
    file = tmp_path / "ck" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "ck")


def test_corrupted_bytes_of_same_length_are_reported(tmp_path):
    save_checkpoint(tmp_path / "ck", _lenet())
    file = tmp_path / "ck" / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path / "ck")


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_MARKER",))


def test_pickle_file_is_refused_without_unpickling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "model.pth"
    bad.write_bytes(pickle.dumps(_Payload(), protocol=4))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(bad)
    # the same bytes disguised as a checkpoint's weight file
    save_checkpoint(tmp_path / "ck", _lenet())
    meta = json.loads((tmp_path / "ck" / "micronet.json").read_text())
    del meta["files"]
    (tmp_path / "ck" / "micronet.json").write_text(json.dumps(meta))
    (tmp_path / "ck" / "model.safetensors").write_bytes(bad.read_bytes())
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(tmp_path / "ck")
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_torch_save_zip_is_refused(tmp_path):
    torch.save(_lenet().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(tmp_path / "weights.pt")


def test_checkpoint_of_another_model_is_reported(tmp_path):
    save_checkpoint(tmp_path / "ck", _lenet())
    other = build_model("resnet20", num_classes=10, in_channels=1)
    with pytest.raises(CheckpointError, match="holds lenet .* does not fit resnet20"):
        load_checkpoint(tmp_path / "ck").load_into(other)


def test_checkpoint_of_other_cfg_is_reported(tmp_path):
    save_checkpoint(tmp_path / "ck", build_model("nin", 10, 1, cfg=[8, 8, 8, 16, 16, 16, 16, 16]))
    with pytest.raises(CheckpointError, match="shape differs"):
        load_checkpoint(tmp_path / "ck").load_into(build_model("nin", 10, 1))


def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no micronet.json"):
        load_checkpoint(tmp_path / "plain")


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path):
    model = _lenet()
    save_checkpoint(tmp_path / "ck", model, metrics={"epoch": 1})
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "ck", CHECKPOINT_OUTPUT) as staging:
            (staging / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("killed while writing")
    assert load_checkpoint(tmp_path / "ck").metrics == {"epoch": 1}
    assert not any(p.name.endswith(".staging") for p in tmp_path.iterdir())


def test_crash_between_the_two_renames_falls_back_to_previous(tmp_path):
    save_checkpoint(tmp_path / "ck", _lenet(), metrics={"epoch": 3})
    (tmp_path / "ck").rename(previous_version(tmp_path / "ck"))
    assert load_checkpoint(tmp_path / "ck").metrics == {"epoch": 3}


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    import os

    from micronet.io import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600: other users can read reports
