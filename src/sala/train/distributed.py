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


def shutdown() -> None:
    """Wait for every process, then destroy the process group: left to interpreter exit, gloo's threads can
    be torn down mid-flight and abort a process that finished its work ("terminate called without an
    active exception", seen on a loaded 2-core machine)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """DDP around ``module`` when distributed, else the module itself."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)


# ------------------------------------------------------------------ FSDP2 (torch.distributed.fsdp.fully_shard)
def shard_fsdp2(model: torch.nn.Module, inner: list[torch.nn.Module]) -> None:
    """Shard ``model`` with FSDP2: each module of ``inner`` (and its parents in ``model.model.layers``) is
    its own unit, the root holds the rest (embeddings, tied LM head, final norm)."""
    from torch.distributed.fsdp import fully_shard

    inner_ids = {id(m) for m in inner}
    for layer in model.model.layers:
        for m in layer.modules():
            if id(m) in inner_ids:
                fully_shard(m)
        fully_shard(layer)
    fully_shard(model)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module, sharded: bool) -> dict:
    """Unsharded state dict (a collective call when ``sharded``)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: torch.nn.Module, optimizer, sharded: bool) -> dict:
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_model_state(model: torch.nn.Module, state: dict, sharded: bool) -> None:
    if not sharded:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
