"""One process or many under ``torchrun``: the process group (gloo on CPU, NCCL on GPU), this rank's device, the
DDP wrappers, and the collectives the stages use. Trainers and generation share it.

Leaving the group has one safe order (:func:`shutdown_distributed`): every collective finished (a barrier), every DDP
wrapper released, then the group destroyed. A DDP wrapper's C++ reducer holds the process group; if the reducer
outlives ``destroy_process_group`` it becomes the group's last owner, and freeing it (with the GIL held, as pybind11
frees it) joins gloo's worker threads while one of them waits for the GIL to free a finished collective's tensor: a
deadlock at exit. Freed through torch's own registry instead, the group is destroyed with the GIL released."""

from __future__ import annotations

import dataclasses
import gc
import os
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(threads: int = 0) -> Dist:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, NCCL on GPU); a single process otherwise."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        rank = dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return Dist(rank, world, device)
    return Dist(0, 1, torch.device("cuda") if use_cuda else torch.device("cpu"))


_replicas: weakref.WeakSet = weakref.WeakSet()  # every live DDP wrapper made by replicate()


def replicate(module: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """``module`` wrapped in DDP under torchrun (gradients all-reduced), ``module`` itself in one process. The caller
    drops its reference (``del``) when training ends: :func:`shutdown_distributed` refuses to leave the group while a
    wrapper lives."""
    if not d.enabled:
        return module
    wrapper = DDP(module)
    _replicas.add(wrapper)
    return wrapper


def shutdown_distributed(d: Dist) -> None:
    """Leave the process group in the one order that cannot deadlock (module docstring): wait for every rank, check
    that no DDP wrapper (and so no reducer holding the group) is still alive, destroy the group."""
    if not (d.enabled and dist.is_initialized()):
        return
    dist.barrier()
    gc.collect()  # a wrapper caught in a reference cycle is freed here, while the group still lives
    if len(_replicas):
        raise RuntimeError(f"{len(_replicas)} DDP wrapper(s) still referenced when leaving the process group; release them "
                           "(del) before shutdown_distributed, or destroying the group can deadlock")
    dist.destroy_process_group()


def all_reduce_mean(value: float, d: Dist) -> float:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t.item() / d.world)


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
