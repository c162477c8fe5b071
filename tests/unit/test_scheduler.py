"""Admission control, the buffer and partial rollouts under random interleavings.

A small simulator plays the worker's and trainer's parts around the real
`RolloutScheduler` (the class the launcher uses): groups are admitted on the trainer's
version, held (as the worker holds them) until the worker has that version's weights,
generate tokens stamped with the worker's current version, finish in any order, get
interrupted (APRIL), are consumed, and weights are updated and synced, the worker as
many versions behind the trainer as the schedule makes it. Over at least 10,000 generated schedules
no consumed trained token may be older than η and the ledger must balance after every
event (10,000 with the default straggler policy, 3,000 more with `stragglers="proceed"`,
2,000 more with APRIL holding requests in the engine instead of aborting them). Groups
differ in size, and admission counts samples.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buffer.prompts import PromptItem
from buffer.sampling import DapoFilter
from buffer.scheduler import RolloutScheduler, mask_stale_tokens
from buffer.types import FinishReason, Group, Trajectory

EVENTS = ("admit", "token", "finish", "interrupt", "consume", "sync")


class PassThrough:
    def observe(self, groups):
        return groups


class Sim:
    def __init__(self, batch_groups: int, eta: int, overprovision: float = 1.0, samples: int = 2,
                 dynamic_sampling: bool = False, stragglers: str = "wait", hold: bool = False,
                 sizes: tuple[int, ...] | None = None, shrink: bool = False) -> None:
        self.shrink = shrink  # groups come back with fewer samples than admitted (trees with fewer leaves)
        self.sched = RolloutScheduler(batch_groups, samples, eta, overprovision, stragglers=stragglers)
        self.filter = DapoFilter(PassThrough(), max_filtered=10**6) if dynamic_sampling else None
        self.eta = eta
        self.samples = samples
        self.sizes = sizes or (samples,)  # group sizes drawn in turn (admission counts samples)
        self.version = 0  # trainer
        self.synced = 0  # worker
        self.live: dict[str, Group] = {}  # on the worker: generating, or held for newer weights
        self.not_before: dict[str, int] = {}  # group id -> the weights it waits for
        self.next_id = 0
        self.consumed_ages: list[int] = []
        self.batches: list[list[str]] = []  # group ids of every batch handed out, in order
        self.hold = hold  # APRIL with requests paused in the engine at the batch boundary, not aborted

    def admit(self) -> None:
        resume, _ = self.sched.partials_to_resume(self.version)
        for group in resume:
            for t in group.trajectories:
                if t.finish_reason is FinishReason.ABORTED:
                    t.finish_reason = None
            self.live[group.group_id] = group
            self.not_before[group.group_id] = self.version
        room = self.sched.capacity(self.version)
        items = []
        while room > 0:
            size = self.sizes[self.next_id % len(self.sizes)]
            gid = f"{self.next_id:08x}"
            self.next_id += 1
            room -= size
            g = Group(group_id=gid, prompt_id=gid, prompt_text="", row={}, start_version=self.version)
            g.trajectories = [Trajectory(prompt_id=gid, group_id=gid, prompt_ids=[1]) for _ in range(size)]
            self.live[gid] = g
            self.not_before[gid] = self.version
            items.append(PromptItem(gid, "", {}, size, group_id=gid, start_version=self.version))
        self.sched.started(items)

    def generating(self) -> list[str]:
        """Groups the worker lets generate: those whose weights it has."""
        return sorted(gid for gid in self.live if self.not_before[gid] <= self.synced)

    def token(self, rng: random.Random) -> None:
        if self.generating():
            g = self.live[rng.choice(self.generating())]
            t = rng.choice(g.trajectories)
            if t.finish_reason is None:
                t.append_tokens([7], [-0.5], self.synced)  # stamped with the worker's weights

    def finish(self, rng: random.Random) -> None:
        if self.generating():
            self.finish_group(rng.choice(self.generating()), rng)

    def finish_group(self, gid: str, rng: random.Random) -> None:
        g = self.live.pop(gid)
        if self.shrink:
            g.trajectories = g.trajectories[: rng.randint(1, len(g.trajectories))]
        for t in g.trajectories:
            if t.finish_reason is None:
                t.append_tokens([1], [-0.1], self.synced)
                t.finish_reason = FinishReason.STOP
            t.reward = float(rng.random() < 0.5)
        kept = self.filter.observe([g]) if self.filter else [g]
        self.sched.absorb(kept, [], [], [] if kept else [gid])

    def interrupt(self, rng: random.Random) -> None:
        """APRIL's abort after a batch: most in-flight groups come back partial; a few
        were already being scored and finish late."""
        partial = []
        for gid in sorted(self.live):
            if rng.random() < 0.8:
                g = self.live.pop(gid)
                for t in g.trajectories:
                    if t.finish_reason is None:
                        t.finish_reason = FinishReason.ABORTED
                partial.append(g)
        self.sched.absorb([], [], partial)

    def consume(self, rng: random.Random) -> None:
        batch = self.sched.next_batch(self.version)
        if batch is None:
            return
        self.batches.append(sorted(g.group_id for g in batch))
        for g in batch:
            for t in g.trajectories:
                self.consumed_ages += [self.version - v for v, m in zip(t.versions, t.loss_mask) if m]
        if self.sched.april:
            if self.hold:
                assert self.sched.hold_running(sorted(self.live)) == len(self.live)
            else:
                self.interrupt(rng)
        self.version += 1

    def sync(self) -> None:
        """The worker takes the next version's weights (updates arrive in order)."""
        self.synced = min(self.synced + 1, self.version)

    def play(self, events, seed: int) -> None:
        rng = random.Random(seed)
        for event in events:
            if event == "admit":
                self.admit()
            elif event == "token":
                self.token(rng)
            elif event == "finish":
                self.finish(rng)
            elif event == "interrupt":
                if self.sched.april and not self.hold:
                    self.interrupt(rng)
            elif event == "consume":
                self.consume(rng)
            else:
                self.sync()
            assert self.sched.lost() == 0, (event, self.sched.ledger)
            assert len(self.sched.running) == len(self.live)
        assert all(age <= self.eta for age in self.consumed_ages), max(self.consumed_ages)


