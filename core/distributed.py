"""Data parallelism through torch.distributed, as launched by torchrun (or DeepSpeed's launcher).

One process per device; the collective backend comes from the device backend's capabilities (gloo
on the CPU, nccl on CUDA, hccl on Ascend). We only start the process group and use torch's
collectives; DistributedDataParallel and DeepSpeed do the gradient exchange. A framework with a
launcher of its own (MindSpore's msrun) joins its job itself and gives `Dist` its own `Collective`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch
import torch.distributed as dist


class Collective(Protocol):
    """A framework's own collectives over the job it joined (MindSpore's under msrun), for `Dist`."""

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all processes, the same numbers on every process."""

    def barrier(self) -> None:
        """Return once every process has called it."""


@dataclass(frozen=True)
class Job:
    """This process's place in the job its launcher started, as the launcher's environment says it before
    the process joins the job (a run validates and locks its folder before joining)."""

    rank: Optional[int] = 0  # None: a process of the launcher's own (msrun's scheduler): it trains and writes nothing
    world_size: int = 1


def torchrun_job() -> Job:
    """The job torchrun (or DeepSpeed's launcher) describes in RANK and WORLD_SIZE; one process without them."""
    return Job(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collective tensors live: the CPU for gloo, this process's device otherwise
    # the framework's own collectives (None: torch.distributed's, once torchrun's process group is started)
    collective: Optional[Collective] = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all processes (the values themselves when alone)."""
        if self.collective is not None and self.world_size > 1:
            return self.collective.all_sum(list(values))
        if not self.active or self.world_size == 1:
            return list(values)
        dtype = torch.float64 if self.device == "cpu" else torch.float32  # not every accelerator has fp64
        tensor = torch.tensor(values, dtype=dtype, device=self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def barrier(self) -> None:
        if self.collective is not None and self.world_size > 1:
            self.collective.barrier()
        elif self.active and self.world_size > 1:
            dist.barrier()


def launched() -> bool:
    """Started by torchrun or DeepSpeed's launcher (they describe the job in the environment)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(dist_backend: str, device_of, process_group_alone: bool = False) -> Dist:
    """Join the job torchrun described in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*).

    Args:
        dist_backend: "gloo", "nccl" or "hccl".
        device_of: local rank -> torch.device of that process (the backend's `device`).
        process_group_alone: start the process group even for a one-process job (DeepSpeed needs one).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not launched() or (world == 1 and not process_group_alone):
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(dist_backend)
    local = int(os.environ["LOCAL_RANK"])
    device = "cpu" if dist_backend == "gloo" else str(device_of(local))
    return Dist(rank=dist.get_rank(), world_size=world, local_rank=local, device=device)


def in_process_group() -> bool:
    """Whether this process joined a torch.distributed job (it was started by a launcher)."""
    return dist.is_available() and dist.is_initialized()
