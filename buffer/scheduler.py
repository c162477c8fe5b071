"""The launcher's bookkeeping as one pure class: what to start, what to resume, what to train.

`trainer/launcher.py` only moves data between the Ray actors; every decision about
groups is made here, so the property tests drive exactly the code a run uses:

- admission: AReaL's rule (`StalenessManager`) on the trainer's version, or, with APRIL
  over-provisioning, a fixed number of groups in flight per version. A group admitted at
  version v generates only on weights of version >= v: the rollout worker holds it until
  v's weights are on their way into the engine (`RolloutWorker.submit`), so admission
  need not wait for the worker to acknowledge an update;
- batches: `TrajectoryBuffer.get`, which schedules by deadline so no trained token is
  older than η. A group still generating at its deadline is a *straggler*: with
  `stragglers="wait"` the trainer waits for it; with `"mask"` it does not, and the
  straggler's tokens older than η become context only (kept, not trained on) when it
  is consumed;
- partial groups (APRIL): handed back unfinished, resumed first after the next weight
  sync, with tokens older than η masked out of the loss (they stay as context); or, with
  requests paused rather than aborted, held in the engine across the sync (`hold_running`);
- the ledger, which must balance at every moment.
"""

from __future__ import annotations

from collections.abc import Iterable

from buffer.buffer import Ledger, StalenessManager, TrajectoryBuffer
from buffer.types import Group


def mask_stale_tokens(group: Group, before_version: int) -> int:
    """Take tokens older than `before_version` out of the loss; returns how many."""
    masked = 0
    for traj in group.trajectories:
        new_mask = [0 if v < before_version else m for v, m in zip(traj.versions, traj.loss_mask)]
        masked += sum(traj.loss_mask) - sum(new_mask)
        traj.loss_mask = new_mask
    return masked


class FilteredTooOftenError(RuntimeError):
    """DAPO's dynamic sampling found nothing to learn from for too long."""


STRAGGLER_POLICIES = ("wait", "mask")


