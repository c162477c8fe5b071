"""The buffer between rollout and training, with its admission rule and its ledger.

Admission control (AReaL, arXiv 2505.24298): with trainer version v, staleness bound η
and batch size B (groups), a new group may start only while

    started_groups < (v + η + 1) · B

so rollouts never run further ahead than the trainer can consume within η versions.
Finished work is therefore never thrown away for being stale, and the buffer's gate
(`get`) checks the same promise from the other side: a group whose oldest token is
older than v − η is a bug, and raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from buffer.types import Group


class StalenessError(RuntimeError):
    """A group older than the staleness bound reached the trainer's side of the buffer."""


@dataclass
class Ledger:
    """Every group's life, counted. `lost` must stay 0."""

    started: int = 0
    finished: int = 0
    dropped_by_reward: int = 0  # a reward failure policy asked to drop the group
    consumed: int = 0

    def lost(self, running: int, buffered: int) -> int:
        """Groups unaccounted for: started but neither running, buffered, consumed nor dropped."""
        return self.started - running - buffered - self.consumed - self.dropped_by_reward

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class StalenessManager:
    """How many new groups may start now (the rule in the module docstring)."""

    def __init__(self, batch_groups: int, max_staleness: int) -> None:
        if batch_groups < 1 or max_staleness < 0:
            raise ValueError(f"need batch_groups >= 1 and max_staleness >= 0, got {batch_groups}, {max_staleness}")
        self.batch_groups = batch_groups
        self.max_staleness = max_staleness

    def capacity(self, version: int, started: int) -> int:
        return max(0, (version + self.max_staleness + 1) * self.batch_groups - started)


class TrajectoryBuffer:
    """Finished groups waiting for the trainer, scheduled by deadline.

    A group started at version s must be consumed by version s + η (its deadline).
    Groups finish out of order, so plain first-in-first-out would let a slow group age
    past η while younger ones overtake it. `get` therefore hands out the earliest
    deadlines first, and only if what stays behind (buffered or still generating) can
    still meet its deadlines, B groups per version; otherwise the trainer waits for the
    stragglers. Admission control guarantees a feasible schedule exists. With η = 0
    this is exactly synchronous training.
    """

    def __init__(self, max_staleness: int) -> None:
        self.max_staleness = max_staleness
        self._groups: list[Group] = []

    def __len__(self) -> int:
        return len(self._groups)

    def put(self, group: Group) -> None:
        if not group.is_finished:
            raise ValueError(f"group {group.group_id} is not finished; partial groups go to the partial pool")
        self._groups.append(group)

    def get(self, count: int, version: int, running_start_versions: Iterable[int] = ()) -> list[Group] | None:
        """`count` groups for the trainer at `version`, or None if it must wait.

        `running_start_versions` are the start versions of groups still generating.
        """
        if len(self._groups) < count:
            return None
        self._groups.sort(key=lambda g: g.start_version)
        batch, rest = self._groups[:count], self._groups[count:]
        deadlines = sorted([g.start_version + self.max_staleness for g in rest] +
                           [s + self.max_staleness for s in running_start_versions])
        # The i-th earliest deadline left behind needs a slot in versions version+1 .. deadline.
        if any(i + 1 > (deadline - version) * count for i, deadline in enumerate(deadlines)):
            return None
        for group in batch:
            oldest = min(group.start_version, group.oldest_version if group.oldest_version is not None
                         else group.start_version)
            if version - oldest > self.max_staleness:
                raise StalenessError(
                    f"group {group.group_id} has tokens from version {oldest}, consumed at version "
                    f"{version}: age {version - oldest} > max_staleness {self.max_staleness}"
                )
        self._groups = rest
        return batch

    def groups(self) -> list[Group]:
        """Everything still buffered (for checkpoints and end-of-run accounting)."""
        return list(self._groups)
