import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buffer.buffer import Ledger, StalenessError, StalenessManager, TrajectoryBuffer
from buffer.types import FinishReason, Group, Trajectory


def group(gid, start, token_versions=None):
    g = Group(group_id=gid, prompt_id=gid, prompt_text="", row={}, start_version=start)
    t = Trajectory(prompt_id=gid, group_id=gid, prompt_ids=[1])
    for v in token_versions or [start]:
        t.append_tokens([2], [-0.1], v)
    t.reward, t.finish_reason = 1.0, FinishReason.STOP
    g.trajectories = [t]
    return g


def test_capacity_follows_the_areal_rule():
    gate = StalenessManager(batch_size=4, max_staleness=2)
    assert gate.capacity(in_flight=0) == 12  # (2 + 1) * 4: v = 0, nothing started
    assert gate.capacity(in_flight=12 - 4) == 4  # v = 1: 12 started, one batch of 4 consumed
    assert gate.capacity(in_flight=20 - 4) == 0
    with pytest.raises(ValueError):
        StalenessManager(batch_size=0, max_staleness=1)


def test_buffer_refuses_unfinished_groups():
    g = group("a", 0)
    g.trajectories[0].finish_reason = FinishReason.ABORTED
    with pytest.raises(ValueError, match="not finished"):
        TrajectoryBuffer(1).put(g)


def test_get_waits_for_enough_groups_and_for_due_running_groups():
    buf = TrajectoryBuffer(max_staleness=1)
    buf.put(group("a", 1))
    assert buf.get(2, version=1) is None  # too few
    buf.put(group("b", 1))
    # a group started at version 0 is still running: its deadline is version 1, so wait for it
    assert buf.get(2, version=1, running=[(0, 1)]) is None
    assert [g.group_id for g in buf.get(2, version=1, running=[(1, 1)])] == ["a", "b"]


def test_get_hands_out_oldest_first():
    buf = TrajectoryBuffer(max_staleness=2)
    for gid, start in [("new", 2), ("old", 0), ("mid", 1)]:
        buf.put(group(gid, start))
    assert [g.group_id for g in buf.get(2, version=2)] == ["old", "mid"]


def test_a_too_old_group_raises_instead_of_training():
    buf = TrajectoryBuffer(max_staleness=1)
    buf.put(group("a", 0))
    with pytest.raises(StalenessError, match="age 3 > max_staleness 1"):
        buf.get(1, version=3)


def test_ledger_counts_lost_groups():
    ledger = Ledger(started=10, finished=8, dropped=1, consumed=4)
    assert ledger.lost(running=2, buffered=3) == 0
    assert ledger.lost(running=1, buffered=3) == 1


def simulate(batch_groups, eta, steps, seed):
    """Launcher-like loop: admission, random completion order, consumption."""
    rng = random.Random(seed)
    gate, buf, ledger = StalenessManager(batch_groups, eta), TrajectoryBuffer(eta), Ledger()
    running, version, ages, next_id = {}, 0, [], 0
    while version < steps:
        for _ in range(gate.capacity(ledger.started - ledger.consumed)):  # groups of one sample
            running[str(next_id)] = version
            next_id += 1
            ledger.started += 1
        # finish a random subset of running groups, their tokens from start..current version
        for gid in [g for g in running if rng.random() < 0.5]:
            start = running.pop(gid)
            buf.put(group(gid, start, [start, rng.randint(start, version)]))
            ledger.finished += 1
        batch = buf.get(batch_groups, version, [(s, 1) for s in running.values()])
        if batch is not None:
            ages += [version - g.oldest_version for g in batch]
            ledger.consumed += len(batch)
            version += 1
    assert ledger.lost(running=len(running), buffered=len(buf)) == 0
    return ages


@settings(max_examples=300, deadline=None)
@given(batch_groups=st.integers(1, 6), eta=st.integers(0, 3), seed=st.integers(0, 10**6))
def test_random_schedules_never_consume_a_token_older_than_eta(batch_groups, eta, seed):
    ages = simulate(batch_groups, eta, steps=12, seed=seed)
    assert ages and max(ages) <= eta


def test_eta_zero_is_synchronous():
    assert set(simulate(batch_groups=3, eta=0, steps=10, seed=1)) == {0}


def sized(gid, start, samples):
    g = group(gid, start)
    g.trajectories = g.trajectories * samples
    return g


def test_batches_count_samples_and_take_every_due_group():
    buf = TrajectoryBuffer(max_staleness=1)
    buf.put(sized("big", 1, 5))
    assert buf.get(6, version=1) is None  # 5 samples < 6
    buf.put(sized("small", 1, 2))
    assert [g.group_id for g in buf.get(6, version=1)] == ["big", "small"]  # 7 >= 6: groups are never split
    for gid in ("a", "b", "c"):
        buf.put(sized(gid, 0, 3))
    # version 1: all three are due (started at 0, eta 1), so they go together past 6 samples
    assert sorted(g.group_id for g in buf.get(6, version=1)) == ["a", "b", "c"]


def test_a_due_straggler_holds_the_batch_whatever_its_size():
    buf = TrajectoryBuffer(max_staleness=1)
    buf.put(sized("now", 1, 4))
    assert buf.get(4, version=2, running=[(1, 5)]) is None  # started at 1, due at 2: wait for it
    assert [g.group_id for g in buf.get(4, version=1, running=[(1, 5)])] == ["now"]  # due later
