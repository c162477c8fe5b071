"""The whole loop through the real CLI: Ray actors, vLLM, DeepSpeed, W&B offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
LAST_LINE = re.compile(r"^grove: accuracy_before=(\d\.\d+) accuracy_after=(\d\.\d+) run_dir=(\S+)$")


def grove(args, tmp_path, timeout=900):
    # a clean environment: no W&B key, and not this test process's own torch.distributed group
    skip = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in skip}
    cmd = [sys.executable, "-m", "trainer.cli", "train", f"output_root={tmp_path}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_short_run_completes_and_records_several_policy_versions(tmp_path, model_path):
    out = grove(["trainer.total_steps=6", "eval.every_steps=3", "eval.max_rows=100", "run_name=e2e"], tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    last = out.stdout.strip().splitlines()[-1]
    match = LAST_LINE.match(last)
    assert match, last
    run_dir = Path(match.group(3))
    assert run_dir == tmp_path / "e2e"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    versions = {v for r in steps for v in (r["batch/version_min"], r["batch/version_max"])}
    assert len(versions) > 1
    assert all(r["batch/age_max"] <= 1 for r in steps)  # default max_staleness
    for key in ("train/reward_mean", "train/tokens_per_s", "rollout/tokens_per_s", "weight_sync/total_s"):
        assert all(r[key] is not None for r in steps), key
    evals = [r for r in records if "eval/accuracy" in r]
    assert len(evals) >= 3  # before, mid-run, after
    assert float(match.group(1)) == pytest.approx(evals[0]["eval/accuracy"], abs=1e-4)
    assert "ledger: {" in out.stderr and "'lost': 0" in out.stderr
    assert (run_dir / "config.yaml").read_text().startswith("model:")
    for key in ("staleness/group_age_max", "staleness/token_age_mean", "rollout/idle_ratio", "trainer/idle_ratio",
                "batch/partial_ratio", "loss/is_weight_mean", "loss/mismatch_kl", "ledger/started",
                "trainer/straggler_wait_ratio", "rollout/concurrency_mean"):
        assert all(key in r for r in steps), key
    assert all(0.0 <= r["trainer/straggler_wait_ratio"] <= r["trainer/idle_ratio"] + 1e-9 for r in steps)
    assert all(r["rollout/concurrency_mean"] > 0 for r in steps)  # something generated between steps
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline, "W&B should run offline without an API key"
    logged = offline[0].read_bytes()  # W&B's record log keeps metric names as plain strings
    for key in (b"staleness/group_age_max", b"rollout/idle_ratio", b"trainer/idle_ratio", b"eval/accuracy"):
        assert key in logged, key
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run_dir / "final_model").config.model_type == "qwen2"


MY_REWARD = '''import re

def my_fn(response: str, answer: str, **kwargs) -> float:
    """1.0 if the last number in the response equals the row's answer."""
    numbers = re.findall(r"-?\\d+", response)
    return 1.0 if numbers and numbers[-1] == str(answer).strip() else 0.0
'''


def test_docs_reward_walkthrough_trains_with_a_users_own_file(tmp_path, model_path):
    """docs/rewards.md section 1, verbatim: a reward in the user's own file, outside the repo."""
    docs = (Path(__file__).parents[2] / "docs" / "rewards.md").read_text()
    assert MY_REWARD.replace("\\\\", "\\") in docs
    home = tmp_path / "home"
    home.mkdir()
    (home / "my_reward.py").write_text(MY_REWARD.replace("\\\\", "\\"))
    out = grove([f"reward.functions=[{{fn: {home}/my_reward.py:my_fn}}]", "trainer.total_steps=2",
                 "eval.every_steps=0", "eval.max_rows=50", "logger=none", "run_name=walk"], tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert LAST_LINE.match(out.stdout.strip().splitlines()[-1])
    rewards = [json.loads(l).get("train/reward_mean") for l in (tmp_path / "walk" / "metrics.jsonl").read_text().splitlines()]
    assert any(r is not None and r > 0 for r in rewards)


def test_a_reward_with_a_wrong_signature_fails_before_any_engine_starts(tmp_path):
    (tmp_path / "bad_reward.py").write_text("def score(completion, solution):\n    return 1.0\n")
    out = grove([f"reward.functions=[{{fn: {tmp_path}/bad_reward.py:score}}]", "logger=none"], tmp_path, timeout=120)
    assert out.returncode == 2
    assert "grove: error: reward:" in out.stderr and "score" in out.stderr and "completion" in out.stderr
    assert "engines ready" not in out.stderr


FAULTY_REWARD = '''import math, os, time

def faulty(response, answer, **kwargs):
    """Fails in every way a reward can, depending on the response's last character."""
    last = response[-1:] or "x"
    if last == "1":
        raise ValueError("boom")
    if last == "2":
        return math.nan
    if last == "3":
        time.sleep(30)
    if last == "4":
        return "not a number"
    if last == "5":
        os._exit(3)
    return 1.0 if response.strip() == str(answer) else 0.0
'''


def test_faulty_rewards_are_counted_by_kind_and_training_goes_on(tmp_path, model_path):
    """With the failure-rate alarm off (it would stop this run: test_faults.py), every kind
    of failure is counted, the workers are replaced, and training goes on."""
    (tmp_path / "faulty.py").write_text(FAULTY_REWARD)
    out = grove([f"reward.functions=[{{fn: {tmp_path}/faulty.py:faulty}}]", "reward.timeout_s=0.5",
                 "reward.max_failure_rate=1.0",
                 "trainer.total_steps=3", "trainer.batch_groups=8", "eval.every_steps=0", "eval.max_rows=40",
                 "logger=none", "run_name=faulty"], tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    records = [json.loads(l) for l in (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "train/loss" in r][-1]
    assert last["step"] == 3
    for kind in ("exception", "nan", "timeout", "not_a_number", "crashed"):
        assert last[f"reward/failures/{kind}"] > 0, kind
    assert last["reward/worker_restarts"] > 0
