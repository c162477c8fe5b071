"""The run's logger and console: W&B sections, x-axes, sample tables and summary (one offline
run, read back from its `.wandb` file), samples.jsonl, the plain-line cadence without a
terminal, and the live status on one."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

from tests.unit.fakes import FakeRollout, FakeTrainer, run_virtual
from trainer.console import RunConsole, StepStatus, duration, status_line
from trainer.metrics import (SAMPLE_COLUMNS, STEP_KEY, TIME_KEY, MetricsLogger, Say, code_commit,
                             read_offline_run)
from trainer.run_report import step_line

# the W&B workspace's sections: the prefix before a metric's first "/"
SECTIONS = {"train", "loss", "adv", "batch", "response", "staleness", "rollout", "trainer", "weight_sync",
            "buffer", "ledger", "reward", "sampling", "tree", "env", "eval", "run", "samples"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
METRICS = {"train/loss": 0.0031, "train/reward_mean": 0.412, "train/num_trajectories": 8,
           "rollout/tokens_per_s": 2310.4, "staleness/token_age_mean": 0.42, "staleness/group_age_max": 1.0,
           "rollout/idle_ratio": 0.14, "trainer/idle_ratio": 0.38, "reward/failure_rate": 0.05,
           "weight_sync/total_s": 0.012, "batch/version_min": 9.0, "batch/version_max": 10.0, "ledger/started": 12.0}
SAMPLE = {"prompt": "1+2=", "response_ids": [3], "reward": 1.0, "group_reward_mean": 0.5, "token_age_max": 1,
          "token_age_mean": 0.5, "samples": 4}


def decode(ids):
    return "".join(str(i) for i in ids)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """One short offline W&B run (wandb's start-up costs seconds): 4 steps, two sample tables,
    evaluations before, during and after, the run's summary; then read back."""
    root = tmp_path_factory.mktemp("wandb")
    run_dir = root / "run"
    run_dir.mkdir()
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID"):
            mp.delenv(var, raising=False)
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(root / var.lower()))
        logger = MetricsLogger(run_dir, {"trainer": {"total_steps": 4}}, True, "offline", "grove-test",
                               console=RunConsole(Console(file=out, width=60), every=2), decode=decode)
        logger.log(0, {"eval/accuracy": 0.25})
        for step in range(1, 5):
            logger.log(step, {**METRICS, "train/loss": 0.01 * step}, histograms={"staleness/group_age_hist": [0, 1]})
            if step % 2 == 0:
                logger.log_samples(step, [{**SAMPLE, "response_ids": [step, step]}, SAMPLE])
            logger.progress(step_line(step, 4, {**METRICS, "train/loss": 0.01 * step}))
        logger.log(2, {"eval/accuracy": 0.3})  # late for its version: still drawn at version 2
        logger.log(4, {"eval/accuracy": 0.375})
        logger.log(4, {"run/loop_s": 8.0, "ledger/started": 16.0, "ledger/lost": 0.0})
        final = logger.finish_run(accuracy_before=0.25, accuracy_after=0.375, run_dir=run_dir, steps=4,
                                  ledger={"started": 16, "consumed": 12, "lost": 0}, seconds=20.0)
        logger.close()
    return {"run_dir": run_dir, "console": out.getvalue(), "final": final, "run": read_offline_run(run_dir)}


# -- W&B --------------------------------------------------------------------------------------

def test_every_chart_is_drawn_over_the_policy_version_with_wall_time_as_the_other_axis(offline):
    run = offline["run"]
    assert {"name": STEP_KEY, "glob_name": "", "step_metric": ""} in run.metrics
    assert {"name": TIME_KEY, "glob_name": "", "step_metric": ""} in run.metrics
    assert {"name": "", "glob_name": "*", "step_metric": STEP_KEY} in run.metrics
    assert run.history and all(STEP_KEY in row and TIME_KEY in row for row in run.history)
    steps = [row["train/step"] for row in run.history if "train/loss" in row]
    assert steps == [1, 2, 3, 4]
    times = [row[TIME_KEY] for row in run.history]
    assert times == sorted(times)
    late = [row for row in run.history if row.get("eval/accuracy") == 0.3]
    assert [row[STEP_KEY] for row in late] == [2]  # kept, at its own version, not dropped as out of order


