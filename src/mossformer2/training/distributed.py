"""torchrun helpers: process-group setup and teardown, rank queries, rank-0-only logging."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def get_dist_info() -> DistInfo:
    """The current process's place in the process group (a single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR...).

    Without those variables (a plain ``python`` run) nothing is initialised. NCCL on CUDA, gloo on CPU. Each
    rank uses GPU ``LOCAL_RANK``.
    """
    if dist.is_initialized():
        return get_dist_info()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return get_dist_info()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class _MainRankOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return get_dist_info().is_main


def rank_zero_logging(logger: logging.Logger) -> None:
    """Let only rank 0 emit records through ``logger`` (other ranks stay silent)."""
    if not any(isinstance(f, _MainRankOnly) for f in logger.filters):
        logger.addFilter(_MainRankOnly())
