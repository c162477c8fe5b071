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


def oldest_trained_version(group: Group, default: int) -> int:
    """The oldest version among tokens that are trained on (masked context does not age)."""
    versions = [v for t in group.trajectories for v, m in zip(t.versions, t.loss_mask) if m]
    return min(versions) if versions else default


class StalenessError(RuntimeError):
    """A group older than the staleness bound reached the trainer's side of the buffer."""


@dataclass
class Ledger:
    """Every group's life, counted. `lost` must stay 0.

    A group is started once; it then is running, buffered, in the partial pool,
    consumed, dropped by a reward failure policy, or filtered (DAPO's dynamic sampling
    keeps zero-variance groups out of batches). `partial`, `resumed` and
    `samples_interrupted` count events, not groups in a state.
    """

    started: int = 0
    finished: int = 0
    consumed: int = 0
    dropped_by_reward: int = 0
    filtered: int = 0
    partial: int = 0  # times a group was handed back unfinished (APRIL)
    resumed: int = 0  # times a partial group was resumed
    samples_interrupted: int = 0  # requests aborted by a weight update and resumed
    masked_tokens: int = 0  # APRIL: tokens kept as context only, being older than η

    @property
    def retired(self) -> int:
        """Groups that no longer take a slot in the admission count."""
        return self.dropped_by_reward + self.filtered

    def lost(self, running: int, buffered: int, partial_pool: int = 0) -> int:
        """Started groups found in no state at all."""
        return self.started - running - buffered - partial_pool - self.consumed - self.retired

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
        """At least `count` groups for the trainer at `version`, or None if it must wait.

        `running_start_versions` are the start versions of groups still generating that
        will be trained as they are. Buffered groups whose deadline is this version come
        along even beyond `count` (APRIL collects a few extra when they finish together).
        """
        if len(self._groups) < count:
            return None
        self._groups.sort(key=lambda g: g.start_version)
        must_go = sum(g.start_version + self.max_staleness <= version for g in self._groups)
        take = max(count, must_go)
        batch, rest = self._groups[:take], self._groups[take:]
        deadlines = sorted([g.start_version + self.max_staleness for g in rest] +
                           [s + self.max_staleness for s in running_start_versions])
        # The i-th earliest deadline left behind needs a slot in versions version+1 .. deadline.
        if any(i + 1 > (deadline - version) * count for i, deadline in enumerate(deadlines)):
            return None
        for group in batch:
            oldest = min(group.start_version, oldest_trained_version(group, group.start_version))
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
