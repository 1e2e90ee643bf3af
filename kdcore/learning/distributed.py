"""Multi-process training on torch.distributed: gloo on CPU, nccl on CUDA.

Launches:

    kdcore train --nproc 2 ...                                   # N processes on this machine
    torchrun --nproc_per_node 2 -m kdcore.train ...              # the same, through torchrun
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 4 -m kdcore.train ...

Every rank draws the same global batch from the same seeded generator and trains on its
strided share of it; DDP averages the gradients, so N processes take the same steps as one
(the role a DistributedSampler plays in an epoch-based loader, kept per step so that runs of
any world size are comparable). Only rank 0 writes to the run store and prints.

The processes of ``kdcore train --nproc N`` (and the CLI's pool workers) die with the command
that started them (:func:`exit_with_parent`): a killed CLI leaves no rank training on.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_process_group(device: str) -> None:
    """Join the group described by the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    # a rank that dies must not leave the others waiting for the default 30 minutes
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=120))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(values: list[float]) -> list[float]:
    """Element-wise sum over all ranks (identity in one process)."""
    rank, world = rank_and_world()
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def any_across(flag: bool) -> bool:
    """True on every rank when it is True on any rank: how a cancel seen by rank 0 stops all."""
    return sum_across([float(flag)])[0] > 0


def gather_rows(local: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Reassemble a tensor sharded as ``full[rank::world]`` on every rank."""
    if world == 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, local.cpu())
    n = sum(len(p) for p in parts)
    full = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        full[r::world] = part
    return full


def broadcast_str(value: str | None) -> str:
    """Rank 0's string on every rank (e.g. the run id it created)."""
    _, world = rank_and_world()
    if world == 1:
        return value or ""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_parent(parent_pid: int) -> None:
    """End this process as soon as ``parent_pid``, its parent, is gone, even by ``kill -9``.

    Called first thing in a CLI's worker processes (pool workers, DDP ranks), which must not
    train on, write to the store or idle after the command is killed; a run they leave is
    then reaped as interrupted. On Linux the kernel delivers SIGKILL at the parent's death
    (``prctl(PR_SET_PDEATHSIG)``); elsewhere a thread checks the parent once a second.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent_pid:  # the parent died before the request took effect
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker(local_rank: int, world: int, port: int, parent_pid: int, fn: Callable,
            args: tuple) -> None:
    exit_with_parent(parent_pid)
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(*args)


def spawn(fn: Callable, nproc: int, *args) -> None:
    """Run ``fn(*args)`` in ``nproc`` processes on this machine, as torchrun would; they die
    with this process."""
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(nproc, free_port(), os.getpid(), fn, args), nprocs=nproc,
                       start_method="spawn", join=True)
