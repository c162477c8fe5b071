"""bench_async's report, from metrics.jsonl files to its last line, which issue 3 fixes
exactly: the benchmark takes minutes, so a report that breaks or misreads a run should be
caught here first."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_async.py"
spec = importlib.util.spec_from_file_location("bench_async", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

N = 8  # samples per group
LAST_LINE = re.compile(r"bench_async: async_speedup=(\S+) april_gain=(\S+) pipeline_efficiency=(\S+) "
                       r"max_staleness=(\d+) eta=(\d+) lost=(\d+)")


def write_run(run_dir: Path, consumed: int, loop_s: float, age_max: int, lost: int = 0, final: bool = True) -> None:
    """A mode's metrics.jsonl as the launcher writes it: one record per step, then the run's."""
    run_dir.mkdir(parents=True)
    records = [{"time_s": 1.0 + 0.1 * step, "train/loss": 0.1, "train/num_trajectories": 64.0,
                "train/num_tokens": 500.0, "train/step_s": 0.06, "staleness/group_age_max": float(age_max),
                "batch/age_max": float(age_max), "batch/context_age_max": float(age_max),
                "weight_sync/total_s": 0.03, "ledger/consumed": 8.0 * step}
               for step in range(1, 4)]
    if final:
        records.append({"time_s": 1.4, "run/loop_s": loop_s, "run/rollout_idle_ratio": 0.1,
                        "run/trainer_idle_ratio": 0.3, "run/rollout_concurrency_mean": 80.0,
                        "ledger/consumed": float(consumed), "ledger/started": float(consumed + lost),
                        "ledger/masked_tokens": 100.0, "ledger/lost": float(lost)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def rows_for(tmp_path: Path, runs: dict[str, dict]) -> list[dict]:
    rows = []
    for name, run in runs.items():
        eta = {"sync": 0, "sync+april": 1}.get(name, 2)
        cfg = SimpleNamespace(buffer=SimpleNamespace(max_staleness=eta), rollout=SimpleNamespace(n_samples=N))
        write_run(tmp_path / name, **run)
        rows.append(bench.summarize(name, cfg, tmp_path / name, 10.0, None if run.get("final", True) else "failed"))
    return rows


BOUNDS = {
    "rollout_only_traj_s": 750.0, "rollout_only_schedule": "all at once",
    "rollout_schedules_traj_s": {"all at once": 750.0, "all at once, again": 740.0},
    "rollout_only_groups": 240, "rollout_only_s": 2.56, "rollout_only_tok_s": 7000.0, "long_tail_groups": 39,
    "mean_response_tokens": 9.4, "train_only_traj_s": 900.0, "train_only_steps": 30, "train_step_s": 0.066,
    "train_only_s": 2.13, "export_s": 0.01, "rollout_windows_traj_s": {8: 500.0, 16: 600.0, 24: 650.0},
    "rollout_window_traj_s": 650.0, "rollout_window_groups": 24,
    "rollout_under_rule": {0.0: (630.0, 18.3), 0.066: (600.0, 12.2)},
    "rollout_cpu": {group: 0.1 for group in bench.CPU_GROUPS}, "train_cpu": {group: 0.1 for group in bench.CPU_GROUPS},
}
ARGS = SimpleNamespace(steps=30, batch_groups=8, n_samples=N, max_tokens=48, long_tail_fraction=0.15,
                       long_tail_min_tokens=40)


def test_last_line_carries_the_ratios_of_the_measured_rows(tmp_path):
    rows = rows_for(tmp_path, {
        "sync": dict(consumed=240, loop_s=8.0, age_max=0),          # 1920 / 8.0 = 240 traj/s
        "sync+april": dict(consumed=240, loop_s=6.0, age_max=1),    # 320 traj/s
        "async": dict(consumed=240, loop_s=3.2, age_max=2),         # 600 traj/s
        "async-wait": dict(consumed=240, loop_s=4.0, age_max=2),
    })
    lines = bench.report(ARGS, BOUNDS, rows, eta=2)
    match = LAST_LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    speedup, april, efficiency, staleness, eta, lost = match.groups()
    assert (speedup, april) == ("2.50", "1.33")
    assert efficiency == "0.80"  # 600 over the smaller bound, rollout-only's 750
    assert (staleness, eta, lost) == ("2", "2", "0")
    text = "\n".join(lines)
    assert "the rule leaves 0.84 of rollout-only" in text  # the ceiling: 630 / 750, instant trainer
    assert "leaves 0.80 of rollout-only; of that, the async loop keeps 1.00" in text


def test_the_smaller_bound_is_the_denominator_and_a_lost_group_shows(tmp_path):
    rows = rows_for(tmp_path, {
        "sync": dict(consumed=240, loop_s=8.0, age_max=0),
        "sync+april": dict(consumed=240, loop_s=6.0, age_max=1),
        "async": dict(consumed=240, loop_s=3.2, age_max=3, lost=1),
    })
    bounds = {**BOUNDS, "train_only_traj_s": 500.0}  # the trainer is now the bottleneck
    match = LAST_LINE.fullmatch(bench.report(ARGS, bounds, rows, eta=2)[-1])
    assert match
    assert match.group(3) == "1.20"  # 600 / 500
    assert match.group(4) == "3" and match.group(6) == "1"  # a too-old batch and a lost group are not hidden


@pytest.mark.parametrize("failed", ["async", "sync"])
def test_a_failed_mode_prints_nan_not_a_number(tmp_path, failed):
    runs = {"sync": dict(consumed=240, loop_s=8.0, age_max=0), "sync+april": dict(consumed=240, loop_s=6.0, age_max=1),
            "async": dict(consumed=240, loop_s=3.2, age_max=2)}
    runs[failed]["final"] = False  # the run never reached its final record
    lines = bench.report(ARGS, BOUNDS, rows_for(tmp_path, runs), eta=2)
    match = LAST_LINE.fullmatch(lines[-1])
    assert match and match.group(1) == "nan"
    assert f"FAILED modes: {failed}" in "\n".join(lines)
