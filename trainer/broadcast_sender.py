"""The trainer's side of the `broadcast` weight transport (rank 0 of the weight group).

`Trainer` takes these methods: `broadcast_open` fixes the bucket plan (and, on trainer
rank 0, joins the group with every engine); after that each step's export is a small
*ticket* (version, the buckets that follow, their bytes) instead of a blob, and
`broadcast_send` streams those buckets while the engines receive them. With `delta`, only
the buckets whose bytes changed since the last version sent travel (the first version
sends all of them).

The weights are read bucket by bucket from the live parameters, never copied whole: the
extra memory of a send is one bucket. Under ZeRO-3 each bucket's parameters are gathered
just for it (`deepspeed.zero.GatheredParameters`, a collective), so every trainer rank
runs `broadcast_open`, `broadcast_ticket` and `broadcast_send` in the same order; ranks
other than 0 only take part in the gathers.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

import torch

from rollout.broadcast import Bucket, digest, flatten, open_group, plan_buckets, plan_to_json


class BroadcastSender:
    _group = None
    _bucket_plan: list | None = None
    _sent_digests: list[str] | None = None
    _delta = False

    def free_port(self) -> tuple[str, int]:
        """An address the engines can reach this process at, and a free port on it."""
        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            return ray.util.get_node_ip_address(), sock.getsockname()[1]

    def broadcast_open(self, address: str, port: int, world: int, backend: str, bucket_mb: float,
                       timeout_s: float, delta: bool) -> list:
        """Plan the buckets; on trainer rank 0 also join the weight group as its rank 0
        (returns once every engine has joined). Returns the plan, for the engines."""
        tensors = self._checkpoint_tensors()
        self._bucket_plan = plan_buckets(
            ((name, list(_full_shape(t)), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()),
            int(bucket_mb * 2**20))
        self._delta = delta
        self._sent_digests = None
        if self._sender_rank() == 0:
            self._group = open_group(address, port, 0, world, backend, timeout_s)
        return plan_to_json(self._bucket_plan)

    def broadcast_ticket(self, version: int) -> dict[str, Any] | None:
        """What this version's push sends: every bucket, or with delta sync the changed ones
        (rank 0; the other ranks return None after taking part in the gathers)."""
        which = list(range(len(self._bucket_plan)))
        if self._delta:
            digests = self._bucket_digests()
            if self._sender_rank() != 0:
                return None
            if self._sent_digests is not None:
                which = [i for i, (a, b) in enumerate(zip(digests, self._sent_digests)) if a != b]
            self._sent_digests = digests
        elif self._sender_rank() != 0:
            return None
        return {"transport": "broadcast", "version": version, "buckets": which,
                "complete": len(which) == len(self._bucket_plan),
                "bytes": sum(self._bucket_plan[i].nbytes for i in which)}

    def broadcast_send(self, ticket: dict | None) -> dict[str, float]:
        """Stream the ticket's buckets to every engine (they receive in the same call).
        Every trainer rank is called with rank 0's ticket."""
        if ticket is None:  # the step was skipped (non-finite): nothing changed, nothing travels
            return {"bytes": 0.0, "seconds": 0.0}
        start = time.perf_counter()
        tensors = self._checkpoint_tensors()
        device = next(self.engine.module.parameters()).device  # type: ignore[attr-defined]
        sent = 0
        for i in ticket["buckets"]:
            bucket = self._bucket_plan[i]
            with self._gathered(bucket, tensors):
                flat = flatten(bucket, tensors, device) if self._sender_rank() == 0 else None
            if flat is not None:  # (the gathered parameters are released before the wire)
                self._group.broadcast(flat, 0).wait()
                sent += flat.numel() * flat.element_size()
        return {"bytes": float(sent), "seconds": time.perf_counter() - start}

    # -- reading the weights ---------------------------------------------------------------
    def _sender_rank(self) -> int:
        return int(getattr(self, "rank", 0))

    def _zero3(self) -> bool:
        return getattr(getattr(self, "cfg", None), "zero_stage", 0) == 3

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The live parameters and persistent buffers by checkpoint name, in state_dict's
        order (as `trainer.distributed.gathered_state_dict` names them); no copies. Under
        ZeRO-3 a parameter is a partition until gathered (`_full_shape` is its shape)."""
        module = self.engine.module  # type: ignore[attr-defined]
        out: dict[str, torch.Tensor] = {}
        for prefix, sub in module.named_modules(remove_duplicate=False):
            dot = f"{prefix}." if prefix else ""
            for name, p in sub._parameters.items():
                if p is not None:
                    out[dot + name] = p
            for name, b in sub._buffers.items():
                if b is not None and name not in sub._non_persistent_buffers_set:
                    out[dot + name] = b
        return out

    def _gathered(self, bucket: Bucket, tensors: dict[str, torch.Tensor]):
        """The bucket's ZeRO-3 parameters gathered whole on every rank (a collective), or
        nothing to do without ZeRO-3."""
        if not self._zero3():
            return contextlib.nullcontext()
        import deepspeed

        params = list({id(t): t for n in bucket.names if hasattr(t := tensors[n], "ds_id")}.values())
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def _bucket_digests(self) -> list[str]:
        """Each bucket's digest (rank 0; under ZeRO-3 the others only gather along)."""
        tensors = self._checkpoint_tensors()
        digests = []
        for bucket in self._bucket_plan:
            with self._gathered(bucket, tensors):
                if self._sender_rank() == 0:
                    digests.append(digest(flatten(bucket, tensors)))
        return digests


def _full_shape(tensor: torch.Tensor) -> torch.Size:
    return getattr(tensor, "ds_shape", tensor.shape)
