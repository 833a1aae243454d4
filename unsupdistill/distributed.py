"""Optional torch.distributed: a single process needs no setup, torchrun scales it out."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def init_distributed(device: torch.device) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise do nothing.

    The backend is NCCL for CUDA devices and gloo on CPU; torchrun's environment variables (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT) say where the other processes are.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds each process to its own GPU
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def rank() -> int:
    """This process's global rank among all processes; 0 when not distributed.

    Readable before the process group exists (torchrun's RANK), so logging can be set up first.
    """
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes; 1 when not distributed."""
    return dist.get_world_size() if dist.is_initialized() else 1


def launched_world_size() -> int:
    """Number of processes torchrun started (WORLD_SIZE), readable before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process writes files and logs (rank 0)."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 otherwise), which picks its GPU.

    Readable before the process group exists, unlike :func:`rank`.
    """
    return int(os.environ.get("LOCAL_RANK", "0"))


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a floating-point tensor over processes (the tensor itself when not distributed)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def broadcast_int(value: int) -> int:
    """Process 0's ``value`` in every process (``value`` itself when not distributed)."""
    if not dist.is_initialized():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def broadcast_object(obj: object) -> object:
    """Process 0's ``obj`` (any picklable object) in every process (``obj`` itself when not distributed)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj: object) -> list:
    """Every process's ``obj``, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[None]:
    """The process group's one owner: joined on entry when torchrun launched several processes, left on exit,
    whatever ends the block. Inside an outer session it does nothing, so a library entry point (``methods.train``)
    and the CLI around it can both use it."""
    if dist.is_initialized():
        yield
        return
    init_distributed(device)
    try:
        yield
    finally:
        cleanup()


def barrier() -> None:
    """Wait until every process gets here (nothing when not distributed)."""
    if dist.is_initialized():
        dist.barrier()
