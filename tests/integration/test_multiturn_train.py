"""Multi-turn episodes train end to end through the real CLI: the built-in calculator on
`task=arithmetic_steps` (the command docs/workflows.md gives), and an environment that
fails stops the run with an error naming it, the ledger balanced.

The task's model is built and cached on first use (tests/integration/test_arithmetic_steps.py
uses the same one); with it cached, each run takes ~30 s."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.integration.test_e2e import LAST_LINE, grove

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "workflows.md"
SHORT = ["trainer.total_steps=3", "trainer.batch_groups=4", "eval.every_steps=0", "eval.max_rows=40", "logger=none"]


def documented_calculator_command() -> list[str]:
    """The overrides of the calculator command in docs/workflows.md, as a shell splits them."""
    import shlex

    block = re.search(r"```bash\n(grove train task=arithmetic_steps rollout\.workflow=multiturn.*?)```",
                      DOCS.read_text(), re.S)
    assert block, "docs/workflows.md lost its calculator command"
    return shlex.split(block.group(1).replace("\\\n", " "))[2:]


def test_grove_train_with_the_calculator_environment_trains_each_step(tmp_path):
    out = grove([*documented_calculator_command(), *SHORT, "run_name=calc"], tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    match = LAST_LINE.match(out.stdout.strip().splitlines()[-1])
    assert match, out.stdout[-2000:]
    assert "'lost': 0" in out.stderr
    records = [json.loads(line) for line in (Path(match.group(3)) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["train/updates_applied"] == 1
        # the model calls the calculator ('7*3=' -> '21'): several turns, the results masked as context
        assert r["env/turns"] > 1.5 and r["env/context_tokens"] > 0
        assert r["env/episodes"] > 0 and r["env/failures"] == 0


BROKEN = '''class Broken:
    """Every step raises: a tool server that is down."""

    def reset(self, row):
        return ""

    def step(self, action):
        raise ConnectionError("tool server unreachable")
'''


def test_an_environment_that_keeps_failing_stops_the_run_naming_it(tmp_path):
    (tmp_path / "broken_env.py").write_text(BROKEN)
    kwargs = f'{{env: "{tmp_path}/broken_env.py:Broken", stop: ["="], failure_min_episodes: 8}}'
    out = grove(["task=arithmetic_steps", "rollout.workflow=multiturn", f"+rollout.workflow_kwargs={kwargs}",
                 *SHORT, "run_name=broken"], tmp_path, timeout=900)
    assert out.returncode == 1, out.stderr[-4000:]
    failed = out.stderr[out.stderr.index("grove: run failed"):]
    assert "EnvironmentAlarm" in failed and "broken_env.py:Broken" in failed, failed[:3000]
    assert "ConnectionError: tool server unreachable" in failed and "max_failure_rate" in failed
    assert "'lost': 0" in failed  # the ledger at the fault
