"""The `broadcast` weight transport's wire: buckets of tensors over a torch.distributed group
between trainer rank 0 (rank 0 of the group) and every rollout engine's model worker.

One code path on every platform: the group is a stand-alone gloo group on CPU and NCCL on
GPU, made from its own TCP store, so it lives beside DeepSpeed's process group and vLLM's
instead of inside either. Weights travel in buckets of at most `weight_sync.bucket_mb`:
the tensors of one fusion unit (a layer's q/k/v projections, its gate/up projections)
always share a bucket, so a receiver never holds half of a fused weight, and a receiver's
extra memory is one bucket. The plan (which tensor goes in which bucket, in which order)
is made once, at start-up, from names, shapes and dtypes, and both sides hold it; each
version only says which buckets follow (all of them, or with delta sync the ones whose
bytes changed since the version the engines hold).

Pure torch: the trainer (sender) and the vLLM worker extension (receiver) both import it;
it lives on the rollout side, which the trainer side may import (not the other way).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch

FUSED = (re.compile(r"\.(q|k|v)_proj\."), ".qkv_proj."), (re.compile(r"\.(gate|up)_proj\."), ".gate_up_proj.")


def fusion_unit(name: str) -> str:
    """The name a tensor shares with the tensors it is fused with in the engine."""
    for pattern, fused in FUSED:
        name = pattern.sub(fused, name)
    return name


@dataclass
class Bucket:
    names: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_buckets(tensors: Iterable[tuple[str, list[int], str]], bucket_bytes: int) -> list[Bucket]:
    """Buckets of at most `bucket_bytes`, each of one dtype, filled in the tensors' order,
    never splitting a fusion unit; a unit larger than the cap travels alone (its size is then
    the receiver's extra memory)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket size must be >= 1 byte, got {bucket_bytes}")
    units: dict[tuple[str, str], list[tuple[str, list[int]]]] = {}
    for name, shape, dtype in tensors:
        units.setdefault((fusion_unit(name), dtype), []).append((name, list(shape)))
    buckets: list[Bucket] = []
    filling: dict[str, Bucket] = {}  # the open bucket of each dtype
    for (_, dtype), members in units.items():
        size = sum(_numel(s) for _, s in members) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
        current = filling.get(dtype)
        if current is None or (current.names and current.nbytes + size > bucket_bytes):
            current = filling[dtype] = Bucket(dtype=dtype)
            buckets.append(current)
        for name, shape in members:
            current.names.append(name)
            current.shapes.append(shape)
    return buckets


def plan_of(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[Bucket]:
    return plan_buckets(((k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()),
                        bucket_bytes)


def flatten(bucket: Bucket, tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> torch.Tensor:
    """The bucket's tensors, in plan order, as one flat tensor (the only copy sent)."""
    dtype = getattr(torch, bucket.dtype)
    return torch.cat([tensors[n].detach().reshape(-1).to(device=device, dtype=dtype) for n in bucket.names])


def unflatten(bucket: Bucket, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of a received flat tensor, named and shaped as the plan says."""
    offset = 0
    for name, shape in zip(bucket.names, bucket.shapes):
        n = _numel(shape)
        yield name, flat[offset:offset + n].view(shape)
        offset += n


def digest(flat: torch.Tensor) -> str:
    """What a bucket's bytes hash to, for delta sync (a changed bucket changes its hash)."""
    return hashlib.blake2b(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def open_group(address: str, port: int, rank: int, world: int, backend: str, timeout_s: float):
    """A stand-alone process group (its own TCP store): `rank` 0 is the trainer. Every member
    must call this concurrently; it returns once all of them have joined."""
    from torch.distributed import TCPStore

    store = TCPStore(address, port, world, is_master=rank == 0, timeout=timedelta(seconds=timeout_s),
                     wait_for_workers=False)
    timeout = timedelta(seconds=timeout_s)
    if backend == "auto":  # each side resolves it where it runs: NCCL between GPUs, else gloo
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        return ProcessGroupNCCL(store, rank, world, options)
    if backend != "gloo":
        raise ValueError(f"weight_sync.backend must be auto, gloo or nccl, got {backend!r}")
    from torch.distributed import ProcessGroupGloo

    return ProcessGroupGloo(store, rank, world, timeout)


def send(group, plan: list[Bucket], tensors: dict[str, torch.Tensor], which: list[int],
         device: str | torch.device = "cpu") -> int:
    """Broadcast the buckets `which` from rank 0, one at a time; returns bytes sent."""
    sent = 0
    for i in which:
        flat = flatten(plan[i], tensors, device)
        group.broadcast(flat, 0).wait()
        sent += flat.numel() * flat.element_size()
    return sent


def receive(group, plan: list[Bucket], which: list[int], device: str | torch.device = "cpu") -> Iterator[
        list[tuple[str, torch.Tensor]]]:
    """Each bucket of `which` as it arrives, as (name, tensor) pairs: one bucket in memory."""
    for i in which:
        bucket = plan[i]
        flat = torch.empty(bucket.numel, dtype=getattr(torch, bucket.dtype), device=device)
        group.broadcast(flat, 0).wait()
        yield list(unflatten(bucket, flat))


def plan_to_json(plan: list[Bucket]) -> list[dict]:
    return [{"names": b.names, "shapes": b.shapes, "dtype": b.dtype} for b in plan]


def plan_from_json(data: list[dict]) -> list[Bucket]:
    return [Bucket(d["names"], [list(s) for s in d["shapes"]], d["dtype"]) for d in data]
