"""The orchestrator's bookkeeping as one pure class: what to start, what to resume, what to train.

`trainer/orchestrator.py` only moves data between the engines; every decision about
groups is made here, so the property tests drive exactly the code a run uses:

- admission: AReaL's rule (`StalenessManager`), counted in samples, or, with APRIL
  over-provisioning, a fixed number of samples in flight per version; a group starts
  while there is room, however large it is (groups are never split). A group admitted at version v generates only on weights of version >= v: the
  rollout worker holds it until v's weights are on their way into the engine
  (`RolloutWorker.submit`), so admission need not wait for the worker to acknowledge an
  update;
- batches: `TrajectoryBuffer.get`, which schedules by deadline so no trained token is
  older than η. A group still generating at its deadline is a *straggler*: with
  `stragglers="wait"` the trainer waits for it; with `"proceed"` it does not, and the
  straggler's tokens older than η become context only (kept, not trained on) when it
  is consumed;
- partial groups (APRIL): handed back unfinished, resumed first after the next weight
  sync, with tokens older than η masked out of the loss (they stay as context); or, with
  requests paused rather than aborted, held in the engine across the sync (`hold_running`);
- the ledger, which must balance at every moment. Every running group is remembered
  with its prompt item and the rollout worker it went to, so a dead worker's groups can
  be found and started again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from buffer.buffer import Ledger, StalenessManager, TrajectoryBuffer
from buffer.prompts import PromptItem
from buffer.types import Group


def mask_stale_tokens(group: Group, before_version: int) -> int:
    """Take tokens older than `before_version` out of the loss; returns how many."""
    masked = 0
    for traj in group.trajectories:
        new_mask = [0 if v < before_version else m for v, m in zip(traj.versions, traj.loss_mask)]
        masked += sum(traj.loss_mask) - sum(new_mask)
        traj.loss_mask = new_mask
    return masked


STRAGGLER_POLICIES = ("wait", "proceed")
RENAMED_STRAGGLER_POLICIES = {"mask": "proceed"}


@dataclass
class RunningGroup:
    """A group some rollout worker is generating (or holds for newer weights)."""

    item: PromptItem
    worker: int  # index of the rollout client it went to
    start_version: int

    @property
    def samples(self) -> int:
        return self.item.n_samples


class RolloutScheduler:
    def __init__(self, batch_groups: int, n_samples: int, max_staleness: int, overprovision: float = 1.0,
                 stragglers: str = "wait") -> None:
        if stragglers not in STRAGGLER_POLICIES:
            raise ValueError(f"stragglers={stragglers!r} is not one of {list(STRAGGLER_POLICIES)}")
        self.batch_groups = batch_groups
        self.batch_size = batch_groups * n_samples  # samples per batch
        self.eta = max_staleness
        self.april = overprovision > 1
        # APRIL re-bases what it interrupts, so it never waits for a straggler either
        self.proceed_past_stragglers = self.april or stragglers == "proceed"
        self.in_flight_target = int(overprovision * self.batch_size)
        self.gate = StalenessManager(self.batch_size, max_staleness)
        self.buffer = TrajectoryBuffer(max_staleness)
        self.ledger = Ledger()
        self.running: dict[str, RunningGroup] = {}
        self.partial_pool: list[Group] = []
        self.was_partial: set[str] = set()  # ids of groups that crossed a version unfinished
        self.samples_started = 0
        self.samples_retired = 0  # of dropped and filtered groups: their slots are free again
        self.samples_consumed = 0
        self.last_batch_samples = 0
        self.extending: dict[str, Group] = {}  # finished groups waiting for their extension's samples
        self.extension_of: dict[str, str] = {}  # extension group id -> the group it extends
        self.batch_taken = -1  # the last version a batch was handed out for

    def generation_open(self, version: int) -> bool:
        """Under APRIL (synchronous with over-provisioning) new segments start for a version
        only until its batch is taken: the unfinished groups then wait for the next
        version instead of running on."""
        return not self.april or self.batch_taken < version

    # -- what to generate ----------------------------------------------------------------
    def partials_to_resume(self, version: int, worker: int = 0) -> tuple[list[Group], int]:
        """Partial groups to resume now on `worker`, on weights of `version` or newer (the
        worker holds them until those weights are in), and the version before which their
        tokens leave the loss."""
        if not self.partial_pool or not self.generation_open(version):
            return [], 0
        mask_before = version - self.eta
        groups, self.partial_pool = self.partial_pool, []
        for group in groups:
            self.ledger.masked_tokens += mask_stale_tokens(group, mask_before)
            group.start_version = max(group.start_version, mask_before)
            self.running[group.group_id] = RunningGroup(item_of(group), worker, group.start_version)
        self.ledger.resumed += len(groups)
        return groups, mask_before

    def capacity(self, version: int) -> int:
        """Room for new samples at the trainer's `version`: groups may start while it is > 0."""
        if self.partial_pool:
            return 0  # partial groups go first
        if self.april:
            if not self.generation_open(version):
                return 0
            in_flight = sum(r.samples for r in self.running.values()) + self.buffer.num_samples
            return max(0, self.in_flight_target - in_flight)
        # A batch frees its room when its step ends (the version moves on), as in AReaL's
        # started < (v + eta + 1) * B, not when it is handed to the trainer.
        trained = self.samples_consumed - (self.last_batch_samples if self.batch_taken >= version else 0)
        return self.gate.capacity(self.samples_started - self.samples_retired - trained)

    def hold_running(self, group_ids: Iterable[str]) -> int:
        """APRIL with requests paused, not aborted, at the batch boundary: the groups the
        worker says it holds in the engine go on first on the next weights. They cross a
        version as a partial group does, so they count as partial and resumed; their
        tokens older than η leave the loss when consumed (`next_batch`). Groups that had
        finished generating (being scored, or not yet collected) are not held."""
        held = [gid for gid in group_ids if gid in self.running]
        self.was_partial.update(held)
        self.ledger.partial += len(held)
        self.ledger.resumed += len(held)
        return len(held)

    def started(self, items: Iterable[PromptItem], worker: int = 0) -> None:
        """`items` went to rollout worker `worker`, admitted at their `start_version`."""
        for item in items:
            if item.extends and item.extends not in self.extending:
                raise ValueError(f"item {item.group_id} extends group {item.extends!r}, which is not waiting "
                                 "for an extension")
            self.running[item.group_id] = RunningGroup(item, worker, item.start_version)
            self.ledger.started += 1
            self.samples_started += item.n_samples
            if item.extends:
                self.extension_of[item.group_id] = item.extends

    # -- extensions (DARS) ---------------------------------------------------------------
    def hold_for_extension(self, group: Group) -> None:
        """A finished group the sampler extends: it waits, out of the buffer, for the extra
        samples; until then it binds the schedule as a running group does."""
        if group.group_id in self.running:
            self._finish(group.group_id)
        elif group.group_id not in self.extending:
            raise ValueError(f"group {group.group_id} is neither running nor extending")
        self.extending[group.group_id] = group

    def merge_extension(self, extension: Group) -> Group:
        """The extension's samples join the group they extend; returns that group (its start
        version stays the older one, so the staleness bound holds for every token)."""
        base_id = self.extension_of.pop(extension.group_id)
        self._settle(self._finish(extension.group_id), extension)
        self.ledger.merged += 1
        base = self.extending.pop(base_id)
        base.trajectories = [*base.trajectories, *extension.trajectories]
        self.extending[base_id] = base  # until the sampler says where it goes
        return base

    def is_extension(self, group_id: str) -> bool:
        return group_id in self.extension_of

    # -- what came back ----------------------------------------------------------------
    def absorb(self, groups: list[Group], dropped: list[str], partial: list[Group],
               filtered: Iterable[str] = ()) -> None:
        """File what a worker handed over under the right state and count it: finished
        groups to train on, ids of groups dropped (reward policy or workflow), partial
        groups, and ids of finished groups the prompt sampler filtered out."""
        for group in groups:
            self._settle(self._finish(group.group_id), group)
            self.buffer.put(group)
        for group_id in filtered:
            if group_id in self.extending:  # a merged group the sampler filtered
                self._retire_extended(self.extending.pop(group_id))
            else:
                self._retire(self._finish(group_id))
            self.ledger.filtered += 1
        for group_id in dropped:
            self._retire(self.running.pop(group_id))
            self.ledger.dropped += 1
            base_id = self.extension_of.pop(group_id, None)
            if base_id is not None:  # an extension the rewards dropped: its group trains as it was
                self.buffer.put(self.extending.pop(base_id))
        for group in partial:
            self._settle(self.running.pop(group.group_id), group)  # it resumes as the samples it has
            self.partial_pool.append(group)
            self.was_partial.add(group.group_id)
            self.ledger.partial += 1

    def requeue_worker(self, worker: int) -> list[PromptItem]:
        """Worker `worker` died with the groups it was running: each is retired as requeued
        and its prompt item comes back with a new group id, to be started again."""
        lost = [gid for gid, r in self.running.items() if r.worker == worker]
        items = []
        for group_id in lost:
            running = self.running.pop(group_id)
            self._retire(running)
            self.ledger.requeued += 1
            self.extension_of.pop(group_id, None)
            items.append(PromptItem(prompt_id=running.item.prompt_id, prompt=running.item.prompt,
                                    row=running.item.row, n_samples=running.item.n_samples,
                                    context=running.item.context, extends=running.item.extends))
        return items

    def _finish(self, group_id: str) -> RunningGroup | None:
        """Out of `running` (or out of `extending`, for a merged group: counted finished once)."""
        if group_id in self.extending:
            self.extending.pop(group_id)
            return None
        self.ledger.finished += 1
        return self.running.pop(group_id)

    def _settle(self, running: RunningGroup | None, group: Group) -> None:
        """A group may come back with another number of samples than it was admitted with (a
        tree with fewer leaves than rollout.n_samples): from now on it counts as the samples
        it has, so admission, which counts samples, neither leaks room nor overcounts it."""
        if running is not None:
            self.samples_retired += running.samples - group.num_samples

    def _retire_extended(self, group: Group) -> None:
        self.samples_retired += group.num_samples
        self.was_partial.discard(group.group_id)

    def _retire(self, running: RunningGroup) -> None:
        self.samples_retired += running.samples
        self.was_partial.discard(running.item.group_id)

    # -- what to train ---------------------------------------------------------------
    def next_batch(self, version: int) -> list[Group] | None:
        """A batch for the trainer at `version`, or None to wait. Under APRIL the caller
        then interrupts everything still generating."""
        binding: Iterable[tuple[int, int]] = ()
        if not self.proceed_past_stragglers:
            binding = [(r.start_version, r.samples) for r in self.running.values()] + [
                (g.start_version, g.num_samples) for g in self.extending.values()]
        else:
            # Running groups do not bind the schedule: whatever is consumed keeps its tokens
            # of the last η versions for training and its older ones as context only.
            binding = ()
            floor = version - self.eta
            for group in self.buffer.groups():
                if group.start_version < floor:
                    self.ledger.masked_tokens += mask_stale_tokens(group, floor)
                    group.start_version = floor
        batch = self.buffer.get(self.batch_size, version, binding)
        if batch is not None:
            self.ledger.consumed += len(batch)
            self.last_batch_samples = sum(g.num_samples for g in batch)
            self.samples_consumed += self.last_batch_samples
            self.batch_taken = version
        return batch

    def partial_ratio(self, batch: list[Group]) -> float:
        ratio = sum(g.group_id in self.was_partial for g in batch) / len(batch)
        self.was_partial.difference_update(g.group_id for g in batch)
        return ratio

    def lost(self, cancelled: int | None = None) -> int:
        running = len(self.running) if cancelled is None else cancelled
        return self.ledger.lost(running, len(self.buffer), len(self.partial_pool), len(self.extending))

    def summary(self, cancelled: int) -> dict[str, int]:
        return {**self.ledger.as_dict(), "unfinished_at_exit": cancelled, "buffered_at_exit": len(self.buffer),
                "partial_at_exit": len(self.partial_pool), "extending_at_exit": len(self.extending),
                "lost": self.lost(cancelled)}

    # -- checkpoint ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything above as plain data. Running groups are recorded by their prompt
        items: the engines' work in flight is not part of it."""
        return {
            "ledger": self.ledger.as_dict(),
            "running": {gid: {"item": r.item.to_dict(), "worker": r.worker, "start_version": r.start_version}
                        for gid, r in self.running.items()},
            "buffer": [g.to_dict() for g in self.buffer.groups()],
            "partial_pool": [g.to_dict() for g in self.partial_pool],
            "was_partial": sorted(self.was_partial),
            "samples_started": self.samples_started,
            "samples_retired": self.samples_retired,
            "samples_consumed": self.samples_consumed,
            "last_batch_samples": self.last_batch_samples,
            "batch_taken": self.batch_taken,
            "extending": [g.to_dict() for g in self.extending.values()],
            "extension_of": dict(self.extension_of),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger = Ledger(**state["ledger"])
        self.running = {gid: RunningGroup(PromptItem.from_dict(r["item"]), r["worker"], r["start_version"])
                        for gid, r in state["running"].items()}
        self.buffer = TrajectoryBuffer(self.eta)
        for group in state["buffer"]:
            self.buffer.put(Group.from_dict(group))
        self.partial_pool = [Group.from_dict(g) for g in state["partial_pool"]]
        self.was_partial = set(state["was_partial"])
        self.samples_started = state["samples_started"]
        self.samples_retired = state["samples_retired"]
        self.samples_consumed = state["samples_consumed"]
        self.last_batch_samples = state["last_batch_samples"]
        self.batch_taken = state["batch_taken"]
        self.extending = {g["group_id"]: Group.from_dict(g) for g in state["extending"]}
        self.extension_of = dict(state["extension_of"])


def item_of(group: Group) -> PromptItem:
    """The prompt item a group was started from (for a group handed back unfinished)."""
    return PromptItem(prompt_id=group.prompt_id, prompt=group.prompt_text, row=group.row,
                      n_samples=group.num_samples, group_id=group.group_id, start_version=group.start_version)
