"""Through the real CLI: `sampling=d3s` (D³S at sample and token level) trains, and BroRL-size
groups (rollout.n_samples=256) run end to end on the tiny model."""

from __future__ import annotations

import json
import math

import pytest

from tests.integration.test_e2e import LAST_LINE, grove

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def train_steps(tmp_path, name: str) -> list[dict]:
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "train/loss" in r]


def test_d3s_trims_groups_and_tokens_and_trains(tmp_path, model_path):
    out = grove(["sampling=d3s", "trainer.total_steps=3", "trainer.batch_groups=4", "eval.every_steps=0",
                 "eval.max_rows=20", "logger=none", "run_name=d3s"], tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert LAST_LINE.match(out.stdout.strip().splitlines()[-1]), out.stdout[-2000:]
    steps = train_steps(tmp_path, "d3s")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["train/loss"] is not None and math.isfinite(r["train/loss"]) for r in steps)
    # sample level: each group of 8 trains its 4 max-variance samples, the others are counted
    assert all(r["sampling/d3s_samples_trimmed"] > 0 for r in steps)
    assert all(r["batch/samples_per_group_max"] == 4 for r in steps)
    assert all(r["train/num_trajectories"] == 4 * 4 for r in steps)
    assert steps[-1]["ledger/samples_trimmed"] == steps[-1]["sampling/d3s_samples_trimmed"]
    # token level: about half the trained tokens stay in the loss at the start
    assert all(0.0 < r["loss/d3s_token_keep_frac"] < 1.0 for r in steps)
    assert all(r["loss/d3s_token_keep_target"] == pytest.approx(0.5, abs=0.02) for r in steps)
    assert "'lost': 0" in out.stderr and "'samples_trimmed': " in out.stderr


def test_brorl_size_groups_of_256_samples_train_end_to_end(tmp_path, model_path):
    """One group of 256 samples per step (BroRL), trained in micro-batches of at most 512
    padded tokens (prompt + response: ~10-16 positions a row here, so several micro-batches)."""
    out = grove(["rollout.n_samples=256", "trainer.batch_groups=1", "trainer.total_steps=2",
                 "trainer.max_tokens_per_micro_batch=512", "eval.every_steps=0", "eval.max_rows=20", "logger=none",
                 "run_name=brorl"], tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert LAST_LINE.match(out.stdout.strip().splitlines()[-1]), out.stdout[-2000:]
    steps = train_steps(tmp_path, "brorl")
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["train/num_trajectories"] == 256 and r["batch/samples_per_group_max"] == 256 for r in steps)
    assert all(r["train/micro_batches"] >= 2 for r in steps), [r["train/micro_batches"] for r in steps]
    assert all(r["train/loss"] is not None and math.isfinite(r["train/loss"]) for r in steps)
    assert "'lost': 0" in out.stderr
