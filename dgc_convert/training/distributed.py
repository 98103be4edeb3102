"""The processes of a run: one, or many under torchrun (gloo on CPU, nccl on GPUs).

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; ``Processes.from_env``
reads them, picks this process's device and joins the process group.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Processes"]


@dataclass
class Processes:
    """World size, rank and device of this process; small collectives that are no-ops alone."""

    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    owns_group: bool
    local_world_size: int = 1  # processes on this host (they share its memory)

    @classmethod
    def from_env(cls) -> Processes:
        """Read torchrun's environment (one process when unset) and join the group if needed."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1)) if cuda else torch.device("cpu")
        owns_group = False
        if world_size > 1 and not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if cuda else "gloo")
            owns_group = True
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return cls(world_size, rank, local_rank, device, owns_group, local_world_size)

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> Processes:
        """One process on ``device``, joining no group (tests, notebooks)."""
        return cls(1, 0, 0, torch.device(device), False)

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that reports and writes."""
        return self.rank == 0

    def all_reduce(self, values: Sequence[float], op: Any = None) -> list[float]:
        """Combine a few numbers over all ranks (sum by default)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor.tolist()

    def gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape and dtype everywhere), in rank order, on the CPU.

        With nccl the exchange goes through this process's GPU; alone, it is ``[tensor]``.
        """
        if not self.distributed:
            return [tensor.cpu()]
        local = tensor.to(self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        return [g.cpu() for g in gathered]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this object joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
