"""Synchronous (η = 0), asynchronous (η = 2) and APRIL (η = 1) training through the same code path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_e2e import LAST_LINE, grove

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.mark.parametrize("name,overrides,eta", [
    ("sync", ["buffer.max_staleness=0", "rollout.on_update=wait"], 0),
    ("async", ["buffer.max_staleness=2", "rollout.on_update=interrupt"], 2),
    ("april", ["buffer.max_staleness=1", "rollout.on_update=wait", "rollout.overprovision=2"], 1),
])
def test_both_modes_raise_accuracy_within_their_staleness_bound(tmp_path, model_path, name, overrides, eta):
    out = grove([*overrides, "trainer.total_steps=60", "trainer.lr=1e-4", "eval.every_steps=0",
                 "logger=none", f"run_name={name}"], tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    match = LAST_LINE.match(out.stdout.strip().splitlines()[-1])
    before, after = float(match.group(1)), float(match.group(2))
    # One seed, 60 steps: the gain was +0.04 to +0.09 over five runs of the async mode
    # (before and after the orchestrator alike). Greedy held-out accuracy does not move at
    # all without learning, so +0.025 separates learning from noise without flaking.
    assert after >= before + 0.025, (before, after)
    records = [json.loads(l) for l in (Path(match.group(3)) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert len(steps) == 60
    assert max(r["staleness/token_age_max"] for r in steps) <= eta
    assert max(r["staleness/group_age_max"] for r in steps) <= eta
    if eta == 0:
        assert all(r["batch/version_min"] == r["batch/version_max"] == r["step"] - 1 for r in steps)
    else:
        assert max(r["batch/age_max"] for r in steps) >= 1  # it really ran ahead
    final = records[-2] if "eval/accuracy" in records[-1] else records[-1]
    assert final["ledger/lost"] == 0
    if name == "april":  # groups unfinished at a batch boundary went on into later batches
        assert final["ledger/partial"] > 0 and max(r["batch/partial_ratio"] for r in steps) > 0
