"""The user's own model (``MODULE:CALLABLE`` + a state dict file): building, safe weight loading, checkpoints
that rebuild it, and pruning / quantization / fusion of it through the Python API."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from micronet.compression.fusion import fuse
from micronet.compression.pruning import prune
from micronet.compression.quantization.core import calibrate, prepare
from micronet.compression.quantization.core.modules import default_scheme
from micronet.engine import load_checkpoint, save_checkpoint
from micronet.errors import CheckpointError, ModelConfigError
from micronet.models import build_model, model_arch
from micronet.models.external import parse_model_spec, resolve_callable
from micronet.models.state_dict import load_state_dict_file, load_weights_file

USER_MODEL = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))  # residual add


class TwoBranchNet(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.left(x), self.right(x)], dim=1)  # concat
        x = self.block(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small(num_classes):
    return TwoBranchNet(num_classes=num_classes, in_channels=1)


class NamedNet(TwoBranchNet):
    """A network that keeps a name of its own in ``arch`` and reads it in forward."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__(num_classes, in_channels)
        self.arch = "two-branch v2"

    def forward(self, x):
        assert self.arch == "two-branch v2"
        return super().forward(x)


def not_a_model():
    return 3


def broken(num_classes):
    raise ValueError("no such width")
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "outside" / "user_nets.py"
    path.parent.mkdir()
    path.write_text(USER_MODEL)
    return path


