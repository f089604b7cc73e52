"""One process, or several under `torchrun` (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over all processes (one all-reduce for all of them)."""
        if self.world == 1:
            return [float(v) for v in values]
        totals = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(totals)
        return totals.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def start(device: str) -> Processes:
    """Joins torchrun's process group when launched by it, and picks the device ('auto': this
    process's GPU if there is one, else the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this torch build or machine has no CUDA device")
        chosen = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Processes(rank, world, chosen)


def stop(finished: bool) -> None:
    """Leaves the process group. When every process `finished` its run, they first wait for each
    other: one tearing the group down while another is still in a collective can abort (gloo's
    "terminate called without an active exception", seen once in CI). After a failure torchrun
    stops the others, so nobody waits."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
