"""Prompt samplers behind the orchestrator's `PromptSampler` seam."""

from __future__ import annotations

import json

import pytest

from buffer.plugins import load_plugin
from buffer.sampling import (DapoFilter, FilteredTooOftenError, PromptSampler, SamplingConfig, UniformSampler,
                             build_sampler)
from buffer.types import FinishReason, Group, Trajectory

ROWS = [{"prompt_id": str(i), "prompt": f"{i}+0=", "answer": str(i)} for i in range(5)]


def finished(gid, rewards):
    g = Group(group_id=gid, prompt_id=gid, prompt_text="", row={})
    for r in rewards:
        t = Trajectory(prompt_id=gid, group_id=gid, prompt_ids=[1])
        t.append_tokens([1], [-0.1], 0)
        t.reward, t.finish_reason = r, FinishReason.STOP
        g.trajectories.append(t)
    return g


def test_uniform_sampler_gives_items_with_their_size_and_version_and_round_trips():
    sampler = UniformSampler(ROWS, n_samples=3, seed=2)
    assert isinstance(sampler, PromptSampler)
    items = sampler.next(4, version=5)
    assert [i.n_samples for i in items] == [3] * 4 and {i.start_version for i in items} == {5}
    sampler.observe([finished("a", [1.0, 0.0])])
    state = json.loads(json.dumps(sampler.state_dict()))  # plain data, as a checkpoint writes it
    expected = [i.prompt_id for i in sampler.next(7, 6)]
    again = UniformSampler(ROWS, n_samples=3, seed=0)
    again.load_state_dict(state)
    assert [i.prompt_id for i in again.next(7, 6)] == expected
    assert again.metrics()["sampling/groups_observed"] == 1.0


def test_dapo_filter_never_passes_a_zero_variance_group_and_gives_up_clearly():
    sampler = DapoFilter(UniformSampler(ROWS, 2), max_filtered=2)
    kept = sampler.observe([finished("a", [1.0, 1.0]), finished("b", [0.0, 1.0]), finished("c", [0.5, 0.5])])
    assert [g.group_id for g in kept] == ["b"]
    assert sampler.metrics()["sampling/filtered"] == 2.0
    with pytest.raises(FilteredTooOftenError, match="dynamic sampling filtered 3 groups in a row"):
        sampler.observe([finished("d", [0.0, 0.0]), finished("e", [1.0, 1.0])])  # c, d, e in a row


def test_dapo_filter_state_round_trips_its_streak():
    sampler = DapoFilter(UniformSampler(ROWS, 2), max_filtered=3)
    sampler.observe([finished("a", [1.0, 1.0]), finished("b", [1.0, 1.0])])
    again = DapoFilter(UniformSampler(ROWS, 2), max_filtered=3)
    again.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert again.state_dict() == sampler.state_dict()
    again.observe([finished("c", [0.0, 0.0])])
    with pytest.raises(FilteredTooOftenError):
        again.observe([finished("d", [0.0, 0.0])])


def test_build_sampler_by_name_recipe_flag_and_path(tmp_path):
    assert isinstance(build_sampler(SamplingConfig(), ROWS, 2, 0, "prompt"), UniformSampler)
    assert isinstance(build_sampler(SamplingConfig("dapo_filter"), ROWS, 2, 0, "prompt"), DapoFilter)
    assert isinstance(build_sampler(SamplingConfig(), ROWS, 2, 0, "prompt", dynamic_sampling=True), DapoFilter)
    (tmp_path / "mine.py").write_text(
        "from buffer.sampling import UniformSampler\n"
        "class Every2nd(UniformSampler):\n"
        "    def __init__(self, rows, n_samples, seed=0, prompt_key='prompt', stride=2):\n"
        "        super().__init__(rows[::stride], n_samples, seed, prompt_key)\n")
    mine = build_sampler(SamplingConfig("mine.py:Every2nd", {"stride": 2}), ROWS, 2, 0, "prompt", cwd=str(tmp_path))
    assert sorted(i.prompt_id for i in mine.next(3, 0)) == ["0", "2", "4"]
    with pytest.raises(ValueError, match="sampling.name='nope' is not one of"):
        build_sampler(SamplingConfig("nope"), ROWS, 2, 0, "prompt")
    (tmp_path / "bad.py").write_text("class NoObserve:\n    def __init__(self, *a, **k): pass\n    def next(self, c, v): return []\n")
    with pytest.raises(ValueError, match="without .*observe"):
        build_sampler(SamplingConfig("bad.py:NoObserve"), ROWS, 2, 0, "prompt", cwd=str(tmp_path))


def test_load_plugin_names_the_field_and_the_problem(tmp_path):
    with pytest.raises(ValueError, match="rollout.workflow='no_such_module.X': cannot import"):
        load_plugin("rollout.workflow", "no_such_module.X", {})
    with pytest.raises(ValueError, match="file .* not found"):
        load_plugin("rollout.workflow", "missing.py:X", {}, cwd=str(tmp_path))
    (tmp_path / "here.py").write_text("Y = 1\n")
    with pytest.raises(ValueError, match="has no attribute 'X'"):
        load_plugin("rollout.workflow", "here.py:X", {}, cwd=str(tmp_path))
    assert load_plugin("rollout.workflow", "here.py:Y", {}, cwd=str(tmp_path)) == 1


def test_dars_holds_a_hard_group_asks_its_extension_once_and_keeps_it_merged():
    from buffer.dars import DarsSampler
    from buffer.strategies import dars_extra_samples

    sampler = DarsSampler(ROWS, 4, seed=0)
    hard, easy = finished("hard", [1.0, 0.0, 0.0, 0.0]), finished("easy", [1.0, 1.0, 0.0, 1.0])
    assert sampler.observe([hard, easy]) == [easy]
    assert sampler.holding() == {"hard"}
    (item,) = sampler.urgent(version=3)
    assert item.extends == "hard" and item.n_samples == dars_extra_samples(0.25, 4) > 0 and item.start_version == 3
    assert sampler.urgent(3) == []  # asked once
    state = json.loads(json.dumps(sampler.state_dict()))
    hard.trajectories += finished("ext", [0.0] * item.n_samples).trajectories  # merged by the scheduler
    assert sampler.observe([hard]) == [hard] and sampler.holding() == set()  # not extended twice
    again = DarsSampler(ROWS, 4, seed=0)
    again.load_state_dict(state)
    assert again.holding() == {"hard"} and again.state_dict() == state
    assert sampler.metrics()["sampling/merged_groups"] == 1.0


def test_the_scheduler_holds_merges_and_accounts_for_an_extension():
    from buffer.prompts import PromptItem
    from buffer.scheduler import RolloutScheduler

    sched = RolloutScheduler(batch_groups=1, n_samples=2, max_staleness=1, stragglers="wait")
    base_item = PromptItem("p", "1+1=", {}, 2, group_id="base")
    sched.started([base_item])
    base = finished("base", [0.0, 0.0])
    sched.hold_for_extension(base)
    assert sched.lost() == 0 and sched.next_batch(1) is None  # it binds: due at version 1, not buffered
    sched.started([PromptItem("p", "1+1=", {}, 3, group_id="ext", extends="base", start_version=1)])
    merged = sched.merge_extension(finished("ext", [1.0, 0.0, 0.0]))
    assert merged is base and base.num_samples == 5 and sched.ledger.merged == 1
    sched.absorb([merged], [], [])
    assert sched.lost() == 0 and sched.next_batch(1) == [base]
    with pytest.raises(ValueError, match="not waiting for an extension"):
        sched.started([PromptItem("p", "1+1=", {}, 3, group_id="x", extends="nobody")])
