"""The buffer between rollout and training, with its admission rule and its ledger.

Admission control (AReaL, arXiv 2505.24298): with staleness bound η and batch size B
(in samples: groups × responses per group), a new group may start only while the
samples in flight (started, and not yet trained on by a finished step, dropped or
filtered) number fewer than

    in_flight < (η + 1) · B

With a trainer that consumes B samples per version v this is AReaL's started < (v + η + 1)·B,
so rollouts never run further ahead than the trainer can consume within η versions.
Counting samples rather than groups bounds groups of different sizes; counting what was
consumed keeps it exact when a batch takes more than B. Groups are never split, so the
last group admitted may overshoot the bound by less than its own size.
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
    consumed, dropped (by a reward failure policy, or rejected by its rollout workflow),
    filtered (the prompt sampler kept it out of batches, as DAPO's dynamic sampling
    does zero-variance groups), requeued (its rollout worker died with it; its prompt
    item starts again as a new group, so nothing is lost and nothing is trained twice),
    extending (finished, waiting for the extra samples the sampler asked for, DARS), or
    merged (those extra samples, now part of the group they extend). `partial`, `resumed` and `samples_interrupted` count
    events, not groups in a state; `samples_trimmed` counts samples of consumed groups that
    were not trained on (D³S keeps a subset of each group).
    """

    started: int = 0
    finished: int = 0
    consumed: int = 0
    dropped: int = 0
    filtered: int = 0
    requeued: int = 0  # lost with a dead rollout worker; its prompt item was started again as a new group
    merged: int = 0  # extension groups merged into the group they extend (DARS), trained as part of it
    partial: int = 0  # times a group was handed back unfinished (APRIL)
    resumed: int = 0  # times a partial group was resumed
    samples_interrupted: int = 0  # requests aborted by a weight update and resumed
    masked_tokens: int = 0  # APRIL: tokens kept as context only, being older than η
    samples_trimmed: int = 0  # samples of consumed groups a sampler kept out of training (D³S `trim`)

    @property
    def retired(self) -> int:
        """Groups that no longer take a slot in the admission count."""
        return self.dropped + self.filtered + self.requeued + self.merged

    def lost(self, running: int, buffered: int, partial_pool: int = 0, extending: int = 0) -> int:
        """Started groups found in no state at all."""
        return self.started - running - buffered - partial_pool - extending - self.consumed - self.retired

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class StalenessManager:
    """How many more samples may start now (the rule in the module docstring)."""

    def __init__(self, batch_size: int, max_staleness: int) -> None:
        if batch_size < 1 or max_staleness < 0:
            raise ValueError(f"need batch_size >= 1 and max_staleness >= 0, got {batch_size}, {max_staleness}")
        self.batch_size = batch_size
        self.max_staleness = max_staleness

    def capacity(self, in_flight: int) -> int:
        """Room, in samples, with `in_flight` samples started and not yet consumed or retired;
        a group may start while it is > 0."""
        return max(0, (self.max_staleness + 1) * self.batch_size - in_flight)


class TrajectoryBuffer:
    """Finished groups waiting for the trainer, scheduled by deadline.

    A group started at version s must be consumed by version s + η (its deadline).
    Groups finish out of order, so plain first-in-first-out would let a slow group age
    past η while younger ones overtake it. `get` therefore hands out the earliest
    deadlines first, every group due now included; a group left behind is due later and
    goes then at the latest. A group still generating when it is due makes the trainer
    wait for it (the caller passes none when stragglers may be left as context instead).
    Admission keeps what is in flight within what the trainer consumes in η versions, so
    the batches stay near B. With η = 0 this is exactly synchronous training.
    """

    def __init__(self, max_staleness: int) -> None:
        self.max_staleness = max_staleness
        self._groups: list[Group] = []
        self._samples = 0

    def __len__(self) -> int:
        return len(self._groups)

    def put(self, group: Group) -> None:
        if not group.is_finished:
            raise ValueError(f"group {group.group_id} is not finished; partial groups go to the partial pool")
        self._groups.append(group)
        self._samples += group.num_samples

    @property
    def num_samples(self) -> int:
        return self._samples

    def get(self, batch_size: int, version: int,
            running: Iterable[tuple[int, int]] = ()) -> list[Group] | None:
        """Groups of at least `batch_size` samples for the trainer at `version`, or None if
        it must wait.

        `running` holds (start version, samples) of each group still generating that will
        be trained as it is: one due now holds the batch back. Buffered groups whose
        deadline is this version come along even beyond `batch_size`.
        """
        if self.num_samples < batch_size:
            return None
        if any(start + self.max_staleness <= version for start, _ in running):
            return None  # a straggler is due: it must be in this batch
        self._groups.sort(key=lambda g: g.start_version)
        take = taken_samples = 0
        for group in self._groups:
            if taken_samples >= batch_size and group.start_version + self.max_staleness > version:
                break
            take += 1
            taken_samples += group.num_samples
        batch, rest = self._groups[:take], self._groups[take:]
        for group in batch:
            oldest = min(group.start_version, oldest_trained_version(group, group.start_version))
            if version - oldest > self.max_staleness:
                raise StalenessError(
                    f"group {group.group_id} has tokens from version {oldest}, consumed at version "
                    f"{version}: age {version - oldest} > max_staleness {self.max_staleness}"
                )
        self._groups = rest
        self._samples -= sum(g.num_samples for g in batch)
        return batch

    def groups(self) -> list[Group]:
        """Everything still buffered (for checkpoints and end-of-run accounting)."""
        return list(self._groups)
