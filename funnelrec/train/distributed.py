"""Data-parallel training with plain ``torch.distributed``, launched by ``torchrun``.

* ``init_distributed()`` reads the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, and
  ``MASTER_ADDR``/``MASTER_PORT`` through ``env://``) and starts a process group: ``nccl`` when the process trains on
  a CUDA device, ``gloo`` on CPU. With ``WORLD_SIZE`` unset or 1 it starts nothing: every helper below then works
  as the identity, so the same code runs in one process without a process group.
* ``wrap_ddp(module)`` wraps a module in ``DistributedDataParallel`` (dense gradients are all-reduced, i.e.
  averaged over ranks, during ``backward``); the identity at world size 1.
* ``shard(indices, rank, world)`` is each rank's contiguous slice of one *global* batch: the global batch size is
  the configured batch size, whatever the number of processes, so N processes take the same optimisation steps as
  one process on the same global batches (see ``docs/distributed.md`` for how the loss is weighted).

Example:
    >>> info = init_distributed()           # no torchrun environment: world size 1, no process group
    >>> info.world_size, info.rank, is_rank0()
    (1, 0, True)
    >>> shard(list(range(10)), rank=1, world=3)
    [4, 5, 6]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from funnelrec.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job.

    Args:
        rank: global rank (0 … world_size − 1).
        world_size: number of processes.
        local_rank: rank on this node (the GPU it uses).
        backend: ``"gloo"``, ``"nccl"`` or None (no process group).
        device: the device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        """True when a process group is running (world size > 1)."""
        return self.backend is not None and self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` → ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; other values as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return dev


def init_distributed(device: str | torch.device = "auto", backend: str | None = None,
                     timeout_s: float = 1800.0) -> DistInfo:
    """Start (or join) the process group torchrun describes; see the module doc.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``: where this process trains (``cuda`` uses ``LOCAL_RANK``'s GPU).
        backend: force ``"gloo"`` or ``"nccl"`` (default: nccl on CUDA, gloo on CPU).
        timeout_s: collective timeout.

    Returns: a ``DistInfo``. Calling it again returns the running group's info.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        dev = resolve_device(device, local_rank)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), dev)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    dev = resolve_device(device, local_rank)
    if world == 1:
        return DistInfo(0, 1, local_rank, None, dev)
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and dev.type != "cuda":
        raise ConfigError("the nccl backend needs CUDA devices; use gloo (device=cpu) on CPU")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "rank": rank, "world_size": world,
                              "timeout": timedelta(seconds=timeout_s)}
    if backend == "nccl":
        kwargs["device_id"] = dev  # eager NCCL init bound to this GPU
    dist.init_process_group(**kwargs)
    return DistInfo(rank, world, local_rank, backend, dev)


def destroy_distributed() -> None:
    """Tear the process group down (a no-op without one), after a barrier: a rank that destroys its group while
    another still talks to it can abort the other at exit (gloo: "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def is_rank0() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if _initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _collective_device() -> torch.device:
    if _initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: Tensor | float | Sequence[float]) -> Tensor:
    """Sum of ``x`` over ranks (a float64 tensor on the caller's device; a copy of ``x`` without a group)."""
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if not _initialized():
        return t
    dev = t.device
    t = t.to(_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(dev)


def all_reduce_mean(x: Tensor | float | Sequence[float]) -> Tensor:
    """Mean of ``x`` over ranks (float64)."""
    return all_reduce_sum(x) / get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; the identity without a group)."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank (``[obj]`` without a group)."""
    if not _initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(indices: Sequence[int] | np.ndarray | Tensor, rank: int, world: int):
    """Rank ``rank``'s contiguous slice of the global batch ``indices`` (``np.array_split`` sizes: the first
    ``len % world`` ranks take one more). Returns the same kind of sequence it is given."""
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"shard: need 0 <= rank < world, got rank={rank}, world={world}")
    n = len(indices)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return indices[start:stop]


def wrap_ddp(module: nn.Module, info: DistInfo | None = None, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(module)`` when a process group runs; ``module`` itself otherwise.

    The module must already sit on ``info.device``. DDP broadcasts rank 0's parameters and buffers at
    construction, so every rank starts from the same weights.
    """
    if not _initialized() or get_world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = info.device if info is not None else _collective_device()
    device_ids = [dev.index] if dev.type == "cuda" else None
    return DDP(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return module.module if isinstance(module, DDP) else module


__all__ = [
    "DistInfo", "all_gather_object", "all_reduce_mean", "all_reduce_sum", "barrier", "broadcast_object",
    "destroy_distributed", "get_rank", "get_world_size", "init_distributed", "is_rank0", "resolve_device", "shard",
    "unwrap", "wrap_ddp",
]
