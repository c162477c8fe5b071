"""Difficulty-adaptive samplers and schedules (buffer/strategies.py, buffer/prompt_stats.py),
checked against hand-computed numbers."""

from __future__ import annotations

import itertools
import json
import random
import statistics

import pytest

from buffer.prompt_stats import SEEDED_KEY, PromptStats, ci_half_width, t_quantile
from buffer.sampling import PromptSampler, SamplingConfig, build_sampler
from buffer.strategies import (DarsSchedule, VadeSampler, XrpoSampler, d3s_keep_fraction, d3s_select,
                               dars_extra_samples, xrpo_priority)
from buffer.types import FinishReason, Group, Trajectory, new_uid

ROWS = [{"prompt_id": str(i), "prompt": f"{i}+0=", "answer": str(i)} for i in range(12)]


def group(pid, rewards, version=0, row=None, gid=None):
    g = Group(group_id=gid or new_uid(), prompt_id=pid, prompt_text=f"{pid}+0=",
              row=dict(ROWS[int(pid)]) if row is None else row, start_version=version)
    for r in rewards:
        t = Trajectory(prompt_id=pid, group_id=g.group_id, prompt_ids=[1])
        t.append_tokens([1], [-0.1], version)
        t.reward, t.finish_reason = r, FinishReason.STOP
        g.trajectories.append(t)
    return g


def of(item, rewards):
    """The finished group of a prompt item, as the rollout worker hands it back."""
    return group(item.prompt_id, rewards, item.start_version, row=item.row, gid=item.group_id)


def json_round(state):
    return json.loads(json.dumps(state))


# -- Student-t quantile -------------------------------------------------------------------------
@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042), (120, 1.980)])
def test_t_quantile_matches_table_values(df, table):
    assert t_quantile(0.975, df) == pytest.approx(table, rel=1e-3)  # well inside the 1% asked
    assert t_quantile(0.025, df) == pytest.approx(-table, rel=1e-3)
    assert t_quantile(0.995, 4) == pytest.approx(4.604, rel=1e-3) and t_quantile(0.5, 7) == 0.0


# -- DARS ---------------------------------------------------------------------------------------
def test_dars_extra_samples_by_hand():
    # N = 8, a = 0.25.
    # mean: S = 2·.25·.75 = .375, A_peak = 4, N·S = 3 → equal ⌈1/.375⌉ = ⌈2.67⌉ = 3;
    #       hardness 2·.75·4 = 6 → ⌈3/.375⌉ = 8.
    # std:  S = 2√.1875 = .8660, A_peak = 8, N·S = 6.928 → equal ⌈1.072/.866⌉ = ⌈1.24⌉ = 2;
    #       hardness 2·.75·8 = 12 → ⌈5.072/.866⌉ = ⌈5.86⌉ = 6.
    assert dars_extra_samples(0.25, 8, "equal", "mean") == 3
    assert dars_extra_samples(0.25, 8, "hardness", "mean") == 8
    assert dars_extra_samples(0.25, 8, "equal", "std") == 2
    assert dars_extra_samples(0.25, 8, "hardness", "std") == 6
    # a = 0 is taken as 0.5/8 = 1/16. mean: S = .1171875, N·S = .9375 → equal ⌈26.13⌉ = 27, capped
    # at 32 − 8 = 24; hardness 2·(15/16)·4 = 7.5 → (7.5 − .9375)/.1171875 = 56 exactly, = 64 − 8.
    # std: S = .48412, N·S = 3.873 → equal ⌈8.52⌉ = 9; hardness 15 → ⌈22.98⌉ = 23.
    assert dars_extra_samples(0.0, 8, "equal", "mean") == 24
    assert dars_extra_samples(0.0, 8, "hardness", "mean") == 56
    assert dars_extra_samples(0.0, 8, "equal", "std") == 9
    assert dars_extra_samples(0.0, 8, "hardness", "std") == 23
    # no extra at or above 0.5; a cap is on the total N + ΔN
    assert [dars_extra_samples(a, 8, s, v) for a in (0.5, 0.75, 1.0) for s in ("equal", "hardness")
            for v in ("std", "mean")] == [0] * 12
    assert dars_extra_samples(0.0, 8, "hardness", "mean", cap=20) == 12
    assert dars_extra_samples(0.0, 8, "equal", "mean", cap=8) == 0
    assert DarsSchedule("hardness", "std").extra(0.25, 8) == 6
    with pytest.raises(ValueError, match="schedule"):
        dars_extra_samples(0.1, 8, "linear")
    with pytest.raises(ValueError, match="advantage"):
        dars_extra_samples(0.1, 8, advantage="rank")


