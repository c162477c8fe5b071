"""Faults end a run with a clear message and a non-zero exit, within seconds, never hidden:
a reward that raises, a reward that mostly fails, a reward that hangs, a rollout worker
killed mid-run, and non-finite training steps."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from buffer.types import FinishReason, Group, Trajectory
from tests.integration.test_e2e import grove

pytestmark = pytest.mark.integration

REWARDS = '''
import time

def always_raises(response, **kwargs):
    raise ValueError("this reward cannot read " + repr(response))

def picky(response, answer, **kwargs):
    """Right on the exact answer (as the start-up check sends), raises on anything else."""
    if response.strip() == str(answer):
        return 1.0
    raise KeyError("picky reward found no answer in " + repr(response))

def hangs(response, **kwargs):
    time.sleep(3600)
'''


def rewards_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad_rewards.py"
    path.write_text(REWARDS)
    return path


def reward_override(tmp_path: Path, name: str) -> str:
    return f'reward.functions=[{{fn: "{rewards_file(tmp_path)}:{name}"}}]'


def test_a_reward_that_always_raises_stops_the_run_at_start_naming_it(tmp_path, model_path):
    start = time.monotonic()
    out = grove([reward_override(tmp_path, "always_raises"), "logger=none", "trainer.total_steps=4"], tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "always_raises" in out.stderr and "this reward cannot read" in out.stderr
    assert "first dataset row" in out.stderr
    assert time.monotonic() - start < 120  # before any engine started


def test_a_reward_that_hangs_is_caught_by_the_start_up_check_within_its_timeout(tmp_path, model_path):
    start = time.monotonic()
    out = grove([reward_override(tmp_path, "hangs"), "reward.timeout_s=2", "logger=none"], tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "hangs" in out.stderr and "timeout" in out.stderr
    assert time.monotonic() - start < 120


def test_a_reward_that_mostly_fails_trips_the_alarm_and_exits_nonzero(tmp_path, model_path):
    """It passes the start-up check (right on the first row's answer) and then fails on
    most held-out responses: the failure-rate alarm stops the run, naming the reward."""
    out = grove([reward_override(tmp_path, "picky"), "logger=none", "trainer.total_steps=4",
                 "eval.max_rows=200"], tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "grove: run failed" in out.stderr
    assert "picky" in out.stderr and "reward.max_failure_rate" in out.stderr
    assert "picky reward found no answer" in out.stderr


def rollout_worker_pids(root: int) -> list[int]:
    pids = []
    for proc in psutil.Process(root).children(recursive=True):
        try:
            if "RolloutWorker" in " ".join(proc.cmdline()[:3]):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return sorted(pids)


def run_and_kill_a_worker(tmp_path: Path, name: str, overrides: list[str], after_steps: int = 3):
    """Start `grove train`, kill -9 a rollout worker once `after_steps` steps are logged;
    returns (the process after it ended, its stderr, seconds from the kill to the end)."""
    cmd = [sys.executable, "-m", "trainer.cli", "train", f"output_root={tmp_path}", f"run_name={name}",
           "logger=none", "eval.every_steps=0", "eval.max_rows=50", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / name / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"train/loss"') >= after_steps:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    pids = rollout_worker_pids(proc.pid)
    assert pids
    psutil.Process(pids[-1]).send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    stdout, stderr = proc.communicate(timeout=600)
    return proc, stdout, stderr, time.monotonic() - killed_at


def test_a_killed_rollout_worker_past_max_restarts_stops_the_run_within_seconds(tmp_path, model_path):
    proc, _, stderr, seconds = run_and_kill_a_worker(
        tmp_path, "kill", ["trainer.total_steps=400", "rollout.max_restarts=0"])
    assert proc.returncode == 1, stderr[-3000:]
    assert seconds < 60  # seen within seconds (the rest is Ray shutting down)
    failed = stderr[stderr.index("grove: run failed"):] if "grove: run failed" in stderr else stderr[-3000:]
    assert failed.startswith("grove: run failed: rollout worker 0:"), failed[:3000]
    assert "rollout.max_restarts=0" in failed and "ledger at the fault" in failed and "'started'" in failed


STEPS_TWO = 900


def test_one_of_two_workers_killed_mid_run_is_replaced_and_nothing_is_lost(tmp_path, model_path):
    """kill -9 of one of two rollout workers: its groups start again on the other, a new
    worker takes its place with the newest weights, the run finishes, the ledger balances."""
    # long enough (0.1-0.15 s a step here: 300 steps left the replacement's engine, which
    # takes 20-40 s to start, too little time) for the replacement to start and work
    proc, stdout, stderr, _ = run_and_kill_a_worker(
        tmp_path, "two", [f"trainer.total_steps={STEPS_TWO}", "trainer.batch_groups=8", "rollout.num_workers=2",
                          "cluster.rollout_cpus=0.5", "buffer.max_staleness=2"], after_steps=2)
    assert proc.returncode == 0, stderr[-4000:]
    died = re.search(r"rollout worker (\d) died", stderr)  # (which one the newest pid is varies)
    assert died, stderr[-4000:]
    assert f"rollout worker {died.group(1)} replaced; at work again" in stderr
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS_TWO + 1))
    final = next(r for r in reversed(records) if "ledger/lost" in r)
    assert final["ledger/lost"] == 0 and final["run/rollout_restarts"] == 1
    assert final["ledger/requeued"] >= 1 and final["ledger/consumed"] >= STEPS_TWO * 8
    assert max(r["staleness/token_age_max"] for r in steps) <= 2
    assert steps[-1]["rollout/workers_live"] == 2


def nan_group(trainer) -> Group:
    """A group whose behaviour logprobs are NaN: the decoupled-PPO weight, hence the loss, is NaN."""
    g = Group(group_id="nan", prompt_id="p", prompt_text="1+1=", row={})
    for reward in (0.0, 1.0):
        t = Trajectory(prompt_id="p", group_id="nan", prompt_ids=[3, 4, 12, 5])
        t.append_tokens([6, 1], [math.nan, math.nan], trainer.version)
        t.reward, t.finish_reason = reward, FinishReason.STOP
        g.trajectories.append(t)
    return g


def weights_of(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}


def test_non_finite_steps_apply_nothing_push_nothing_and_stop_after_the_limit(trainer):
    limit = trainer.cfg.max_nonfinite_steps
    before = weights_of(trainer)
    version = trainer.version
    for i in range(limit - 1):
        metrics, weights = trainer.train_step_and_export([nan_group(trainer)])
        assert weights is None and metrics["train/updates_applied"] == 0.0
        assert metrics["train/nonfinite_skipped_total"] >= i + 1
    assert trainer.version == version + limit - 1  # the version still counts batches
    after = weights_of(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    from trainer.policy_trainer import NonFiniteStepsError

    with pytest.raises(NonFiniteStepsError, match="trainer.max_nonfinite_steps"):
        trainer.train_step_and_export([nan_group(trainer)])
    trainer.nonfinite_in_a_row = 0  # the shared trainer goes on for other tests


def test_a_finite_loss_with_a_non_finite_gradient_is_not_applied(trainer):
    before = weights_of(trainer)
    params = [p for p in trainer.engine.module.parameters()]
    loss = torch.sqrt((params[0].sum() * 0).abs())  # 0, but d sqrt/dx at 0 is inf: the gradient is NaN
    assert torch.isfinite(loss)
    assert trainer._apply(loss) is False
    after = weights_of(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
