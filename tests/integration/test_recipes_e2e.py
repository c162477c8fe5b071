"""Each recipe trains end to end through the real CLI, xrpo with its rollout allocator."""

from __future__ import annotations

import json
import math

import pytest

from tests.integration.test_e2e import LAST_LINE, grove

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo", "gspo", "xrpo"])
def test_recipe_trains_three_steps(name, tmp_path, model_path):
    out = grove([f"algorithm={name}", "trainer.total_steps=3", "trainer.batch_groups=8", "eval.every_steps=0",
                 "eval.max_rows=40", "logger=none", f"run_name={name}"], tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    match = LAST_LINE.match(out.stdout.strip().splitlines()[-1])
    assert match, out.stdout[-2000:]
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # metrics.jsonl writes a non-finite value as null
    assert all(r["train/loss"] is not None and math.isfinite(r["train/loss"]) for r in steps), steps
    for key in ("loss/clip_frac_low", "loss/clip_frac_high", "loss/mismatch_kl", "batch/zero_variance_group_frac"):
        assert all(r[key] is not None for r in steps), key
    if name == "dapo":  # dynamic sampling: no zero-variance group is ever trained on
        assert all(r["batch/zero_variance_group_frac"] == 0 for r in steps)
    if name == "xrpo":  # the allocator ran: per-prompt phases handed out extra rollouts
        assert steps[-1]["sampling/phases"] >= 1 and steps[-1]["sampling/extra_items"] >= 1