class RolloutScheduler:
    def __init__(self, batch_groups: int, max_staleness: int, overprovision: float = 1.0,
                 dynamic_sampling: bool = False, max_num_gen_batches: int = 10, stragglers: str = "wait") -> None:
        if stragglers not in STRAGGLER_POLICIES:
            raise ValueError(f"stragglers={stragglers!r} is not one of {list(STRAGGLER_POLICIES)}")
        self.batch_groups = batch_groups
        self.eta = max_staleness
        self.april = overprovision > 1
        # APRIL re-bases what it interrupts, so it never waits for a straggler either
        self.mask_stragglers = self.april or stragglers == "mask"
        self.in_flight_target = int(overprovision * batch_groups)
        self.dynamic_sampling = dynamic_sampling
        self.max_filtered = max_num_gen_batches * batch_groups
        self.gate = StalenessManager(batch_groups, max_staleness)
        self.buffer = TrajectoryBuffer(max_staleness)
        self.ledger = Ledger()
        self.running: dict[str, int] = {}  # group id -> start version, for groups generating
        self.partial_pool: list[Group] = []
        self.was_partial: set[str] = set()
        self.filtered_in_a_row = 0
        self.batch_taken = -1  # the last version a batch was handed out for

    def generation_open(self, version: int) -> bool:
        """Under APRIL (synchronous with over-provisioning) new segments start for a version
        only until its batch is taken: the unfinished groups then wait for the next
        version instead of running on."""
        return not self.april or self.batch_taken < version

    # -- what to generate ----------------------------------------------------------------
    def partials_to_resume(self, version: int) -> tuple[list[Group], int]:
        """Partial groups to resume now, on weights of `version` or newer (the worker holds
        them until those weights are in), and the version before which their tokens leave
        the loss."""
        if not self.partial_pool or not self.generation_open(version):
            return [], 0
        mask_before = version - self.eta
        groups, self.partial_pool = self.partial_pool, []
        for group in groups:
            self.ledger.masked_tokens += mask_stale_tokens(group, mask_before)
            group.start_version = max(group.start_version, mask_before)
            self.running[group.group_id] = group.start_version
        self.ledger.resumed += len(groups)
        return groups, mask_before

    def capacity(self, version: int) -> int:
        """How many new groups may start at the trainer's `version`."""
        if self.partial_pool:
            return 0  # partial groups go first
        if self.april:
            if not self.generation_open(version):
                return 0
            return max(0, self.in_flight_target - len(self.running) - len(self.buffer))
        return self.gate.capacity(version, self.ledger.started - self.ledger.retired)

    def hold_running(self) -> int:
        """APRIL with requests paused, not aborted, at the batch boundary: the groups still
        generating stay in the engine and go on first on the next weights. They cross a
        version as a partial group does, so they count as partial and resumed; their
        tokens older than η leave the loss when consumed (`next_batch`)."""
        held = list(self.running)
        self.was_partial.update(held)
        self.ledger.partial += len(held)
        self.ledger.resumed += len(held)
        return len(held)

    def started(self, group_ids: Iterable[str], start_version: int) -> None:
        for group_id in group_ids:
            self.running[group_id] = start_version
            self.ledger.started += 1

    # -- what came back ----------------------------------------------------------------
    def absorb(self, groups: list[Group], dropped: list[str], partial: list[Group]) -> None:
        """File what the worker handed over under the right state and count it."""
        for group in groups:
            self.running.pop(group.group_id)
            self.ledger.finished += 1
            if self.dynamic_sampling and len(set(group.rewards)) == 1:
                self.ledger.filtered += 1
                self.filtered_in_a_row += 1
                if self.filtered_in_a_row > self.max_filtered:
                    raise FilteredTooOftenError(
                        f"dynamic sampling filtered {self.filtered_in_a_row} groups in a row (every response "
                        "in each scored the same): the task is too easy or too hard for this policy. Lower "
                        "the difficulty, raise algorithm.max_num_gen_batches, or set algorithm.dynamic_sampling=false."
                    )
                continue
            self.filtered_in_a_row = 0
            self.buffer.put(group)
        for group_id in dropped:
            self.running.pop(group_id)
            self.ledger.dropped_by_reward += 1
        for group in partial:
            self.running.pop(group.group_id)
            self.partial_pool.append(group)
            self.was_partial.add(group.group_id)
            self.ledger.partial += 1

    # -- what to train ---------------------------------------------------------------
    def next_batch(self, version: int) -> list[Group] | None:
        """A batch for the trainer at `version`, or None to wait. Under APRIL the caller
        then interrupts everything still generating."""
        binding: Iterable[int] = self.running.values()
        if self.mask_stragglers:
            # Running groups do not bind the schedule: whatever is consumed keeps its tokens
            # of the last η versions for training and its older ones as context only.
            binding = ()
            floor = version - self.eta
            for group in self.buffer.groups():
                if group.start_version < floor:
                    self.ledger.masked_tokens += mask_stale_tokens(group, floor)
                    group.start_version = floor
        batch = self.buffer.get(self.batch_groups, version, binding)
        if batch is not None:
            self.ledger.consumed += len(batch)
            self.batch_taken = version
        return batch

    def partial_ratio(self, batch: list[Group]) -> float:
        ratio = sum(g.group_id in self.was_partial for g in batch) / len(batch)
        self.was_partial.difference_update(g.group_id for g in batch)
        return ratio

    def lost(self, cancelled: int | None = None) -> int:
        running = len(self.running) if cancelled is None else cancelled
        return self.ledger.lost(running, len(self.buffer), len(self.partial_pool))

    def summary(self, cancelled: int) -> dict[str, int]:
        return {**self.ledger.as_dict(), "unfinished_at_exit": cancelled, "buffered_at_exit": len(self.buffer),
                "partial_at_exit": len(self.partial_pool), "lost": self.lost(cancelled)}
