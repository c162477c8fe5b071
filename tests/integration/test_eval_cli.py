"""`grove eval MODEL_DIR` on the real engine: the held-out accuracy a run logs, per sample."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
LAST_LINE = re.compile(r"^grove: accuracy=(\d\.\d{4})((?: accuracy_difficulty_\S+=\d\.\d{4})*) rows=(\d+) "
                       r"samples=(\S+)$")
FIELDS = {"index", "prompt", "response", "reward", "correct", "reward_info", "failure", "failure_detail",
          "finish_reason", "response_tokens", "fields"}
# Both sides unpinned, as the shared test engine runs (cpu_local would pin this test process to core 0).
OVERRIDES = ["eval.max_rows=30", "rollout.engine.cpu_cores=null"]


def grove_eval(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return subprocess.run([sys.executable, "-m", "trainer.cli", "eval", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_grove_eval_scores_a_model_folder_as_the_rollout_worker_evaluates(tmp_path, model_path, loop_thread,
                                                                          monkeypatch):
    from rollout.worker import RolloutWorker
    from trainer.cli import load_config
    from trainer.evaluate import evaluate_samples
    from trainer.launcher import load_data

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # both engines' core processes: as grove eval (and a run) has it
    out_file = tmp_path / "samples.jsonl"
    proc = grove_eval(model_path, *OVERRIDES, "--out", str(out_file))
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    accuracy, rows_n, samples_path = float(match.group(1)), int(match.group(3)), Path(match.group(4))
    assert rows_n == 30 and samples_path == out_file.resolve()
    assert lines[0].startswith(f"held-out accuracy: {accuracy:.4f} (")
    by_level = dict(re.findall(r"accuracy_difficulty_(\S+)=(\d\.\d{4})", match.group(2)))
    assert by_level, "the arithmetic rows have a difficulty"
    assert all(any(line.strip().startswith(f"difficulty {level}:") for line in lines) for level in by_level)

    samples = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(samples) == 30
    assert all(set(s) == FIELDS for s in samples)
    cfg = load_config(OVERRIDES)
    rows = load_data(cfg).eval[:30]
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in rows]
    assert [s["fields"]["answer"] for s in samples] == [r["answer"] for r in rows]
    assert all(s["correct"] == (s["reward"] is not None and s["reward"] >= 1.0) for s in samples)
    assert all(s["failure"] is None and 0 < s["response_tokens"] <= cfg.rollout.eval_max_tokens for s in samples)
    assert sum(s["correct"] for s in samples) / 30 == pytest.approx(accuracy, abs=1e-4)

    # The reference: RolloutWorker.evaluate on the same rows, model and settings, in this process.
    worker = RolloutWorker(model_path, cfg.rollout, cfg.reward, reward_cwd=str(ROOT))
    try:
        loop_thread.run(worker.astart())
        expected = loop_thread.run(worker.evaluate(rows, cfg.task.prompt_key))
        again = loop_thread.run(evaluate_samples(worker, rows, cfg.task.prompt_key))
    finally:
        loop_thread.run(worker.ashutdown())
    assert again.metrics == expected  # evaluate_samples is evaluate, sample by sample
    assert round(expected["eval/accuracy"], 4) == accuracy  # same greedy decoding: +-0
    for level, value in by_level.items():
        assert round(expected[f"eval/accuracy_difficulty_{level}"], 4) == float(value)
    assert [s["response"] for s in again.samples] == [s["response"] for s in samples]


def test_grove_eval_refuses_what_is_not_a_model_folder(tmp_path):
    missing = grove_eval(str(tmp_path / "nope"), timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.splitlines()[-1].startswith("grove: error:") and str(tmp_path / "nope") in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = grove_eval(str(tmp_path / "empty"), timeout=120)
    assert empty.returncode == 2 and "config.json" in empty.stderr and str(tmp_path / "empty") in empty.stderr
    assert not (tmp_path / "empty" / "eval_samples.jsonl").exists()


def test_grove_eval_reports_a_bad_override_as_a_config_error(model_path):
    bad = grove_eval(model_path, "eval.no_such_key=1", timeout=120)
    assert bad.returncode == 2
    assert "grove: config error:" in bad.stderr and "no_such_key" in bad.stderr