# -- D³S ----------------------------------------------------------------------------------------
def test_d3s_select_equals_brute_force_on_random_small_groups():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 8)
        xs = [rng.choice([rng.gauss(0, 1), float(rng.randint(-2, 2))]) for _ in range(n)]  # with ties
        for k in range(1, n + 1):
            got = d3s_select(xs, k)
            assert len(got) == k and got == sorted(set(got))
            best = max(statistics.pvariance([xs[i] for i in c]) for c in itertools.combinations(range(n), k))
            assert statistics.pvariance([xs[i] for i in got]) == pytest.approx(best, abs=1e-9)
    assert d3s_select([0.1, -1.0, 2.0, 0.5, 0.4, -0.3], 3) == [1, 2, 5]  # -1, 2 and -0.3
    assert d3s_select([1.0, 2.0], 5) == [0, 1] and d3s_select([1.0], 0) == []


def test_d3s_keep_fraction_relaxes_linearly():
    assert d3s_keep_fraction(0, 100) == 0.5
    assert d3s_keep_fraction(50, 100, start=0.25, end=1.0) == 0.625
    assert d3s_keep_fraction(100, 100) == 1.0 == d3s_keep_fraction(500, 100)


# -- XRPO ---------------------------------------------------------------------------------------
def test_xrpo_priority_by_hand_and_its_order():
    # n = 4, s = .5, T = 100, λ = .01: h(4) = 3.1824·.5/2 = .7956, h(5) = 2.7764·.5/√5 = .6208,
    # Δ̂ = .1748; φ = .01·√(ln 101 / 4) = .0107; Π = .1855
    assert xrpo_priority(4, 0.5, 100, lam=0.01) == pytest.approx(0.1855, abs=2e-4)
    assert ci_half_width(4, 0.5) == pytest.approx(0.7956, abs=1e-4)
    few_uncertain, many_uncertain = xrpo_priority(4, 0.5, 100), xrpo_priority(32, 0.5, 100)
    few_certain = xrpo_priority(4, 0.0, 100)
    assert few_uncertain > many_uncertain and few_uncertain > few_certain > 0  # φ keeps it > 0
    assert xrpo_priority(4, 0.0, 100, lam=0.0) == 0.0 and xrpo_priority(1, 0.0, 100) == float("inf")


def test_xrpo_gives_the_phase_budget_to_the_uncertain_prompt_as_one_item():
    s = XrpoSampler(ROWS, 4, phase_prompts=2, phase_budget=4, extra_chunk=2, max_rollouts=8, lam=0.0)
    s.observe([group("0", [1.0, 0.0, 1.0, 0.0]), group("1", [1.0, 1.0, 1.0, 1.0])])  # 8 rollouts: a phase
    assert s.priority("0") > s.priority("1") == 0.0
    assert [(q["index"], q["n"]) for q in s.queue] == [(0, 4)]  # both chunks to "0", up to max_rollouts
    first, fresh = s.next(2, version=1)
    assert (first.prompt_id, first.n_samples, first.context, first.start_version) == ("0", 4, "", 1)
    assert (fresh.n_samples, fresh.context) == (4, "")  # then new prompts, n_base each
    assert s.active["0"]["pending"] == {first.group_id: 4}
    s.observe([of(first, [1.0, 0.0, 0.0, 0.0])])
    m = s.metrics()
    assert s.active["0"]["n"] == 8 and s.active["0"]["pending"] == {}
    assert (m["sampling/extra_rollouts"], m["sampling/extra_items"], m["sampling/phases"]) == (4.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="n_base >= 2"):
        XrpoSampler(ROWS, 1)
    with pytest.raises(ValueError, match="phase_budget"):
        XrpoSampler(ROWS, 4, phase_prompts=2, phase_budget=8)


