"""compare_workflows' report on synthetic runs (the comparison takes most of an hour): each
arm's relative target is read from its own starting accuracy, seeds that never reach it
are counted, and the commands differ by the arm's overrides only."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
spec = importlib.util.spec_from_file_location("compare_workflows", SCRIPTS / "compare_workflows.py")
cw = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = cw
spec.loader.exec_module(cw)


def result(arm, seed, evals, status="budget"):
    return cw.Result(arm, seed, "arithmetic_steps", ["grove"], 0 if status != "failed" else 1, status, 60.0, 1000,
                     steps=40, rollouts_used=1000, evals=evals, start_accuracy=evals[0][2] if evals else None,
                     final_accuracy=evals[-1][2] if evals else None)


def test_each_arm_is_measured_from_its_own_start():
    flat = [result("flat", s, [(0, 0.0, 0.25, 0), (20, 40.0, 0.28, 500), (40, 80.0, 0.31, 1000)]) for s in (0, 1)]
    # the tool arm starts higher (evaluated with its tool) and gains as fast: same steps to +0.05
    tool = [result("tool", s, [(0, 0.0, 0.60, 0), (20, 60.0, 0.63, 500), (40, 120.0, 0.66, 1000)]) for s in (0, 1)]
    lines = cw.report(flat + tool, "+0.05").splitlines()
    assert lines[-1] == "compare_workflows: flat=40/+0.060 tool=40/+0.060"
    assert cw.arm_targets(flat + tool, "0.3") == {"flat": (0.3, 0.25), "tool": (0.3, 0.60)}
    assert cw.report(flat + tool, "0.3").splitlines()[-1] == "compare_workflows: flat=40/+0.060 tool=0/+0.060"


def test_a_seed_short_of_the_target_or_failed_makes_the_arm_nan_but_is_listed():
    reached = result("tree", 0, [(0, 0.0, 0.25, 0), (20, 30.0, 0.31, 500)])
    short = result("tree", 1, [(0, 0.0, 0.25, 0), (20, 30.0, 0.27, 500)])
    failed = result("flat", 0, [], status="failed")
    text = cw.report([reached, short, failed], "+0.05")
    assert text.splitlines()[-1] == "compare_workflows: tree=nan/+0.040 flat=nan/-"
    assert " 1/2 " in [line for line in text.splitlines() if line.startswith("tree ")][-1]  # the summary row


def test_commands_differ_by_the_arm_only():
    args = cw.argparse.Namespace(batch_groups=16, eval_every=20, eval_rows=200, overrides=["trainer.lr=2e-4"])
    flat, tool = (cw.command(arm, 1, 480, args, Path("/r")) for arm in ("flat", "tool"))
    assert set(flat) - set(tool) == {"rollout.workflow=group", "run_name=flat-seed1"}
    assert "rollout.eval_workflow=true" in tool and "task=arithmetic_steps" in tool and tool[-1] == "trainer.lr=2e-4"
