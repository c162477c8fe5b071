"""compare_sampling's report, from metrics.jsonl lines to its last line, on synthetic runs:
the sweep takes most of an hour, so a report that misreads a run should be caught here."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_sampling.py"
spec = importlib.util.spec_from_file_location("compare_sampling", SCRIPT)
cs = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = cs  # its dataclasses look their module up there
spec.loader.exec_module(cs)

N = 8  # samples per group
LAST_LINE = re.compile(r"^compare_sampling:( [a-z_]+=(\d+|nan)/(\d\.\d{3}|nan))+$")


def metrics_lines(accuracies: dict[int, float], steps: int, per_step: float = 64.0, filtered_per_step: int = 0,
                  zero_var: float = 0.25, eval_lag: int = 1) -> list[str]:
    """A run's metrics.jsonl as the launcher writes it: the step-0 evaluation, one record
    per step, evaluations logged `eval_lag` steps after the version they were started at
    (and written before that step's own record), and the after-RL evaluation."""
    lines = [json.dumps({"step": 0, "time_s": 30.0, "eval/accuracy": accuracies.get(0, 0.2)})]
    for s in range(1, steps + 1):
        if s - eval_lag in accuracies and s - eval_lag > 0:
            lines.append(json.dumps({"step": s, "time_s": 30.0 + s - 0.5, "eval/accuracy": accuracies[s - eval_lag]}))
        lines.append(json.dumps({
            "step": s, "time_s": 30.0 + s, "train/num_trajectories": per_step,
            "batch/zero_variance_group_frac": zero_var, "batch/samples_per_group_mean": per_step / 8,
            "ledger/filtered": float(filtered_per_step * s), "ledger/dropped": 0.0, "ledger/consumed": 8.0 * s,
            "sampling/groups_observed": 8.0 * s, "staleness/group_age_hist": [0, 1]}))
    lines.append(json.dumps({"step": steps, "time_s": 30.0 + steps + 1, "eval/accuracy": accuracies.get(steps, 0.2)}))
    return lines


def result_of(lines: list[str], budget: int, strategy: str = "uniform", seed: int = 0) -> "cs.Result":
    metrics = cs.parse_run(cs.parse_records(lines), N)
    return cs.summarize_run(cs.Result(strategy, seed, "arithmetic", [], 0, "budget", 1.0, budget), metrics)


def test_rollouts_count_trained_and_filtered_groups():
    records = cs.parse_records(metrics_lines({}, 5, per_step=64.0, filtered_per_step=2))
    used = cs.rollouts_by_step(records, N)
    # by step s: 64 s trained + 2 s filtered groups of 8
    assert used == {s: 64 * s + 16 * s for s in range(1, 6)}
    assert cs.rollouts_at(used, 0) == 0 and cs.rollouts_at(used, 3) == 240 and cs.rollouts_at(used, 99) == 400


def test_variable_group_sizes_are_counted_by_trajectories():
    # xrpo/dars: the batch's size varies with its groups; steps are counted by what was trained
    lines = [json.dumps({"step": s, "time_s": float(s), "train/num_trajectories": n, "ledger/filtered": 0.0})
             for s, n in ((1, 64.0), (2, 100.0), (3, 72.0))]
    assert cs.rollouts_by_step(cs.parse_records(lines), N) == {1: 64, 2: 164, 3: 236}


def test_samples_a_sampler_trimmed_count_as_rollouts():
    # d3s: 8 generated per group, 4 trained; the other 4 were still generated
    lines = [json.dumps({"step": s, "time_s": float(s), "train/num_trajectories": 32.0, "ledger/filtered": 0.0,
                         "ledger/samples_trimmed": 32.0 * s}) for s in (1, 2, 3)]
    assert cs.rollouts_by_step(cs.parse_records(lines), N) == {1: 64, 2: 128, 3: 192}


def test_a_line_cut_short_is_skipped():
    lines = metrics_lines({}, 3)
    lines[-2] = lines[-2][:40]
    assert len(cs.parse_records(lines + ["", "   "])) == len(lines) - 1


def test_rollouts_to_target_is_read_at_the_evaluation_and_inside_the_budget():
    acc = {0: 0.20, 10: 0.22, 20: 0.26, 30: 0.24, 40: 0.31, 50: 0.35}
    r = result_of(metrics_lines(acc, 52), budget=64 * 45)
    assert r.start_accuracy == 0.20
    # evaluations logged one step late: the one started at 40 is read at step 41
    assert [e[0] for e in r.evals] == [0, 11, 21, 31, 41, 51, 52]
    cs.apply_target(r, 0.25)
    assert (r.rollouts_to_target, r.steps_to_target) == (64 * 21, 21)
    assert r.seconds_to_target == pytest.approx(20.5)  # since the step-0 evaluation (at 30 s)
    cs.apply_target(r, 0.30)
    assert r.rollouts_to_target == 64 * 41
    cs.apply_target(r, 0.33)  # reached at step 51 only, past the budget of 45 steps' rollouts
    assert r.rollouts_to_target is None and r.seconds_to_target is None
    assert r.final_accuracy == 0.31 and r.final_rollouts == 64 * 41  # last evaluation under the budget
    assert r.zero_var_frac == pytest.approx(0.25)


def test_zero_variance_and_filtered_share_stop_at_the_budget():
    lines = metrics_lines({10: 0.3}, 20, per_step=64.0, filtered_per_step=8, zero_var=0.0)
    r = result_of(lines, budget=128 * 10)
    assert r.zero_var_frac == 0.0
    assert r.filtered_frac == pytest.approx(80 / (80 + 80))  # 8 filtered and 8 trained groups a step
    assert r.rollouts_used == 128 * 20 and r.samples_per_group == pytest.approx(8.0)
    assert r.sampling_last == {"sampling/groups_observed": 80.0}


def test_budget_passed_waits_for_the_evaluation_in_flight():
    lines = metrics_lines({10: 0.3, 20: 0.3}, 25)
    for cut, expected in ((14, False), (len(lines), True)):
        assert cs.budget_passed(cs.parse_records(lines[:cut]), N, 64 * 12) is expected
    # past the budget at step 12, but the evaluation logged at step 11 is the only one so far
    upto_13 = [l for l in lines if json.loads(l)["step"] <= 13]
    assert not cs.budget_passed(cs.parse_records(upto_13), N, 64 * 12)
    upto_21 = [l for l in lines if json.loads(l)["step"] <= 21]
    assert cs.budget_passed(cs.parse_records(upto_21), N, 64 * 12)
    assert not cs.budget_passed(cs.parse_records(lines), N, 10 ** 9)


def test_tail_reads_only_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = cs.Tail(path)
    assert tail.read() == []
    path.write_text('{"step": 0, "time_s": 1.0}\n{"step": 1, "ti')
    assert [r["step"] for r in tail.read()] == [0]
    with open(path, "a") as f:
        f.write('me_s": 2.0}\n')
    assert [r["step"] for r in tail.read()] == [0, 1]


def test_target_relative_or_absolute():
    assert cs.resolve_target("+0.05", [0.2, 0.2, 0.3]) == (pytest.approx(0.25), 0.2)
    assert cs.resolve_target("0.4", [0.2]) == (0.4, 0.2)


def sweep() -> list:
    """Two strategies, three seeds: uniform reaches 0.25 in every seed, vade in two of three."""
    results = []
    for seed, at in enumerate((20, 30, 40)):
        acc = {0: 0.2, **{s: (0.26 if s >= at else 0.21) for s in range(10, 61, 10)}}
        results.append(result_of(metrics_lines(acc, 62), budget=64 * 60, strategy="uniform", seed=seed))
    for seed, at in enumerate((10, 20, None)):
        acc = {0: 0.2, **{s: (0.27 if at is not None and s >= at else 0.22) for s in range(10, 61, 10)}}
        results.append(result_of(metrics_lines(acc, 62, zero_var=0.5), budget=64 * 60, strategy="vade", seed=seed))
    target, _ = cs.resolve_target("+0.05", [r.start_accuracy for r in results])
    for r in results:
        cs.apply_target(r, target)
    return results


def test_summary_counts_runs_that_never_reach_the_target():
    uniform, vade = cs.summarize(sweep(), ["uniform", "vade"])
    assert (uniform.runs, uniform.reached, uniform.failed) == (3, 3, 0)
    assert uniform.rollouts_to_target.mean == pytest.approx(64 * 31)
    assert (uniform.rollouts_to_target.lo, uniform.rollouts_to_target.hi) == (64 * 21, 64 * 41)
    assert uniform.rollouts_to_target.std == pytest.approx(64 * 10)
    assert (vade.runs, vade.reached) == (3, 2)  # the third seed is kept, as not reached
    assert vade.rollouts_to_target.n == 2 and vade.rollouts_to_target.mean == pytest.approx(64 * 16)
    assert vade.final_accuracy.n == 3 and vade.final_accuracy.mean == pytest.approx((0.27 + 0.27 + 0.22) / 3)
    assert cs.versus(vade, uniform) == "-"  # not every seed reached it
    assert "2/3" in cs.summary_table([uniform, vade])


def test_last_line_format():
    results = sweep()
    line = cs.last_line(cs.summarize(results, ["uniform", "vade"]))
    assert LAST_LINE.match(line)
    assert line == f"compare_sampling: uniform={64 * 31}/0.250 vade=nan/0.500"


def test_failed_runs_and_missing_strategies():
    results = sweep()
    results[0].status = "failed"
    uniform, dars = cs.summarize(results, ["uniform", "dars"])
    assert (uniform.runs, uniform.failed, uniform.reached) == (3, 1, 2)
    assert uniform.last_value().startswith("uniform=nan/")
    assert dars.runs == 0 and dars.last_value() == "dars=nan/nan"
    assert LAST_LINE.match(cs.last_line([uniform, dars]))


def test_versus_uniform():
    def summ(name, xs):
        return cs.Summary(name, len(xs), 0, len(xs), cs.spread(xs), *[cs.spread([])] * 5)

    base = summ("uniform", [3000, 3500, 4000])
    assert cs.versus(summ("dars", [1000, 1500, 2000]), base) == "0.43x (apart)"
    assert cs.versus(summ("xrpo", [2000, 3200, 3400]), base) == "0.82x (overlap)"
    assert cs.versus(base, base) == "-"


def test_spread_text():
    assert cs.spread([]).text(".0f") == "-"
    assert cs.spread([5.0]).text(".1f") == "5.0"
    assert cs.spread([1, 3]).text(".0f") == "2 ± 1 [1-3]"
    assert math.isnan(cs.spread([None]).mean)


def test_command_varies_the_seed_and_not_the_data():
    args = cs.argparse.Namespace(batch_groups=8, eval_every=20, eval_rows=400)
    cmd = cs.command("xrpo", 2, "arithmetic_steps", 500, args, Path("/r"), ["trainer.lr=1e-4"])
    assert {"sampling=xrpo", "task=arithmetic_steps", "seed=2", "trainer.seed=2", "rollout.engine.seed=2",
            "logger=none", "trainer.total_steps=500", "eval.every_steps=20", "eval.max_rows=400"} <= set(cmd)
    assert not any(c.startswith("task.seed") for c in cmd) and cmd[-1] == "trainer.lr=1e-4"


def test_missing_task_is_skipped(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["compare_sampling.py", "--task", "no_such_task"])
    assert cs.main() == 0
    assert "skipping task=no_such_task" in capsys.readouterr().out


def test_reanalysing_saved_results_at_another_target_merges_files_and_moves_the_crossing(tmp_path, capsys):
    def result(strategy, seed, evals):
        r = cs.Result(strategy, seed, "arithmetic", ["grove"], 0, "budget", 60.0, 1000, steps=10, rollouts_used=1000,
                      evals=evals, start_accuracy=evals[0][2])
        return cs.asdict(r)

    slow = [(0, 0.0, 0.20, 0), (5, 5.0, 0.26, 400), (10, 10.0, 0.31, 800)]
    fast = [(0, 0.0, 0.20, 0), (5, 5.0, 0.31, 400), (10, 10.0, 0.32, 800)]
    one, two = tmp_path / "a.json", tmp_path / "b.json"
    one.write_text(json.dumps({"results": [result("uniform", s, slow) for s in (0, 1)]}))
    two.write_text(json.dumps({"results": [result("vade", s, fast) for s in (0, 1)]}))
    assert cs.reanalyse([one, two], "+0.05") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "compare_sampling: uniform=400/nan vade=400/nan"
    assert cs.reanalyse([one, two], "+0.10") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "compare_sampling: uniform=800/nan vade=400/nan"


def test_a_run_takes_sigint_even_when_the_driver_was_started_ignoring_it():
    """`nohup compare_sampling.py &` ignores SIGINT, and children inherit that: the run
    would go on until SIGKILL, training past its budget."""
    import signal
    import subprocess

    probe = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"]
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        inherited = subprocess.run(probe, capture_output=True, text=True).stdout.strip()
        reset = subprocess.run(probe, capture_output=True, text=True, preexec_fn=cs._interruptible).stdout.strip()
    finally:
        signal.signal(signal.SIGINT, old)
    assert (inherited, reset) == ("False", "True")