def test_metric_names_fall_into_the_known_sections(offline):
    keys = {k for row in offline["run"].history for k in row if not k.startswith("_")} - {TIME_KEY}
    assert {k.split("/")[0] for k in keys} <= SECTIONS
    assert all("/" in k for k in keys)


def test_the_orchestrators_metrics_all_fall_into_the_known_sections(tmp_path):
    """The real loop (fake engines) through a real logger: every name it logs has a section,
    and the per-step progress text becomes the console's own line at its cadence."""
    from buffer.sampling import UniformSampler
    from trainer.clients import ObjectStoreTransport
    from trainer.orchestrator import LoopConfig, Orchestrator

    rows = [{"prompt_id": f"p{i}", "prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(100)]
    out = io.StringIO()
    logger = MetricsLogger(tmp_path, {"trainer": {"total_steps": 9}}, False, None, "grove",
                           console=RunConsole(Console(file=out, width=50), every=4), decode=decode)
    cfg = LoopConfig(total_steps=9, batch_groups=4, n_samples=2, max_staleness=1, eval_every=3, samples_every=3,
                     samples_per_step=2)
    orch = Orchestrator(cfg, UniformSampler(rows, 2, seed=0), [FakeRollout(name="rollout worker 0", seed=0)],
                        FakeTrainer(eta=1), ObjectStoreTransport(), logger, eval_rows=rows[:4])
    run_virtual(orch.run())
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in records for k in r} - {"step", TIME_KEY}
    assert {k.split("/")[0] for k in keys} <= SECTIONS, sorted(k for k in keys if k.split("/")[0] not in SECTIONS)
    lines = out.getvalue().splitlines()
    assert [int(re.search(r"step (\d+)/9", line).group(1)) for line in lines if " step " in line
            and "reward=" in line] == [1, 4, 8, 9]
    assert not any("rollout_tok/s=" in line for line in lines)  # the orchestrator's own step text is replaced
    assert any("held-out accuracy" in line for line in lines) and any("ledger: {" in line for line in lines)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [3, 3, 6, 6, 9, 9]


def test_sample_tables_hold_every_sampled_response_so_far(offline):
    run, files = offline["run"], offline["run"].files
    ref = run.summary["samples/responses"]
    assert ref["_type"] == "table-file" and ref["nrows"] == 4
    tables = sorted(files.glob("media/table/samples/responses_*.table.json"))
    assert len(tables) == 2
    latest = json.loads((files / ref["path"]).read_text())
    assert latest["columns"] == SAMPLE_COLUMNS
    rows = [dict(zip(latest["columns"], row)) for row in latest["data"]]
    assert [(r["step"], r["response"]) for r in rows] == [(2, "22"), (2, "3"), (4, "44"), (4, "3")]
    assert rows[0]["prompt"] == "1+2=" and rows[0]["reward"] == 1.0 and rows[0]["token_age_max"] == 1


def test_samples_jsonl_is_written_whatever_the_wandb_setting(offline, tmp_path):
    written = [json.loads(line) for line in (offline["run_dir"] / "samples.jsonl").read_text().splitlines()]
    assert [r["response"] for r in written] == ["22", "3", "44", "3"]
    logger = MetricsLogger(tmp_path, {}, False, None, "grove", console=False)  # no W&B, no console, no tokenizer
    logger.log_samples(7, [SAMPLE, {**SAMPLE, "reward": float("nan")}])
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["response"], r["reward"]) for r in rows] == [(7, "3", 1.0), (7, "3", None)]
    assert not (tmp_path / "wandb").exists()


