"""The orchestrator in-process, with fake engines in virtual time: ordering, version
gating, the staleness bound, the ledger, faults, and its state round trip."""

from __future__ import annotations

import copy
import json

import pytest

from buffer.sampling import DapoFilter, UniformSampler
from tests.unit.fakes import FakeFactory, FakeRollout, FakeTrainer, RecordingLogger, run_virtual
from trainer.clients import ObjectStoreTransport
from trainer.orchestrator import LoopConfig, Orchestrator, RunError

ROWS = [{"prompt_id": f"p{i}", "prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(200)]


def make(eta=1, steps=12, batch_groups=4, n=2, stragglers="proceed", overprovision=1.0, workers=1,
         sampler=None, eval_every=0, **rollout):
    cfg = LoopConfig(total_steps=steps, batch_groups=batch_groups, n_samples=n, max_staleness=eta,
                     overprovision=overprovision, stragglers=stragglers, eval_every=eval_every)
    rollouts = [FakeRollout(name=f"rollout worker {i}", seed=i, **rollout) for i in range(workers)]
    trainer = FakeTrainer(eta=eta)
    logger = RecordingLogger()
    orch = Orchestrator(cfg, sampler or UniformSampler(ROWS, n, seed=0), rollouts, trainer,
                        ObjectStoreTransport(), logger, eval_rows=ROWS[:4])
    return orch, rollouts, trainer, logger


@pytest.mark.parametrize("eta,stragglers", [(0, "wait"), (1, "wait"), (1, "proceed"), (2, "proceed"), (3, "wait")])
def test_every_version_is_trained_in_order_within_the_staleness_bound(eta, stragglers):
    orch, (rollout,), trainer, logger = make(eta=eta, stragglers=stragglers)
    summary = run_virtual(orch.run())
    assert orch.version == trainer.version == 12
    assert rollout.received == list(range(1, 13))  # every version, in order
    assert [step for step, m in logger.logs if "train/loss" in m] == list(range(1, 13))
    assert trainer.ages and max(trainer.ages) <= eta  # (the fake trainer also asserts it per token)
    assert summary["lost"] == 0 and summary["consumed"] >= 12 * 4
    assert summary["started"] == (summary["consumed"] + summary["unfinished_at_exit"] + summary["buffered_at_exit"]
                                  + summary["partial_at_exit"])
    if eta == 0:
        assert set(trainer.ages) == {0}


def test_groups_are_admitted_on_the_trainers_version_and_never_run_ahead_of_the_rule():
    orch, (rollout,), trainer, _ = make(eta=1, batch_groups=3, n=2)
    run_virtual(orch.run())
    starts = [item.start_version for _, item in rollout.submitted]
    assert starts == sorted(starts) and starts[-1] <= 12
    for version in range(13):  # in flight at version v: at most (eta + 1) x B x n samples
        admitted = sum(item.n_samples for _, item in rollout.submitted if item.start_version <= version)
        consumed = 2 * sum(len(batch) for batch in trainer.batches[:version])  # by steps that ended
        assert admitted - consumed <= (1 + 1) * 3 * 2


def test_april_holds_what_is_generating_and_trains_it_later_within_eta():
    orch, (rollout,), trainer, _ = make(eta=1, overprovision=2.0, long_fraction=0.4)
    summary = run_virtual(orch.run())
    assert orch.version == 12 and summary["lost"] == 0
    assert summary["partial"] > 0 and summary["partial"] == summary["resumed"]
    assert max(trainer.ages) <= 1


def test_two_workers_share_the_load_and_both_take_every_version():
    orch, rollouts, trainer, logger = make(eta=2, workers=2, steps=10)
    summary = run_virtual(orch.run())
    assert summary["lost"] == 0
    for rollout in rollouts:
        assert rollout.received == list(range(1, 11))
        assert len(rollout.submitted) > 10
    step = next(m for step, m in logger.logs if step == 10 and "train/loss" in m)
    assert step["rollout/worker0/version"] == step["rollout/worker1/version"] == 10


def test_the_sampler_sees_every_finished_group_and_filtered_groups_are_never_trained():
    sampler = DapoFilter(UniformSampler(ROWS, 2, seed=0), max_filtered=1000)
    orch, _, trainer, _ = make(eta=1, sampler=sampler)
    summary = run_virtual(orch.run())
    trained = {gid for batch in trainer.batches for gid in batch}
    assert summary["filtered"] == sampler.filtered > 0 and summary["lost"] == 0
    assert len(trained) == summary["consumed"]


def test_held_out_evaluation_runs_every_k_versions():
    orch, _, _, logger = make(eta=1, steps=6, eval_every=2)
    run_virtual(orch.run())
    assert [step for step, m in logger.logs if "eval/accuracy" in m] == [2, 4]


@pytest.mark.parametrize("call", ["submit", "collect", "update_weights", "interrupt", "health"])
def test_a_failed_worker_call_stops_the_run_naming_the_worker_and_the_call(call):
    boom = ValueError(f"boom in {call}")
    orch, (rollout,), _, _ = make(eta=1, overprovision=2.0 if call == "interrupt" else 1.0)
    rollout.fail[call] = boom

    async def timed():
        import asyncio

        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(RunError) as caught:
            await orch.run()
        return caught.value, loop.time() - start

    error, seconds = run_virtual(timed())
    text = str(error)
    assert f"rollout worker 0: {call} failed: ValueError: boom in {call}" in text
    assert "ledger at the fault" in text and "'lost'" in text
    assert seconds < 5.0  # virtual seconds: within a collect's timeout or two, never a hang


def test_a_failed_train_step_stops_the_run_naming_the_trainer():
    orch, _, trainer, _ = make(eta=1)
    trainer.fail["train_step"] = RuntimeError("CUDA out of memory")
    with pytest.raises(RunError, match="trainer: train_step failed: RuntimeError: CUDA out of memory"):
        run_virtual(orch.run())


def test_state_round_trips_mid_run_through_json():
    orch, _, _, logger = make(eta=2, steps=8, long_fraction=0.5)
    snapshots = []

    def snapshot(step, metrics):
        if step == 4:  # inside the loop, with groups in flight
            upcoming = [i.prompt_id for i in copy.deepcopy(orch.sampler).next(3, 0)]
            snapshots.append((json.dumps(orch.state_dict()), upcoming))

    logger.on_log = snapshot
    run_virtual(orch.run())
    text, upcoming = snapshots[0]
    state = json.loads(text)
    assert state["version"] >= 4 and state["scheduler"]["running"] and state["scheduler"]["ledger"]["started"]
    again, _, _, _ = make(eta=2, steps=8)
    again.load_state_dict(state)
    assert again.state_dict() == state
    assert again.version == state["version"] and again.sched.lost() == 0
    assert [i.prompt_id for i in again.sampler.next(3, 0)] == upcoming  # no prompt skipped or replayed
    running = next(iter(again.sched.running.values()))
    assert running.worker == 0 and running.item.n_samples == 2  # what a dead worker's re-queue needs


def make_with_factory(max_restarts, **kwargs):
    orch, rollouts, trainer, logger = make(**kwargs)
    orch.cfg.max_restarts = max_restarts
    orch.factory = FakeFactory(trainer)
    return orch, rollouts, trainer, logger


@pytest.mark.parametrize("eta,stragglers", [(1, "proceed"), (2, "wait")])
def test_a_dead_worker_is_replaced_and_nothing_is_lost_or_trained_twice(eta, stragglers):
    orch, rollouts, trainer, logger = make_with_factory(2, eta=eta, stragglers=stragglers, workers=2, steps=14)
    rollouts[1].die_after_tokens = 150  # mid-run, with groups in flight
    summary = run_virtual(orch.run())
    assert rollouts[1].dead and orch.restarts == 1 and len(orch.factory.made) == 1
    assert summary["lost"] == 0 and summary["requeued"] > 0
    trained = [gid for batch in trainer.batches for gid in batch]
    assert len(trained) == len(set(trained)) == summary["consumed"]  # no group trained twice
    assert max(trainer.ages) <= eta
    replacement = orch.factory.made[0]
    assert orch.rollouts[1] is replacement and replacement.received  # it took later versions
    assert replacement.received == sorted(set(replacement.received)) and replacement.received[-1] == 14
    assert rollouts[0].received == list(range(1, 15))  # the other worker never missed one
    assert any("died" in line for line in logger.lines) and any("replaced" in line for line in logger.lines)


def test_requeued_prompts_are_started_again_not_skipped():
    orch, rollouts, trainer, _ = make_with_factory(1, eta=1, workers=2, steps=10)
    rollouts[0].die_after_tokens = 100
    run_virtual(orch.run())
    lost_prompts = {item.prompt_id for _, item in rollouts[0].submitted} - {
        g.prompt_id for g in rollouts[0].out.groups}
    restarted = {item.prompt_id for w in (rollouts[1], *orch.factory.made) for _, item in w.submitted}
    # every prompt the dead worker was running went to a live worker afterwards
    requeued = orch.sched.ledger.requeued
    assert requeued > 0 and len(lost_prompts & restarted) >= 1


def test_more_deaths_than_max_restarts_stop_the_run_naming_the_worker():
    orch, rollouts, trainer, _ = make_with_factory(0, eta=1, workers=2)
    rollouts[1].die_after_tokens = 50
    with pytest.raises(RunError, match=r"rollout worker 1: .*died.*rollout.max_restarts=0"):
        run_virtual(orch.run())


@pytest.mark.parametrize("eta,stragglers", [(0, "wait"), (1, "wait"), (2, "proceed")])
def test_dars_extensions_merge_into_their_group_within_the_staleness_bound(eta, stragglers):
    """Hard groups (accuracy < 0.5) wait for their extension, which is merged in before
    they are trained: larger groups reach the trainer, no token is older than eta, nothing
    is lost, every group is trained once."""
    from buffer.dars import DarsSampler

    sampler = DarsSampler(ROWS, 4, seed=0, cap=10)
    orch, _, trainer, logger = make(eta=eta, stragglers=stragglers, n=4, sampler=sampler, steps=10)
    summary = run_virtual(orch.run())
    assert summary["lost"] == 0 and summary["merged"] > 0 and sampler.counts["extended_groups"] > 0
    assert max(trainer.ages) <= eta
    trained = [gid for batch in trainer.batches for gid in batch]
    assert len(trained) == len(set(trained))
    assert any(m.get("sampling/merged_groups", 0) > 0 for _, m in logger.logs)
    # an extended group reaches the trainer with its first stage and its extension: > 4 samples
    assert trainer.max_group_size > 4
    steps = [m for _, m in logger.logs if "train/loss" in m]
    assert max(m["batch/samples_per_group_max"] for m in steps) == trainer.max_group_size
    assert all(0.0 <= m["batch/pass_rate_mean"] <= 1.0 for m in steps)
    assert steps[-1]["sampling/budget_share_difficulty_none"] == 1.0  # the rows carry no difficulty


def test_the_logger_gets_a_few_trained_responses_every_k_versions():
    orch, _, trainer, logger = make(eta=1, steps=9)
    orch.cfg.samples_every, orch.cfg.samples_per_step = 3, 2
    run_virtual(orch.run())
    assert [step for step, _ in logger.samples] == [3, 6, 9]
    for step, rows in logger.samples:
        assert len(rows) == 2 and all(r["prompt"].endswith("+1=") and r["response_ids"] for r in rows)
        assert all(0 <= r["token_age_max"] <= 1 and r["samples"] == 2 for r in rows)
