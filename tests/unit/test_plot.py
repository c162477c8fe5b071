"""The run dashboard (`grove plot`, trainer/plot.py) on synthetic metrics.jsonl files."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from trainer.plot import DashboardError, dashboard_figure, load_run, write_dashboard, write_run_dashboard  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CORE_TITLES = [
    "Reward and held-out accuracy by step",
    "Reward and held-out accuracy by wall time",
    "Staleness (policy versions behind)",
    "Throughput",
    "Idle ratios",
    "Weight sync time per step",
    "Reward failure rate (since the previous step)",
    "Reward failures by kind (cumulative)",
]


def records(steps: int = 12, shift: float = 0.0, failures: bool = False, extra: dict | None = None) -> list[dict]:
    """What a run's MetricsLogger writes: eval before, one line per step, eval after."""
    out = [{"step": 0, "time_s": 5.0, "eval/accuracy": 0.2 + shift, "eval/accuracy_difficulty_1": 0.1}]
    for s in range(1, steps + 1):
        rec = {
            "step": s, "time_s": 5.0 + 0.7 * s,
            "train/reward_mean": 0.2 + 0.02 * s + shift, "train/loss": 0.1,
            "staleness/token_age_mean": 0.4, "staleness/token_age_max": 1.0,
            "staleness/group_age_mean": 0.5, "staleness/group_age_max": 1.0,
            "staleness/group_age_hist": [0, 1, 1],  # a histogram: a list, not drawn
            "rollout/tokens_per_s": 900.0 + s, "train/tokens_per_s": 2000.0 - s,
            "rollout/idle_ratio": 0.1, "trainer/idle_ratio": 0.2, "trainer/straggler_wait_ratio": 0.0,
            "weight_sync/total_s": 0.012, "weight_sync/apply_s": 0.004, "weight_sync/load_s": 0.003,
            "reward/failure_rate": 0.1 if failures else 0.0,
            "reward/failures/timeout": float(s if failures else 0), "reward/failures/exception": 0.0,
            "reward/failures/total": float(s if failures else 0),
            "loss/mismatch_kl": None,  # a non-finite value, as the logger writes it
            **(extra or {}),
        }
        out.append(rec)
    out.append({"step": steps, "time_s": 6.0 + 0.7 * steps, "eval/accuracy": 0.3 + shift})
    return out


