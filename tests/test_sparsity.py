"""Sparse training (network slimming): the BatchNorm L1 hook and `micronet train --sr`."""

import json

import pytest
import torch
from torch import nn

from micronet.cli import main
from micronet.compression.pruning import BatchNormL1, prunable_batchnorms
from micronet.errors import ConfigError
from micronet.models import build_model


class _Trainer:
    def __init__(self, model):
        self.model = model


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))


def _sgd_step(model, hook=None):
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if hook is not None:
        hook.after_backward(_Trainer(model))
    opt.step()


def test_hook_adds_s_times_sign_gamma_to_the_gradient():
    plain, sparse = _net(), _net()
    plain(torch.randn(1, 2, 5, 5)), sparse(torch.randn(1, 2, 5, 5))  # materialise the lazy layer
    sparse.load_state_dict(plain.state_dict())
    with torch.no_grad():
        gamma = torch.tensor([0.5, -0.3, 0.0, 1.0, -2.0, 0.1])
        plain[1].weight.copy_(gamma), sparse[1].weight.copy_(gamma)
    hook = BatchNormL1(0.01)
    hook.on_fit_start(_Trainer(sparse))
    torch.manual_seed(1)
    _sgd_step(plain)
    torch.manual_seed(1)
    _sgd_step(sparse, hook)
    # SGD: the extra step is exactly lr · s · sign(γ) (sign(0) = 0: zero scales stay put)
    torch.testing.assert_close(plain[1].weight - sparse[1].weight, 0.1 * 0.01 * torch.sign(gamma))
    torch.testing.assert_close(plain[0].weight, sparse[0].weight)  # nothing else is touched


def test_ramp_and_selection_and_errors():
    hook = BatchNormL1(1e-3, ramp_epochs=4)
    hook.on_epoch_start(None, 0)
    assert hook.current == pytest.approx(2.5e-4)
    hook.on_epoch_start(None, 9)
    assert hook.current == pytest.approx(1e-3)
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    only = BatchNormL1(1e-3, names=["3"])
    only.on_fit_start(_Trainer(net))
    assert len(only.scales) == 1 and only.scales[0] is net[3].weight
    with pytest.raises(ConfigError, match="positive"):
        BatchNormL1(0.0)
    with pytest.raises(ConfigError, match="BatchNorm"):
        BatchNormL1(1e-3).on_fit_start(_Trainer(nn.Linear(2, 2)))


def test_train_sr_shrinks_gamma_and_resumes_with_the_same_penalty(tmp_path, capsys):
    common = ["--model", "nin", "--cfg", "8,8,8,8,8,8,8,8", "--data", "synthetic", "--batch-size", "64",
              "--lr", "0.05", "--no-progress"]
    assert main(["train", *common, "--epochs", "2", "--out", str(tmp_path / "plain")]) == 0
    assert main(["train", *common, "--epochs", "1", "--sr", "--s", "0.01", "--out", str(tmp_path / "sparse")]) == 0
    assert main(["train", "--resume", str(tmp_path / "sparse"), "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "sparse training s=0.01" in out
    # the logits BatchNorm (over the 10 class channels) cannot be pruned: left out, also on resume
    assert out.count("sparse training: 8 BatchNorms penalised; left out (channels that cannot be pruned): "
                     "features.10.bn") == 2
    logs = [json.loads(line) for line in (tmp_path / "sparse" / "log.jsonl").read_text().splitlines()]
    assert [round(entry["sparsity_s"], 6) for entry in logs] == [0.01, 0.01]  # the resumed epoch kept --sr
    plain = [json.loads(line) for line in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    assert "bn_gamma_l1" not in plain[-1]
    # with lr 0.05 and s 0.01 every step pulls each |γ| down by up to 5e-4: the L1 norm falls
    assert logs[-1]["bn_gamma_l1"] < logs[0]["bn_gamma_l1"]


def test_sr_cannot_be_added_on_resume(tmp_path, capsys):
    common = ["--model", "lenet", "--data", "synthetic", "--batch-size", "64", "--no-progress"]
    assert main(["train", *common, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2", "--sr", "--no-progress"]) == 2
    assert "--sr" in capsys.readouterr().err


def test_only_batchnorms_over_prunable_channels_are_penalised_by_default():
    """NIN's logits BatchNorm sits over the network's output channels, which pruning never removes."""
    torch.manual_seed(0)
    model = build_model("nin", 10, 1, cfg=[8] * 8)
    norms = {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert prunable_batchnorms(model, torch.zeros(1, 1, 28, 28)) == [n for n in norms if n != "features.10.bn"]
    x = torch.randn(4, 1, 28, 28)
    for hook, penalised in ((BatchNormL1(0.01), set(norms) - {"features.10.bn"}),
                            (BatchNormL1(0.01, prunable_only=False), set(norms))):
        hook.on_fit_start(_Trainer(model))
        hook.on_batch(_Trainer(model), x, None)
        model.zero_grad()
        for gamma in norms.values():
            gamma.grad = torch.zeros_like(gamma)
        hook.after_backward(_Trainer(model))
        got = {name for name, gamma in norms.items() if gamma.grad.abs().sum() > 0}
        assert got == penalised
        torch.testing.assert_close(norms["features.0.bn"].grad, 0.01 * torch.sign(norms["features.0.bn"]))
    # saved with the run; a run saved before the option existed penalised every BatchNorm and continues so
    assert BatchNormL1.from_state(BatchNormL1(0.01).state_dict()).prunable_only is True
    assert BatchNormL1.from_state({"kind": "batchnorm_l1", "s": 0.01}).prunable_only is False
    only_output = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    hook = BatchNormL1(0.01)
    hook.on_fit_start(_Trainer(only_output))
    with pytest.raises(ConfigError, match=r"none of the BatchNorms 1 is over prunable channels.*prunable_only=False"):
        hook.on_batch(_Trainer(only_output), torch.zeros(1, 1, 5, 5), None)
