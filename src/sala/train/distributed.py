"""Process-group helpers for data-parallel training launched with ``torchrun`` (gloo on CPU, nccl on CUDA).

Every process holds the whole model; each takes its share of the rows of a global batch and
``DistributedDataParallel`` averages the gradients. Losses are normalised by the global count of
targets, so N processes compute the same update as one process with the whole batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> tuple[int, int]:
    """(rank, world size); initialises the default process group when launched with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a copy; the identity in one process)."""
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """DDP around ``module`` when distributed, else the module itself."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)