schedules = st.lists(st.sampled_from(EVENTS), min_size=1, max_size=60)


@settings(max_examples=7000, deadline=None)
@given(events=schedules, batch_groups=st.integers(1, 4), eta=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_areal_admission_never_trains_a_stale_token(events, batch_groups, eta, seed):
    Sim(batch_groups, eta).play(events, seed)


@settings(max_examples=3000, deadline=None)
@given(events=schedules, batch_groups=st.integers(1, 4), eta=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_april_partial_rollouts_never_train_a_stale_token(events, batch_groups, eta, seed):
    Sim(batch_groups, eta, overprovision=2.0).play(events, seed)


@settings(max_examples=2000, deadline=None)
@given(events=schedules, batch_groups=st.integers(1, 4), eta=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_april_with_requests_held_in_the_engine_never_trains_a_stale_token(events, batch_groups, eta, seed):
    """Held groups keep generating whenever the simulator says so, stamped with the worker's
    version: more than a paused engine allows, so the bound is checked harder than needed."""
    sim = Sim(batch_groups, eta, overprovision=2.0, hold=True)
    sim.play(events, seed)
    assert not sim.sched.partial_pool  # nothing goes through the partial pool when held
    assert sim.sched.ledger.partial == sim.sched.ledger.resumed


@settings(max_examples=3000, deadline=None)
@given(events=schedules, batch_groups=st.integers(1, 4), eta=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_proceeding_past_stragglers_never_trains_a_stale_token(events, batch_groups, eta, seed):
    Sim(batch_groups, eta, stragglers="proceed").play(events, seed)


@settings(max_examples=2000, deadline=None)
@given(events=schedules, batch_groups=st.integers(1, 4), eta=st.integers(0, 3), seed=st.integers(0, 2**16),
       sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4), stragglers=st.sampled_from(["wait", "proceed"]))
def test_groups_of_different_sizes_never_train_a_stale_token(events, batch_groups, eta, seed, sizes, stragglers):
    """Admission counts samples: groups of 1 to 6 samples against a batch of B x 3."""
    sim = Sim(batch_groups, eta, samples=3, sizes=tuple(sizes), stragglers=stragglers)
    sim.play(events, seed)
    in_flight = sim.sched.samples_started - sim.sched.samples_retired - sim.sched.samples_consumed
    assert in_flight < (eta + 1) * batch_groups * 3 + max(sizes)  # overshoot: less than one group


@settings(max_examples=1000, deadline=None)
@given(events=schedules, batch_groups=st.integers(1, 4), seed=st.integers(0, 2**16),
       dynamic_sampling=st.booleans())
def test_at_eta_zero_proceeding_past_stragglers_is_waiting_for_them(events, batch_groups, seed, dynamic_sampling):
    """Synchronous training has no stragglers to skip: admission starts one batch of groups
    per version, so the batch fills only when every one of them has finished."""
    runs = [Sim(batch_groups, 0, dynamic_sampling=dynamic_sampling, stragglers=policy) for policy in ("wait", "proceed")]
    for sim in runs:
        sim.play(events, seed)
    wait, mask = runs
    assert mask.batches == wait.batches and mask.version == wait.version
    assert mask.sched.ledger.masked_tokens == 0


@pytest.mark.parametrize("eta,overprovision,stragglers", [
    (0, 1.0, "wait"), (1, 1.0, "wait"), (2, 1.0, "wait"), (1, 2.0, "wait"), (2, 2.0, "wait"),
    (1, 1.0, "proceed"), (2, 1.0, "proceed")])
@pytest.mark.parametrize("sizes", [None, (1, 3, 5)])
def test_fair_schedules_make_progress(eta, overprovision, stragglers, sizes):
    """Liveness: with every kind of event happening, training keeps advancing (groups of
    equal size, and of sizes 1, 3 and 5 against batches of 3 x 2 samples)."""
    rng = random.Random(eta * 10 + int(overprovision))
    sim = Sim(batch_groups=3, eta=eta, overprovision=overprovision, stragglers=stragglers, sizes=sizes)
    events = [rng.choice(EVENTS) for _ in range(4000)]
    sim.play(events, seed=1)
    assert sim.version >= 20
    if overprovision > 1:
        assert sim.sched.ledger.partial > 0 and sim.sched.ledger.resumed > 0


@pytest.mark.parametrize("eta,overprovision,stragglers", [(0, 1.0, "wait"), (1, 1.0, "proceed"), (1, 2.0, "wait")])
def test_groups_finishing_with_fewer_samples_than_admitted_neither_stall_nor_go_stale(eta, overprovision, stragglers):
    """A tree may end with fewer leaves than rollout.n_samples: admission counts the samples
    it came back with, so the room it did not use is free again (it used to leak until no
    group could start and no batch fill)."""
    rng = random.Random(eta)
    sim = Sim(batch_groups=3, eta=eta, overprovision=overprovision, stragglers=stragglers, samples=4, shrink=True)
    sim.play([rng.choice(EVENTS) for _ in range(4000)], seed=2)
    assert sim.version >= 20
    in_flight = sum(len(g.trajectories) for g in sim.live.values()) + sim.sched.buffer.num_samples + sum(
        g.num_samples for g in sim.sched.partial_pool)
    assert sim.sched.samples_started - sim.sched.samples_retired - sim.sched.samples_consumed == in_flight


def _straggler_scenario(stragglers: str):
    """Group 0 starts at version 0 and keeps generating; the others finish at once."""
    sim = Sim(batch_groups=1, eta=1, stragglers=stragglers)
    sim.admit()  # (0 + 1 + 1) * 1 = 2 groups
    straggler, quick = sorted(sim.live)
    sim.live[straggler].trajectories[0].append_tokens([7], [-0.5], 0)
    sim.live[straggler].trajectories[1].append_tokens([7], [-0.5], 0)
    g = sim.live.pop(quick)
    for t in g.trajectories:
        t.append_tokens([1], [-0.1], 0)
        t.reward, t.finish_reason = 1.0, FinishReason.STOP
    sim.sched.absorb([g], [], [])
    return sim, straggler


def test_waiting_for_a_straggler_holds_the_trainer_at_its_deadline():
    sim, _ = _straggler_scenario("wait")
    assert sim.sched.next_batch(0) is not None  # the quick group trains at version 0 ...
    sim.version = sim.synced = 1
    assert sim.sched.next_batch(1) is None  # ... and at version 1 the straggler is due: wait


def test_proceeding_past_a_straggler_does_not_hold_the_trainer_and_loses_no_token():
    sim, straggler = _straggler_scenario("proceed")
    assert sim.sched.next_batch(0) is not None
    for version in (1, 2):  # training goes on past the straggler's deadline
        sim.version = sim.synced = version
        sim.admit()
        for gid in sorted(sim.live):
            if gid != straggler:
                sim.finish_group(gid, random.Random(version))
        assert sim.sched.next_batch(version) is not None
    g = sim.live.pop(straggler)  # it finishes at version 3, with one fresh token per sample
    for t in g.trajectories:
        t.append_tokens([1], [-0.1], 3)
        t.reward, t.finish_reason = 0.0, FinishReason.STOP
    sim.sched.absorb([g], [], [])
    sim.version = sim.synced = 3
    batch = sim.sched.next_batch(3)
    assert g in batch
    for t in g.trajectories:  # its version-0 tokens are context now, not trained, not dropped
        assert t.versions == [0, 3] and t.loss_mask == [0, 1]
    assert sim.sched.ledger.masked_tokens == 2 and sim.sched.lost() == 0


def test_eta_zero_trains_only_on_policy_tokens():
    sim = Sim(batch_groups=2, eta=0)
    rng = random.Random(0)
    sim.play([rng.choice(EVENTS) for _ in range(3000)], seed=0)
    assert sim.version > 10 and set(sim.consumed_ages) == {0}


def test_resumed_partial_tokens_beyond_eta_are_masked_not_dropped():
    g = Group(group_id="g", prompt_id="g", prompt_text="", row={})
    t = Trajectory(prompt_id="g", group_id="g", prompt_ids=[1])
    t.append_tokens([5, 6], [-0.1, -0.2], 3)
    t.append_tokens([7], [-0.3], 5)
    g.trajectories = [t]
    assert mask_stale_tokens(g, before_version=4) == 2
    assert t.response_ids == [5, 6, 7] and t.loss_mask == [0, 0, 1]
