"""Pruned checkpoints end to end: `micronet prune`, reload, fine-tuning, prune → quantize → fuse, errors."""

import json

import pytest
import torch

from micronet.cli import main
from micronet.compression.pruning import prune
from micronet.engine import load_checkpoint, load_model, save_checkpoint
from micronet.models import build_model

COMMON = ["--data", "synthetic", "--batch-size", "64", "--no-progress"]




@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny NIN after sparse training, and `micronet prune --percent 0.5` of it."""
    root = tmp_path_factory.mktemp("prune")
    assert main(["train", "--model", "nin", "--cfg", "16,16,16,16,16,16,16,16", *COMMON, "--epochs", "2",
                 "--lr", "0.05", "--sr", "--s", "0.01", "--out", str(root / "sparse")]) == 0
    return root


@pytest.fixture(scope="module")
def pruned(runs):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["prune", "--checkpoint", str(runs / "sparse"), "--percent", "0.5", "--data", "synthetic",
                     "--out", str(runs / "pruned")]) == 0
    return runs / "pruned", out.getvalue()


def _x(seed=0, n=4):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_prune_prints_the_table_and_writes_a_smaller_checkpoint(runs, pruned):
    directory, out = pruned
    checkpoint = load_checkpoint(directory / "best")
    metrics = checkpoint.metrics
    assert metrics["params_after"] < metrics["params_before"] and metrics["flops_after"] < metrics["flops_before"]
    assert metrics["percent"] == 0.5 and metrics["pruned_from"].endswith("best")
    assert 0 <= metrics["test_acc"] <= 1 and 0 <= metrics["unpruned_test_acc"] <= 1
    assert checkpoint.pruning_record and checkpoint.meta["extra"]["pruning"]["modules"]
    assert f"params: {metrics['params_before']:,} -> {metrics['params_after']:,}" in out
    assert "GFLOPs" in out and "before, " in out and "after pruning" in out
    assert f"{metrics['test_acc'] * 100:.2f}%" in out
    # the library's per-layer table: every conv layer with its channels before and after
    assert "features.0.conv" in out and "16" in out
    assert json.loads((directory / "prune_report.json").read_text())
    # half of the 8 × 16 prunable channels are gone (rounding may keep a few)
    assert sum(checkpoint.arch.cfg) < 8 * 16


def test_pruned_checkpoint_reloads_with_the_in_memory_logits(runs, pruned, capsys):
    directory, _ = pruned
    source = load_checkpoint(runs / "sparse" / "best")
    in_memory = prune(source.build_model().eval(), torch.randn(1, 1, 28, 28), percent=0.5).eval()
    reloaded = load_model(directory).eval()
    assert list(reloaded.arch.cfg) == list(in_memory.arch.cfg)
    with torch.inference_mode():
        assert torch.equal(reloaded(_x()), in_memory(_x()))
    assert main(["evaluate", "--checkpoint", str(directory), "--data", "synthetic"]) == 0
    acc = load_checkpoint(directory / "best").metrics["test_acc"]
    assert f"accuracy {acc * 100:.2f}%" in capsys.readouterr().out
    assert main(["info", "--checkpoint", str(directory)]) == 0
    assert "(pruned from" in capsys.readouterr().out


def test_prune_refine_fine_tunes_the_pruned_architecture(runs, pruned, capsys, cli_fails):
    directory, _ = pruned
    out = runs / "finetune"
    assert main(["train", "--prune_refine", str(directory), *COMMON, "--epochs", "1", "--lr", "0.01",
                 "--out", str(out)]) == 0
    assert "fine-tuning the pruned" in capsys.readouterr().out
    tuned = load_checkpoint(out / "best")
    assert list(tuned.arch.cfg) == list(load_checkpoint(directory / "best").arch.cfg)
    assert tuned.pruning_record
    load_model(out)  # reloads
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0  # resumes the pruned run
    assert load_checkpoint(out / "last").training["epoch"] == 2
    # --init on a pruned checkpoint is the same; a --cfg that disagrees is refused
    cli_fails(["train", "--init", str(directory), "--model", "nin", "--cfg", "16,16,16,16,16,16,16,16", *COMMON],
           "pruned nin", "drop --model and --cfg")


def test_prune_then_quantize_reloads(runs, pruned):
    directory, _ = pruned
    out = runs / "ptq"
    assert main(["quantize", "iao", "--checkpoint", str(directory), "--ptq", "--ptq_batch", "2", *COMMON,
                 "--out", str(out)]) == 0
    checkpoint = load_checkpoint(out / "best")
    assert checkpoint.pruning_record and checkpoint.quant_scheme is not None
    first, second = load_model(out).eval(), load_model(out).eval()
    assert list(first.arch.cfg) == list(load_checkpoint(directory / "best").arch.cfg)
    with torch.inference_mode():
        assert torch.equal(first(_x(1)), second(_x(1)))


def test_bad_inputs(runs, pruned, capsys, cli_fails):
    sparse = str(runs / "sparse")
    for percent in ("1", "1.5", "-0.1"):
        cli_fails(["prune", "--checkpoint", sparse, "--percent", percent, "--out", str(runs / "x")], "--percent")
    cli_fails(["prune", "--checkpoint", sparse, "--normal_regular", "64", "--no_eval", "--out", str(runs / "x")],
           "64", "larger than")
    cli_fails(["prune", "--checkpoint", sparse, "--normal_regular", "0", "--out", str(runs / "x")],
           "--normal_regular")
    cli_fails(["prune", "--checkpoint", str(runs / "ptq"), "--out", str(runs / "x")], "prune first, then quantize")
    cli_fails(["train", "--prune_refine", sparse, *COMMON], "not a pruned checkpoint", "--init")
    cli_fails(["train", "--gc_prune_refine", "8", "--model", "lenet", *COMMON], "--gc_prune_refine", "nin_gc")
    assert not (runs / "x").exists()


def test_gc_prune_refine_trains_nin_gc_with_that_cfg(tmp_path, capsys):
    cfg = ["16", "16", "32", "32", "32", "32", "32", "32"]
    assert main(["train", "--gc_prune_refine", *cfg, *COMMON, "--train_subset", "128", "--epochs", "1",
                 "--out", str(tmp_path / "gc")]) == 0
    held = load_checkpoint(tmp_path / "gc" / "best").arch
    assert held.name == "nin_gc" and list(held.cfg) == [int(c) for c in cfg]


def _random_gammas(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.01)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def test_prune_quantize_fuse_order_round_trips_through_checkpoints(tmp_path):
    """ResNet-20: pruned stage widths and inner widths, then IAO prepare, then BN fusion; each reloads exactly."""
    from micronet.compression.fusion import fuse
    from micronet.compression.quantization.wqaq.iao.quantize import prepare

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = _random_gammas(build_model("resnet20", 10, 3)).eval()
    pruned = prune(model, x[:1], percent=0.5).eval()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    quantized = prepare(pruned, w_bits=8, a_bits=8)
    quantized.eval()
    with torch.no_grad():
        quantized.train()(x)  # observe once
    quantized.eval()
    fused, _ = fuse(pruned)
    for name, m in (("pruned", pruned), ("quantized", quantized), ("fused", fused)):
        save_checkpoint(tmp_path / name, m)
        reloaded = load_model(tmp_path / name).eval()
        assert load_checkpoint(tmp_path / name).pruning_record, name
        with torch.inference_mode():
            assert torch.equal(reloaded(x), m(x)), name


def test_checkpoint_without_pruning_record_loads_as_before(tmp_path):
    model = build_model("lenet", 10, 1)
    save_checkpoint(tmp_path / "old", model)
    meta = json.loads((tmp_path / "old" / "micronet.json").read_text())
    assert "pruning" not in meta["extra"]
    reloaded = load_model(tmp_path / "old")
    assert not getattr(reloaded, "channel_record", None)
    with torch.inference_mode():
        assert torch.equal(reloaded.eval()(_x()), model.eval()(_x()))


def test_prune_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--normal_regular" in out and "--prune_refine" in out


def test_a_pruning_record_that_does_not_fit_is_a_checkpoint_error(tmp_path):
    from micronet.errors import CheckpointError

    model = _random_gammas(build_model("nin", 10, 1, [8] * 8)).eval()
    save_checkpoint(tmp_path / "p", prune(model, _x(n=1), percent=0.5))
    meta_file = tmp_path / "p" / "micronet.json"
    meta = json.loads(meta_file.read_text())
    meta["extra"]["pruning"]["modules"]["features.99.conv"] = {"type": "Conv2d", "in_channels": 1}
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="pruning record.*features.99.conv"):
        load_model(tmp_path / "p")