def test_xrpo_seeds_after_seed_after_failed_groups_only_with_another_prompts_exemplar():
    s = XrpoSampler(ROWS, 2, seed_after=2, seed_exemplars=3, phase_prompts=100)
    s.observe([group("1", [1.0, 0.0]), group("1", [0.0, 0.0]), group("1", [0.0, 0.0])])
    assert s.stats.get("1").zero_streak == 2 and s.queue == []  # its own exemplar is never shown to it
    s.observe([group("2", [1.0, 0.0])])  # "2" is solved: an exemplar to show
    assert s.queue == []  # seeding happens when "1" fails again
    s.observe([group("1", [0.0, 0.0])])
    (item,) = s.next(1, version=3)
    assert (item.prompt_id, item.prompt, item.context, item.n_samples) == ("1", "1+0=", "2+0=2\n", 2)
    assert item.row[SEEDED_KEY] is True and SEEDED_KEY not in ROWS[1]
    assert s.stats.get("1").zero_streak == 0 and s.metrics()["sampling/seeded_items"] == 1.0
    s.observe([group("1", [0.0, 0.0])])
    assert s.queue == []  # the streak starts again
    s.observe([group("1", [0.0, 0.0])])
    assert len(s.queue) == 1 and s.metrics()["sampling/seeded_items"] == 2.0
    before = s.stats.state_dict()["records"]["1"]
    s.observe([of(item, [1.0, 1.0])])  # a seeded group: trained on, not folded into "1"'s statistics
    assert s.stats.state_dict()["records"]["1"] == before
    m = s.metrics()
    assert (m["sampling/seeded_groups"], m["sampling/seeded_success_rate"]) == (1.0, 1.0)


# -- VADE ---------------------------------------------------------------------------------------
def test_vade_posterior_update_and_two_scale_decay_by_hand():
    s = VadeSampler(ROWS, 4, decay_update=0.5, decay_version=0.9)
    s.observe([group("0", [1.0, 1.0, 1.0, 0.0], version=0)])
    assert s.stats.posterior("0") == (4.0, 2.0)  # Beta(1, 1) + 3 successes, 1 failure
    assert s.stats.posterior("5", version=9) == (1.0, 1.0)  # unseen: the prior
    # two versions later: γ = .9² = .81 → (.81·4 + .19, .81·2 + .19)
    assert s.stats.posterior("0", version=2) == pytest.approx((3.43, 1.81))
    s.observe([group("0", [0.0] * 4, version=2)])  # then γ_u = .5: (2.215, 1.405), + (0, 4)
    assert s.stats.posterior("0") == pytest.approx((2.215, 5.405))
    s.observe([group("0", [1.0] * 4, version=1)])  # an older group arrives late: no version decay
    assert s.stats.posterior("0") == pytest.approx((0.5 * 2.215 + 0.5 + 4, 0.5 * 5.405 + 0.5))
    assert s.stats.get("0").last_version == 2 and s.stats.get("0").attempts == 12


def test_vade_thompson_is_seeded_and_prefers_prompts_near_one_half():
    def picks(seed):
        s = VadeSampler(ROWS, 2, seed=seed)
        return [i.prompt_id for _ in range(10) for i in s.next(3, 0)]

    assert picks(7) == picks(7) and picks(7) != picks(8)
    s = VadeSampler(ROWS[:4], 2, seed=3, inflight_versions=None, decay_update=1.0, decay_version=1.0)
    for pid, wins in (("0", 50), ("1", 95), ("2", 5), ("3", 30)):  # Beta(51, 51), (96, 6), (6, 96), (31, 71)
        s.observe([group(pid, [1.0] * wins + [0.0] * (100 - wins))])
    chosen = [s.next(1, 0)[0].prompt_id for _ in range(400)]
    assert chosen.count("0") > 0.8 * 400 and chosen.count("1") + chosen.count("2") < 0.02 * 400
    assert 0.2 < s.metrics()["sampling/selected_info_gain"] <= 0.25


def test_vade_does_not_restart_a_prompt_still_in_flight():
    s = VadeSampler(ROWS[:5], 2, inflight_versions=1)
    first = {i.prompt_id for i in s.next(2, 0)}
    second = {i.prompt_id for i in s.next(3, 0)}
    assert not first & second and len(first | second) == 5
    assert len(s.next(7, 0)) == 7  # all in flight: it still answers, wrapping around
    s.observe([group("0", [1.0, 0.0])])
    assert "0" not in s.inflight and s.next(1, 5) and len(s.inflight) == 1  # the others have expired