def test_the_run_summary_has_the_accuracy_before_and_after_the_ledger_and_the_commit(offline):
    summary, final = offline["run"].summary, offline["final"]
    assert summary["eval/accuracy_before"] == 0.25 and summary["eval/accuracy_after"] == 0.375
    assert summary["eval/accuracy"] == 0.375
    assert summary["ledger/started"] == 16 and summary["ledger/consumed"] == 12 and summary["ledger/lost"] == 0
    assert summary["run/git_commit"] == final["run/git_commit"] == code_commit()
    assert summary["run/trained_samples"] == 32 and summary["run/trained_samples_per_s"] == pytest.approx(4.0)
    assert json.loads((offline["run_dir"] / "summary.json").read_text()) == final


def test_the_commit_is_the_checkouts_or_unknown(tmp_path):
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", code_commit())
    assert code_commit(tmp_path) == "unknown"  # not a checkout: never an error


# -- the console ------------------------------------------------------------------------------

def test_the_closing_table_says_where_everything_is(offline):
    text = offline["console"]
    table = text[text.index("grove run summary"):]
    for expected in ("held-out accuracy", "0.250 -> 0.375 (+0.125)", "steps", "wall time", "20s",
                     "trained samples/s", "4.0 (32 samples)", "started 16  consumed 12  lost 0",
                     str(offline["run_dir"]), "samples.jsonl", "wandb sync", offline["final"]["run/git_commit"]):
        assert expected in table, expected
    sync = next(line for line in table.splitlines() if "wandb sync" in line)
    assert "offline-run-" in sync  # the command and its folder on one line: nothing folds without a terminal


def test_without_a_terminal_a_plain_line_every_n_steps_that_never_wraps():
    out = io.StringIO()
    console = RunConsole(Console(file=out, width=40), every=3, total_steps=7)
    assert not console.live
    console.evaluated(0.2)
    for step in range(1, 8):
        console.step(step, METRICS)
    lines = out.getvalue().splitlines()
    assert [int(re.search(r"step (\d)/7", line).group(1)) for line in lines] == [1, 3, 6, 7]
    assert all(len(line) > 40 for line in lines)  # longer than the console, and still one line each
    assert "\x1b" not in out.getvalue()
    line = lines[-1]
    for part in ("(100%)", "reward=0.412", "heldout=0.200", "loss=+0.0031", "tok/s=2310", "age=0.42/1",
                 "idle=r14%/t38%", "reward_fail=5%", "sync=12ms", "versions=9..10", "eta="):
        assert part in line, part


def test_every_zero_keeps_the_first_and_last_lines():
    out = io.StringIO()
    console = RunConsole(Console(file=out, width=80), every=0, total_steps=5)
    for step in range(1, 6):
        console.step(step, METRICS)
    assert [line.split()[2] for line in out.getvalue().splitlines()] == ["1/5", "5/5"]


def test_the_status_line_estimates_the_time_left():
    status = StepStatus(step=10, total=40, metrics=METRICS, accuracy=0.5, started=100.0)
    assert status.eta(150.0) == pytest.approx(150.0)
    assert "eta=2m30s" in status_line(status, 150.0)
    assert status_line(StepStatus(), 0.0).startswith("step 0  reward=-")  # nothing known yet: no error
    assert [duration(s) for s in (None, 5, 754, 7500)] == ["?", "5s", "12m34s", "2h05m"]


def test_on_a_terminal_a_live_status_with_every_number():
    out = io.StringIO()
    clock = iter(range(0, 10_000, 5)).__next__
    console = RunConsole(Console(file=out, force_terminal=True, width=160), every=100, total_steps=10,
                         auto_refresh=False, clock=clock)
    assert console.live
    console.evaluated(0.21)
    console.start_training()
    console.evaluated(0.38)
    console.step(3, METRICS)
    text = ANSI.sub("", out.getvalue())
    for part in ("training", "3/10", "30%", "ETA", "policy v3 (data v9..10)", "reward 0.412",
                 "held-out 0.380 (before 0.210)", "loss +0.0031", "2310 tok/s", "rollout idle 14%",
                 "trainer idle 38%", "token age 0.42 (groups ≤1)", "reward failures 5%"):
        assert part in text, part
    console.close()
    assert out.getvalue().endswith("\x1b[?25h") or "\x1b[?25h" in out.getvalue()[-50:]  # the cursor is back