def _randomized(model: nn.Module) -> nn.Module:
    """Give BatchNorms non-trivial statistics, so that fusion and pruning change something measurable."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.05, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _build(user_file, num_classes=10):
    torch.manual_seed(0)
    return _randomized(build_model(f"{user_file}:TwoBranchNet", num_classes=num_classes, in_channels=1))


X = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def test_build_from_a_file_records_the_import(user_file):
    model = _build(user_file, num_classes=7)
    assert model(X).shape == (4, 7) and model.stem[0].in_channels == 1
    source = model.arch.source
    assert source.module == str(user_file.resolve()) and source.callable == "TwoBranchNet"
    assert len(source.sha256) == 64 and model.arch.cfg == ()
    # the builder's signature decides what it gets: ``small`` takes num_classes only
    assert build_model(f"{user_file}:small", num_classes=5, in_channels=3)(X).shape == (4, 5)
    # the same file always gets the same module name; two imports give the same class
    assert type(model) is type(build_model(f"{user_file}:TwoBranchNet", num_classes=7, in_channels=1))
    assert type(model).__module__ in sys.modules


def test_build_from_an_importable_module():
    model = build_model("torch.nn:Identity", num_classes=10, in_channels=1)
    assert isinstance(model, nn.Identity) and model.arch.source.sha256 is None  # **kwargs get nothing


@pytest.mark.parametrize("spec,match", [
    ("no_such_module_xyz:Net", "cannot build model no_such_module_xyz:Net: importing no_such_module_xyz raised "
                               "ModuleNotFoundError"),
    ("{file}:Missing", "has no attribute 'Missing'"),
    ("{file}:not_a_model", r"returned a int, not a torch.nn.Module"),
    ("{file}:broken", r"\(num_classes=10\) raised ValueError: no such width"),
    ("{dir}/absent.py:Net", "absent.py does not exist"),
    ("{file}:1bad", "is not MODULE:CALLABLE"),
])
def test_bad_specs_are_one_line_errors(user_file, spec, match):
    spec = spec.format(file=user_file, dir=user_file.parent)
    with pytest.raises(ModelConfigError, match=match) as info:
        build_model(spec, num_classes=10, in_channels=1)
    assert "\n" not in str(info.value)


def test_a_module_that_fails_to_import_is_reported(tmp_path):
    bad = tmp_path / "bad_net.py"
    bad.write_text("import torch\nraise RuntimeError('needs a GPU')\n")
    with pytest.raises(ModelConfigError, match="importing .*bad_net.py raised RuntimeError: needs a GPU"):
        resolve_callable(f"{bad}:Net")


@pytest.mark.parametrize("form", ["safetensors", "pt", "pth", "state_dict", "model_state_dict", "ddp"])
def test_weights_load_in_every_accepted_form(user_file, tmp_path, form):
    trained = _build(user_file)
    sd = trained.state_dict()
    path = tmp_path / f"w.{'safetensors' if form == 'safetensors' else 'pth' if form == 'pth' else 'pt'}"
    if form == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        payload = {"pt": sd, "pth": sd, "state_dict": {"state_dict": sd, "epoch": 3},
                   "model_state_dict": {"model_state_dict": sd, "optimizer_state_dict": {}},
                   "ddp": {f"module.{k}": v for k, v in sd.items()}}[form]
        torch.save(payload, path)
    torch.manual_seed(123)
    fresh = build_model(f"{user_file}:TwoBranchNet", num_classes=10, in_channels=1).eval()
    assert not torch.equal(fresh(X), trained(X))
    load_weights_file(fresh, path)
    assert torch.equal(fresh(X), trained(X))


def test_mismatched_weights_name_the_keys(user_file, tmp_path):
    sd = _build(user_file).state_dict()
    sd.pop("head.weight"), sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["stem.0.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"missing 2 keys \(head.bias, head.weight\); unexpected 1 key "
                                              r"\(extra.weight\); shape differs for 1 key \(stem.0.weight; "
                                              r"stem.0.weight is \[16, 3, 3, 3\] here, \[16, 1, 3, 3\] in the model\)"):
        load_weights_file(_build(user_file), tmp_path / "w.pt")


def test_other_weight_files_are_refused(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="suffix '.bin'"):
        load_state_dict_file(tmp_path / "w.bin")
    torch.save({"weight": torch.zeros(2), "note": "hello"}, tmp_path / "n.pt")
    with pytest.raises(CheckpointError, match=r"entries that are not tensors \(note\)"):
        load_state_dict_file(tmp_path / "n.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_state_dict_file(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict_file(tmp_path / "absent.pt")


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: the kind of code a hostile .pt file carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="holds Python objects beyond tensors, which micronet refuses to "
                                              "unpickle") as info:
        load_state_dict_file(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really carries the payload: an unrestricted load runs it
    assert marker.exists()


def test_checkpoint_rebuilds_the_user_model(user_file, tmp_path):
    model = _build(user_file)
    save_checkpoint(tmp_path / "ck", model)
    meta = json.loads((tmp_path / "ck" / "micronet.json").read_text())
    assert meta["arch"]["source"]["module"] == str(user_file.resolve())
    rebuilt = load_checkpoint(tmp_path / "ck").build_model().eval()
    assert rebuilt.arch == model.arch and torch.equal(rebuilt(X), model(X))


def test_a_models_own_arch_attribute_is_kept(user_file, tmp_path):
    model = _randomized(build_model(f"{user_file}:NamedNet", num_classes=10, in_channels=1))
    assert model.arch == "two-branch v2"  # the user's attribute, untouched
    assert model_arch(model).source.callable == "NamedNet" and model_arch(model).num_classes == 10
    save_checkpoint(tmp_path / "ck", model)
    rebuilt = load_checkpoint(tmp_path / "ck").build_model().eval()
    assert rebuilt.arch == "two-branch v2" and model_arch(rebuilt) == model_arch(model)
    assert torch.equal(rebuilt(X), model(X))
    quantized = prepare(rebuilt, default_scheme())  # traced and rewritten: both attributes carried over
    assert quantized.arch == "two-branch v2" and model_arch(quantized) == model_arch(model)
    calibrate(quantized, [X])
    save_checkpoint(tmp_path / "q", quantized)
    again = load_checkpoint(tmp_path / "q").build_model().eval()
    assert again.arch == "two-branch v2" and torch.equal(again(X), quantized.eval()(X))


def test_changed_file_warns_and_missing_file_is_one_line(user_file, tmp_path):
    model = _build(user_file)
    save_checkpoint(tmp_path / "ck", model)
    user_file.write_text(USER_MODEL + "\n# an edit that does not change the network\n")
    with pytest.warns(UserWarning, match="user_nets.py changed since the model was saved"):
        rebuilt = load_checkpoint(tmp_path / "ck").build_model().eval()
    assert torch.equal(rebuilt(X), model(X))
    assert rebuilt.arch.source.sha256 != model.arch.source.sha256  # re-saving records the file as it is now
    user_file.unlink()
    with pytest.raises(CheckpointError, match=f"cannot rebuild its model {user_file.resolve()}:TwoBranchNet: .*"
                                              "user_nets.py does not exist") as info:
        load_checkpoint(tmp_path / "ck").build_model()
    assert "\n" not in str(info.value)


def _round_trip(model, path):
    save_checkpoint(path, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file did not change: no warning
        return load_checkpoint(path).build_model().eval()


def test_prune_quantize_fuse_of_the_user_model_reload(user_file, tmp_path):
    model = _build(user_file)
    pruned = prune(model, X[:1], percent=0.4).eval()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    reloaded = _round_trip(pruned, tmp_path / "pruned")
    assert torch.equal(reloaded(X), pruned(X))

    quantized = calibrate(prepare(pruned, default_scheme()), [X]).eval()
    assert any(type(m).__name__ == "QuantConcat" for m in quantized.modules())
    assert any(type(m).__name__ == "QuantAdd" for m in quantized.modules())
    assert (quantized(X) - pruned(X)).abs().max() < 0.2 * pruned(X).abs().max()
    reloaded = _round_trip(quantized, tmp_path / "quantized")
    assert torch.equal(reloaded(X), quantized(X))

    fused, report = fuse(pruned)
    assert report.fused and torch.allclose(fused(X), pruned(X), atol=1e-5)
    reloaded = _round_trip(fused, tmp_path / "fused")
    assert torch.equal(reloaded(X), fused(X))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in reloaded.modules())


def test_parse_keeps_a_module_spec_as_given():
    source = parse_model_spec("torch.nn:Identity")
    assert (source.module, source.callable, source.sha256) == ("torch.nn", "Identity", None)
