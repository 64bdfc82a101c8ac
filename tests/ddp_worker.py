"""Launched by torchrun from test_engine.py: trains on two CPU processes and writes each rank's weights."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from micronet.compression.quantization.core import prepare as core_prepare
from micronet.compression.quantization.wqaq.iao.quantize import iao_scheme
from micronet.data import BatchLoader, load_dataset
from micronet.engine import TrainConfig, Trainer, setup, teardown
from micronet.models import build_model


def main(out: Path) -> None:
    ctx = setup(cpu=True)
    splits = load_dataset("synthetic", val_fraction=0.2, seed=0)
    torch.manual_seed(ctx.rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = build_model("lenet", splits.info.num_classes, splits.info.in_channels)
    if ctx.rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "initial.safetensors"))
    train = BatchLoader(splits.train, 16, shuffle=True, drop_last=True, rank=ctx.rank, world_size=ctx.world_size)
    val = BatchLoader(splits.val, 256)
    result = Trainer(model, TrainConfig(epochs=4, lr=0.05, progress=False), train, val, ctx=ctx).fit()
    state = {k: v.detach().contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, str(out / f"rank{ctx.rank}.safetensors"))
    # Observers reduce their batch statistics across ranks: each rank sees different data, all end equal.
    for observer in ("moving_average", "percentile", "histogram"):
        quantized = core_prepare(result.model, iao_scheme(activation_observer=observer)).train()
        generator = torch.Generator().manual_seed(100 + ctx.rank)
        for _ in range(3):
            quantized(torch.randn(8, 1, 28, 28, generator=generator) * (1 + ctx.rank))
        stats = {k: v.contiguous() for k, v in quantized.state_dict().items() if "quantizer" in k}
        save_file(stats, str(out / f"observers_{observer}_rank{ctx.rank}.safetensors"))
    if ctx.is_main:
        summary = {"world_size": ctx.world_size, "steps_per_rank": len(train), "train_images": len(splits.train),
                   "val_acc": result.history[-1]["val_acc"]}
        (out / "summary.json").write_text(json.dumps(summary))
    teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
