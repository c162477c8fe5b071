"""task=arithmetic_steps through the real CLI: the task's own model (warmed up on a cold
cache), its reward and its longer responses, and RL raising held-out accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_e2e import LAST_LINE, grove

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

# Measured (400 held-out rows, 0.270 before RL): seed 0 0.315 / 0.328 / 0.367 after 100 /
# 200 / 400 steps; seed 1 0.242 / 0.307 after 100 / 200 (an early dip). So the test runs 200
# steps and asks for a gain; docs/benchmarks.md has its size.
STEPS = 200


def test_rl_raises_step_by_step_accuracy(tmp_path):
    out = grove(["task=arithmetic_steps", f"trainer.total_steps={STEPS}", "eval.every_steps=0",
                 "eval.max_rows=400", "logger=none", "run_name=steps"], tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    match = LAST_LINE.match(out.stdout.strip().splitlines()[-1])
    assert match, out.stdout[-2000:]
    before, after = float(match.group(1)), float(match.group(2))
    assert "'lost': 0" in out.stderr
    records = [json.loads(l) for l in (Path(match.group(3)) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/accuracy" in r]
    assert len(evals) == 2
    for r in evals:  # accuracy per number of operations
        assert {k for k in r if k.startswith("eval/accuracy_difficulty_")} == {
            f"eval/accuracy_difficulty_{d}" for d in range(2, 7)}
    steps = [r for r in records if "train/loss" in r]
    assert len(steps) == STEPS
    assert after > before, (before, after)
