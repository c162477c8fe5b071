"""The trainer's side of the `broadcast` weight transport (rank 0 of the weight group).

`Trainer` takes these methods: `broadcast_open` joins the group with every engine and fixes
the bucket plan; after that each step's export is a small *ticket* (version, the buckets
that follow, their bytes) instead of a blob, and `broadcast_send` streams those buckets
while the engines receive them. With `delta`, only the buckets whose bytes changed since
the last version sent travel (the first version sends all of them).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import torch

from rollout.broadcast import digest, flatten, open_group, plan_of, plan_to_json, send


class BroadcastSender:
    _group = None
    _bucket_plan: list | None = None
    _sent_digests: list[str] | None = None

    def free_port(self) -> tuple[str, int]:
        """An address the engines can reach this process at, and a free port on it."""
        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            return ray.util.get_node_ip_address(), sock.getsockname()[1]

    def broadcast_open(self, address: str, port: int, world: int, backend: str, bucket_mb: float,
                       timeout_s: float, delta: bool) -> list:
        """Join the weight group as rank 0 (returns once every engine has joined) and plan
        the buckets; returns the plan, for the engines."""
        self._group = open_group(address, port, 0, world, backend, timeout_s)
        self._bucket_plan = plan_of(self._weights_for_plan(), int(bucket_mb * 2**20))
        self._delta = delta
        self._sent_digests = None
        return plan_to_json(self._bucket_plan)

    def _weights_for_plan(self) -> dict[str, torch.Tensor]:
        return self.weights_state()  # (names, shapes and dtypes are all the plan reads)

    def weights_state(self) -> dict[str, torch.Tensor]:
        """The policy's weights by checkpoint name (the trainer's; it gathers them under ZeRO-3)."""
        raise NotImplementedError

    def broadcast_ticket(self, version: int) -> dict[str, Any]:
        """What this version's push sends: every bucket, or with delta sync the changed ones."""
        state = self.weights_state()
        which = list(range(len(self._bucket_plan)))
        if self._delta:
            digests = [digest(flatten(b, state)) for b in self._bucket_plan]
            if self._sent_digests is not None:
                which = [i for i, (a, b) in enumerate(zip(digests, self._sent_digests)) if a != b]
            self._sent_digests = digests
        return {"transport": "broadcast", "version": version, "buckets": which,
                "complete": len(which) == len(self._bucket_plan), "bytes": sum(self._bucket_plan[i].nbytes for i in which)}

    def broadcast_send(self, ticket: dict | None) -> dict[str, float]:
        """Stream the ticket's buckets to every engine (they receive in the same call)."""
        if ticket is None:  # the step was skipped (non-finite): nothing changed, nothing travels
            return {"bytes": 0.0, "seconds": 0.0}
        start = time.perf_counter()
        device = next(self.engine.module.parameters()).device  # type: ignore[attr-defined]
        sent = send(self._group, self._bucket_plan, self.weights_state(), ticket["buckets"], device)
        return {"bytes": float(sent), "seconds": time.perf_counter() - start}