# -- shared -------------------------------------------------------------------------------------
def drive(sampler, versions, observe=True):
    out = []
    for v in versions:
        items = sampler.next(3, v)
        out += [(i.prompt_id, i.n_samples, i.context, i.row.get(SEEDED_KEY)) for i in items]
        if observe:
            sampler.observe([of(i, [float((int(i.prompt_id) + j + v) % 4 == 0) for j in range(i.n_samples)])
                             for i in items])
    return out


@pytest.mark.parametrize("cls, kwargs", [
    (VadeSampler, {"pool_size": 5}),
    (XrpoSampler, {"phase_prompts": 2, "phase_budget": 2, "seed_after": 1, "seed_exemplars": 2}),
])
def test_state_round_trips_through_json_mid_stream(cls, kwargs):
    sampler = cls(ROWS, 2, seed=5, **kwargs)
    drive(sampler, range(6))
    drive(sampler, [6], observe=False)  # some items still out
    state = json_round(sampler.state_dict())
    again = cls(ROWS, 2, seed=99, **kwargs)
    again.load_state_dict(state)
    assert json_round(again.state_dict()) == state
    assert drive(again, range(7, 12)) == drive(sampler, range(7, 12))
    assert again.metrics() == sampler.metrics()
    assert all(k.startswith("sampling/") and isinstance(v, float) for k, v in sampler.metrics().items())
    if cls is XrpoSampler:
        assert sampler.metrics()["sampling/extra_items"] > 0 and sampler.metrics()["sampling/seeded_items"] > 0


def test_prompt_stats_moments_histogram_calibration_and_exemplars():
    stats = PromptStats(calibration_bins=4, max_exemplars=2)
    stats.update(group("1", [1.0, 1.0, 0.0, 0.0]), 0)  # predicted .5 (prior), observed .5
    stats.update(group("1", [1.0, 1.0, 1.0, 1.0]), 1)  # predicted 3/6 = .5, observed 1
    stats.update(group("2", [1.0, 0.0, 0.0, None]), 1)  # predicted .5, observed 1/3; None is skipped
    rec = stats.get("1")
    assert (rec.attempts, rec.successes, rec.alpha, rec.beta) == (8, 6, 7.0, 3.0)
    assert rec.mean == pytest.approx(0.75) and rec.std == pytest.approx(statistics.stdev([1] * 6 + [0] * 2))
    assert stats.pass_rate_histogram(4) == [0, 1, 0, 1]  # 1/3 and 6/8
    (cell,) = [c for c in stats.calibration() if c["groups"]]
    assert (cell["lo"], cell["groups"], cell["predicted"]) == (0.5, 3.0, 0.5)
    assert cell["observed"] == pytest.approx((0.5 + 1 + 1 / 3) / 3)
    assert stats.calibration_error() == pytest.approx(abs(1.5 - (0.5 + 1 + 1 / 3)) / 3)
    stats.add_exemplar("3", "3+0=", "3")
    stats.add_exemplar("1", "1+0=", "1")  # already there: moves to the newest, no duplicate
    assert [e[0] for e in stats.exemplars] == ["3", "1"]  # "2" was evicted: at most 2 kept
    again = PromptStats()
    again.load_state_dict(json_round(stats.state_dict()))
    assert again.state_dict() == stats.state_dict() and again.get("1") == rec


def test_vade_and_xrpo_are_registered_and_take_their_kwargs():
    vade = build_sampler(SamplingConfig("vade", {"pool_size": 3, "decay_version": 0.95}), ROWS, 4, 0, "prompt")
    xrpo = build_sampler(SamplingConfig("xrpo", {"phase_prompts": 4, "lam": 0.02}), ROWS, 4, 0, "prompt")
    assert isinstance(vade, VadeSampler) and isinstance(xrpo, XrpoSampler)
    assert isinstance(vade, PromptSampler) and isinstance(xrpo, PromptSampler)
    assert vade.stats.decay_version == 0.95 and xrpo.phase_rollouts == 16 and xrpo.lam == 0.02
    assert len(vade.next(2, 0)) == 2 and [i.n_samples for i in xrpo.next(2, 0)] == [4, 4]
