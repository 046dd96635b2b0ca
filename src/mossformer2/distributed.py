"""torchrun helpers: the process's place in the job, process-group setup and teardown, collectives.

Used by training, its data loaders and ``mossformer2 separate`` (which shards files over torchrun processes).
torch is imported inside the functions that need it: :meth:`DistInfo.from_environment` runs without torch (an
ONNX deployment under torchrun).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, strict: bool = True) -> DistInfo:
        """What torchrun's environment says (RANK, WORLD_SIZE, LOCAL_RANK); one process without them. A value
        that is no whole number raises ValueError, or (``strict=False``, e.g. in a signal handler, which must
        not fail) counts as unset."""
        return cls(_env_int("RANK", 0, strict), _env_int("WORLD_SIZE", 1, strict), _env_int("LOCAL_RANK", 0, strict))

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int, strict: bool) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        if strict:
            raise ValueError(f"{name}={raw!r} is not a whole number (torchrun sets RANK, WORLD_SIZE and "
                             "LOCAL_RANK)") from None
        return default


def get_dist_info() -> DistInfo:
    """The current process's place in the process group (a single process when none is initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), DistInfo.from_environment().local_rank)
    return DistInfo()


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR...).

    Without those variables (a plain ``python`` run) nothing is initialised. NCCL on CUDA, gloo on CPU. Each
    rank uses GPU ``LOCAL_RANK``.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return get_dist_info()
    env = DistInfo.from_environment()
    if not env.is_distributed:
        return DistInfo()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return get_dist_info()


def cleanup_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