def make_run(path: Path, recs: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def titles(fig) -> list[str]:
    return [ax.get_title(loc="left") for ax in fig.axes if ax.get_visible() and ax.get_title(loc="left")]


def panel(fig, title: str):
    return next(ax for ax in fig.axes if ax.get_title(loc="left").startswith(title))


def texts(ax) -> str:
    return " | ".join(t.get_text() for t in ax.texts)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_one_run_draws_every_core_panel_into_a_png(tmp_path):
    run = make_run(tmp_path / "run1", records())
    out = write_dashboard([run], run / "dashboard.png")
    assert out == run / "dashboard.png"
    width, height = png_size(out)
    assert 1200 <= width <= 2500 and 1200 <= height <= 4000
    assert out.stat().st_size > 50_000
    fig = dashboard_figure([run])
    assert titles(fig) == CORE_TITLES  # no sampling/tree panels: the run logged none
    reward = panel(fig, "Reward and held-out accuracy by step")
    assert [line.get_label() for line in reward.get_lines()] == ["reward (train batch mean)", "held-out accuracy"]
    assert list(reward.get_lines()[1].get_xdata()) == [0.0, 12.0]  # eval before RL and after
    assert reward.get_xlabel() == "step (policy version)"
    assert "wall time" in panel(fig, "Reward and held-out accuracy by wall time").get_xlabel()
    sync = panel(fig, "Weight sync time per step")
    assert sync.get_ylabel() == "ms" and max(sync.get_lines()[0].get_ydata()) == pytest.approx(12.0)
    assert "no reward failures" in texts(panel(fig, "Reward failures by kind"))
    assert "run1" in fig.get_suptitle()


def test_failures_by_kind_show_the_kinds_that_failed(tmp_path):
    fig = dashboard_figure([make_run(tmp_path / "r", records(failures=True))])
    kinds = panel(fig, "Reward failures by kind")
    assert [line.get_label() for line in kinds.get_lines()] == ["timeout"]
    assert "no reward failures" not in texts(kinds)
    assert max(panel(fig, "Reward failure rate").get_lines()[0].get_ydata()) == pytest.approx(0.1)


def test_sampling_and_tree_panels_appear_only_when_logged(tmp_path):
    extra = {"sampling/epoch": 1.0, "sampling/groups_observed": 800.0, "sampling/zero_variance_frac": 0.3,
             "tree/branches": 4.0, "tree/depth_mean": 2.5}
    fig = dashboard_figure([make_run(tmp_path / "r", records(extra=extra))])
    assert titles(fig) == [*CORE_TITLES, "Prompt sampler (sampling/*)", "Tree rollouts (tree/*)"]
    sampling = panel(fig, "Prompt sampler")
    assert sorted(line.get_label() for line in sampling.get_lines()) == ["epoch", "groups_observed",
                                                                        "zero_variance_frac"]
    assert sampling.get_yscale() == "symlog"  # 800 and 0.3 on one axis
    assert panel(fig, "Tree rollouts").get_yscale() == "linear"


def test_two_runs_go_on_the_same_axes_labelled_by_run(tmp_path):
    a = make_run(tmp_path / "sync", records(steps=10))
    b = make_run(tmp_path / "async", records(steps=14, shift=0.1))
    out = write_dashboard([a, b], tmp_path / "compare" / "dash.png")
    assert png_size(out)[0] >= 1200
    fig = dashboard_figure([a, b])
    assert titles(fig) == CORE_TITLES
    reward = panel(fig, "Reward and held-out accuracy by step")
    assert len(reward.get_lines()) == 4  # 2 metrics x 2 runs
    colors = {line.get_color() for line in reward.get_lines()}
    assert len(colors) == 2  # one colour per run
    legend = fig.legends[0]
    assert [t.get_text().split(" ")[0] for t in legend.get_texts()] == ["sync", "async"]
    assert [t.get_text() for t in reward.get_legend().get_texts()] == ["reward (train batch mean)",
                                                                      "held-out accuracy"]


def test_runs_with_the_same_directory_name_are_told_apart(tmp_path):
    a = make_run(tmp_path / "asy1" / "a", records())
    b = make_run(tmp_path / "asy2" / "a", records())
    fig = dashboard_figure([a, b])
    assert [t.get_text().split(" ")[0] for t in fig.legends[0].get_texts()] == ["asy1/a", "asy2/a"]


def test_missing_metrics_leave_a_panel_saying_no_data(tmp_path):
    recs = [{"step": s, "time_s": float(s), "train/reward_mean": 0.1 * s} for s in range(1, 6)]
    run = make_run(tmp_path / "sparse", recs)
    fig = dashboard_figure([run])
    assert titles(fig) == CORE_TITLES
    for title in CORE_TITLES[2:]:
        assert texts(panel(fig, title)).startswith("no data"), title
    reward = panel(fig, "Reward and held-out accuracy by step")
    assert [line.get_label() for line in reward.get_lines()] == ["reward (train batch mean)"]
    assert write_dashboard([run], tmp_path / "sparse.png").stat().st_size > 20_000


def test_nulls_are_skipped_and_a_torn_last_line_is_ignored(tmp_path):
    recs = records(steps=4)
    recs[2]["train/reward_mean"] = None
    run = make_run(tmp_path / "r", recs)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "time_s": 9.')  # killed mid-write
    loaded = load_run(run)
    assert loaded.skipped == 1
    xs, ys = loaded.series("train/reward_mean")
    assert xs == [1.0, 3.0, 4.0] and all(math.isfinite(y) for y in ys)


@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_a_run_without_metrics_is_an_error_naming_the_path(tmp_path, content):
    run = tmp_path / "norun"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(DashboardError, match=str(run / "metrics.jsonl")):
        write_dashboard([run], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_a_bad_line_in_the_middle_is_an_error_naming_it(tmp_path):
    run = make_run(tmp_path / "r", records(steps=3))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = "not json"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DashboardError, match="line 2"):
        load_run(run)


def test_the_end_of_a_run_reports_a_plot_failure_without_raising(tmp_path):
    said: list[str] = []
    assert write_run_dashboard(tmp_path / "gone", said.append) is None
    assert said and said[0].startswith("dashboard not written:") and "gone" in said[0]
    run = make_run(tmp_path / "ok", records())
    assert write_run_dashboard(run, said.append) == run / "dashboard.png"
    assert said[-1] == f"dashboard: {run / 'dashboard.png'}"


def grove(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def test_grove_plot_command_defaults_and_errors(tmp_path):
    a = make_run(tmp_path / "a", records())
    b = make_run(tmp_path / "b", records(shift=0.05))
    one = grove("plot", str(a))
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip() == f"grove: dashboard={(a / 'dashboard.png').resolve()}"
    assert png_size(a / "dashboard.png")[0] > 0
    both = grove("plot", str(a), str(b), cwd=tmp_path)  # several runs: ./dashboard.png
    assert both.returncode == 0, both.stderr
    assert (tmp_path / "dashboard.png").is_file()
    named = grove("plot", str(a), "--out", str(tmp_path / "out" / "d.png"))
    assert named.returncode == 0 and (tmp_path / "out" / "d.png").is_file()
    missing = grove("plot", str(a), str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.splitlines()[-1].startswith("grove: error:") and str(tmp_path / "nope") in missing.stderr
    usage = grove("plot")
    assert usage.returncode == 2 and usage.stderr.splitlines()[-1].startswith("grove: error:")