def test_on_a_terminal_the_live_view_ends_with_the_last_step_and_prints_its_line():
    out = io.StringIO()
    console = RunConsole(Console(file=out, force_terminal=True, width=200), every=100, total_steps=2,
                         auto_refresh=False)
    console.step(1, METRICS)
    console.step(2, METRICS)
    assert console._live is None and console.training is None
    plain = ANSI.sub("", out.getvalue())
    assert "step 2/2 (100%)" in plain and "step 1/2 (50%)" in plain


def test_activities_and_the_warm_up_show_bars_or_lines():
    out = io.StringIO()
    plain = RunConsole(Console(file=out, width=80))
    with plain.activity("starting the engines"):
        pass
    for step in range(1, 4):
        plain.warmup_progress(step, 100, 0.1)
    plain.warmup_progress(3, 3, 0.25)
    lines = [line.split("s ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == ["starting the engines ...", "starting the engines: done in 0s",
                     "warm-up of the default model ...", "warm-up of the default model: done in 0s, 3 steps, "
                     "accuracy 0.250"]
    with pytest.raises(RuntimeError):
        with plain.activity("saving final_model"):
            raise RuntimeError("disk full")
    assert "saving final_model: done" not in out.getvalue()

    out = io.StringIO()
    live = RunConsole(Console(file=out, force_terminal=True, width=120), auto_refresh=False)
    live.warmup_progress(5, 100, 0.1)
    assert "5/100" in ANSI.sub("", out.getvalue()) and "check accuracy 0.100" in ANSI.sub("", out.getvalue())
    live.warmup_progress(9, 9, 0.3)
    assert live._live is None and "✓ warm-up of the default model: done" in ANSI.sub("", out.getvalue())


def test_the_warm_up_reports_every_step_and_its_end(tmp_path):
    from trainer.tiny_model import TinyModelSpec, build_char_tokenizer, build_tiny_model
    from trainer.warmup import WarmupConfig, warm_up

    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(), tok)
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(12)]
    calls = []
    warm_up(model, tok, rows, WarmupConfig(target_accuracy=1.0, max_steps=3, batch_size=4, eval_every=2, eval_rows=4),
            log=lambda text: None, progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(1, 3), (2, 3), (3, 3), (3, 3)]


def test_the_say_callable_carries_the_warm_up_bar(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(tmp_path, {}, False, None, "grove", console=RunConsole(Console(file=out, width=80)))
    say = logger.say
    assert isinstance(say, Say)
    say("model: /m")
    say.warmup_progress(1, 1, None)
    logger.close()
    assert "model: /m" in out.getvalue() and "warm-up of the default model: done" in out.getvalue()


def test_with_the_console_off_nothing_is_shown_and_nothing_breaks(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, {}, False, None, "grove", console=False)
    logger.say("hello")
    logger.say.warmup_progress(2, 2, 0.5)
    with logger.activity("starting the engines") as act:
        act.update(1, 2, "x")
    logger.start_training(3)
    logger.log(1, METRICS)
    logger.progress(step_line(1, 3, METRICS))
    final = logger.finish_run(accuracy_before=0.1, accuracy_after=0.2, steps=1, ledger={"lost": 0}, seconds=1.0)
    logger.close()
    logger.close()  # idempotent
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert final["ledger/lost"] == 0 and (tmp_path / "summary.json").exists()


def test_the_orchestrators_step_text_is_replaced_other_messages_are_not(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(tmp_path, {}, False, None, "grove", console=RunConsole(Console(file=out, width=80), every=5),
                           total_steps=10)
    logger.log(3, METRICS)
    logger.progress(step_line(3, 10, METRICS))  # its own step's text: the console's line replaces it
    logger.progress(step_line(2, 10, METRICS))  # not the step just logged: shown as it is
    logger.progress("step 3: held-out accuracy 0.400")
    logger.close()
    text = out.getvalue()
    assert "rollout_tok/s" in text and text.count("step 3/10") == 0 and "step 2/10" in text
    assert "held-out accuracy 0.400" in text
