"""Data-parallel training on PyTorch's own engine: torch.distributed and DistributedDataParallel.

Launch the same training script N times with

    torchrun --standalone --nproc_per_node=N script.py      (or python -m torch.distributed.run ...)

and every process trains its own copy of the models on its own slice of each global batch;
DDP averages the gradients during backward, so all copies take identical steps. With the
loss weighting in `shard_weight`, N processes with global batch B take the same steps as
one process with batch B (up to float32 summation order in the gradient all-reduce).
Outside torchrun every function here acts for a single process and needs no set-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    """Who this process is among the training processes, and where its tensors live."""

    rank: int
    world_size: int
    local_rank: int  # the process's index on its own machine: picks its GPU
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files (checkpoints, logs) and shows progress."""
        return self.rank == 0


def setup() -> DistInfo:
    """Join the process group torchrun describes in the environment, or run as a single process.

    CPU processes talk over gloo; CUDA ones over nccl, each on the GPU of its local rank.
    Calling it again in the same process returns the same answer without re-joining.
    """
    env = os.environ
    cuda = torch.cuda.is_available()
    if "RANK" not in env or "WORLD_SIZE" not in env:  # not launched by torchrun
        return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda" if cuda else "cpu"))
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # torchrun's MASTER_ADDR / MASTER_PORT in the environment tell the processes where to meet.
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def teardown() -> None:
    """Leave the process group (a no-op for a single process)."""
    if is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """The model wrapped in DistributedDataParallel, or the model itself in a single process.

    DDP starts by copying rank 0's parameters to every process, and hooks into the model's
    forward to average gradients in backward: call the wrapped model (its forward) once per
    step; calling other methods of `.module` would skip the gradient averaging.
    """
    if not is_initialized():
        return model
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard(global_batch: int, info: DistInfo) -> tuple[int, int]:
    """(offset, count): this process's contiguous slice of a global batch's sample indices.

    Rank r takes samples [offset, offset + count) of every global batch; the slices of all
    ranks tile the batch in rank order, so the union is exactly what one process would see.
    When the batch does not divide evenly the first ranks take one sample more.
    """
    if global_batch < info.world_size:
        raise ValueError(
            f"global batch size {global_batch} is smaller than the {info.world_size} "
            f"training processes; every process needs at least one sample"
        )
    base, remainder = divmod(global_batch, info.world_size)
    count = base + (1 if info.rank < remainder else 0)
    offset = info.rank * base + min(info.rank, remainder)
    return offset, count


def shard_weight(global_batch: int, info: DistInfo) -> float:
    """What to multiply this process's mean loss by so DDP's gradient average is the global mean's gradient.

    DDP divides the summed gradients by the number of processes; a process holding `count`
    of the B samples contributes mean_r * count * N / B, and the average over the N
    processes is then sum(all losses) / B, the one-process mean. Exactly 1.0 when B
    divides evenly.
    """
    _, count = shard(global_batch, info)
    return count * info.world_size / global_batch


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place (unchanged in a single process)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(value: Any, info: DistInfo) -> list:
    """Every process's `value`, by rank (picklable values; [value] in a single process)."""
    if not is_initialized():
        return [value]
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait until every process arrives here (e.g. until rank 0 has written a checkpoint)."""
    if is_initialized():
        dist.barrier()
