"""Trainer ranks' process group, and gathering ZeRO-3 parameters for export.

One code path for CPU and GPU: the backend is gloo on CPU and NCCL on GPU unless set.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

import torch


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pin_to_cores(cores: Optional[str], num_threads: int) -> None:
    if cores is not None:
        os.sched_setaffinity(0, {int(c) for c in str(cores).split(",")})
    torch.set_num_threads(num_threads)


def dist_backend(name: str) -> str:
    if name != "auto":
        return name
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_single_process_group(backend: str = "auto") -> None:
    """DeepSpeed needs a process group; on one process, a group of size one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # A group of one on a fresh loopback port: an inherited MASTER_PORT (another job's, or
    # a parent process's own group) would collide.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist_backend(backend), auto_mpi_discovery=False)


def rendezvous_address() -> tuple[str, int]:
    """This machine's address and a TCP port free on it: where rank 0 of several trainer
    ranks listens. Run it on rank 0's machine (`Trainer.rendezvous`, as an actor call) and
    hand the pair to every rank's `setup`."""
    host = "127.0.0.1"
    try:
        import ray

        if ray.is_initialized():
            host = ray.util.get_node_ip_address()
    except ImportError:
        pass
    return host, _free_port("")


def init_process_group(backend: str = "auto", rank: int = 0, world_size: int = 1,
                       master_addr: Optional[str] = None, master_port: Optional[int] = None,
                       local_rank: Optional[int] = None) -> None:
    """This process as rank `rank` of `world_size` (gloo on CPU, NCCL on GPU); a group of
    one on a fresh port when world_size is 1 and no address is given. Blocks until every
    rank has joined."""
    import torch.distributed as dist

    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(f"this process already belongs to a process group as rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, not rank {rank} of {world_size}")
        return
    if world_size == 1 and master_addr is None:
        init_single_process_group(backend)
        return
    if master_addr is None or master_port is None:
        raise ValueError(f"trainer.world_size={world_size} needs master_addr and master_port: rank 0's address "
                         "and a free port there (trainer.policy_trainer.rendezvous_address)")
    if local_rank is None:  # the GPU of this rank among those this process sees (Ray shows each actor its own)
        local_rank = rank % max(1, torch.cuda.device_count())
    os.environ.update(MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port), RANK=str(rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist_backend(backend), auto_mpi_discovery=False, rank=rank,
                               world_size=world_size)


def gathered_state_dict(module: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """`module.state_dict()` of a ZeRO-3 model, gathered one module's own parameters at a
    time (never the whole model at once), copied to the CPU. A collective: every rank
    calls it; only where `keep` is the state built (the others return {})."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):  # state_dict's order and names
        dot = f"{prefix}." if prefix else ""
        params = {name: p for name, p in sub._parameters.items() if p is not None}
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            if keep:
                for name, p in params.items():
                    state[dot + name] = p.detach().to("cpu", copy=True).contiguous()
        if keep:
            for name, b in sub._buffers.items():
                if b is not None and name not in sub._non_persistent_buffers_set:
                    state[dot + name] = b.detach().to("cpu", copy=True).contiguous()
    return state
