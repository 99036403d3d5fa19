"""The few collectives the zoo needs under Lightning's distributed strategies (issue 9, "Distributed").

Lightning's ``ddp`` / ``fsdp`` strategies own the process group; these helpers only use it when one
exists, so every caller runs unchanged in a single process. They serve the places that must give the
single-process answer over the same tokens: calibration sums (fp64, all-reduced), token-weighted
losses and metrics, and files that exactly one process writes while the others wait.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(this process's global rank, number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def _comm_device(tensor: torch.Tensor) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place (a no-op in one process); returns it."""
    if rank_world()[1] == 1:
        return tensor
    device = _comm_device(tensor)
    if tensor.device == device:
        dist.all_reduce(tensor)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved)
    tensor.copy_(moved)
    return tensor


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (so all of them take the same branch)."""
    if rank_world()[1] == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], dtype=torch.float64)
    return float(all_reduce_sum_(t)) == 0.0


def is_sharded(module: torch.nn.Module | None) -> bool:
    """Whether ``module`` (e.g. ``trainer.model``) is, or holds, an FSDP unit."""
    if module is None or not dist.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return any(isinstance(m, FSDP) for m in module.modules())


def gathered_parameters(module: torch.nn.Module | None):
    """A context in which ``module``'s parameters are whole on every process.

    Under FSDP the parameters a rank holds are shards; this gathers them (every rank must enter, since
    it is a collective). Without FSDP it does nothing.
    """
    if not is_sharded(module):
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.summon_full_params(module, writeback=False)
