"""Device choice and multi-process training under ``torchrun`` (DDP; NCCL on GPUs, gloo on CPUs)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from micronet.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Where this process runs and which share of the data it takes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def parse_gpu_ids(text: str | None) -> list[int]:
    """``"0,1"`` → ``[0, 1]`` (the original's ``--gpu_id`` syntax)."""
    if text is None or text.strip() == "":
        return []
    try:
        ids = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise ConfigError(f"--gpu_id must be a comma-separated list of GPU numbers such as 0,1 (got {text!r})") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpu_id must list distinct non-negative GPU numbers (got {text!r})")
    return ids


def setup(cpu: bool = False, gpu_ids: list[int] | None = None) -> DistContext:
    """Pick the device and join the process group when launched by ``torchrun``.

    ``gpu_ids`` index the visible GPUs. Under torchrun each process takes ``gpu_ids[local_rank]``
    (or its local rank when none are given).
    """
    gpu_ids = gpu_ids or []
    if cpu and gpu_ids:
        raise ConfigError("--cpu and --gpu_id contradict each other: pass one of them")
    use_cuda = not cpu and torch.cuda.is_available()
    if gpu_ids and not torch.cuda.is_available():
        raise ConfigError("--gpu_id was given but no CUDA GPU is visible: drop it or pass --cpu")
    if launched_by_torchrun():
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        if use_cuda:
            index = gpu_ids[local] if gpu_ids else local
            if index >= torch.cuda.device_count():
                raise ConfigError(f"process {rank} wants GPU {index} but only {torch.cuda.device_count()} are visible")
            torch.cuda.set_device(index)
            device = torch.device("cuda", index)
        else:
            device = torch.device("cpu")
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return DistContext(device, rank, world, local)
    if use_cuda:
        index = gpu_ids[0] if gpu_ids else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"GPU {index} does not exist: {torch.cuda.device_count()} visible")
        torch.cuda.set_device(index)
        return DistContext(torch.device("cuda", index))
    return DistContext(torch.device("cpu"))


def teardown() -> None:
    """Leave the process group together: a rank that destroys it while another still has collective work
    in flight makes gloo abort that rank ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(value, ctx: DistContext):
    """Send rank 0's (JSON-like) value to every rank."""
    if not ctx.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
