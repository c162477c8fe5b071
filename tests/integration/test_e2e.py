"""The whole loop through the real CLI: Ray actors, vLLM, DeepSpeed, W&B offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
LAST_LINE = re.compile(r"^grove: accuracy_before=(\d\.\d+) accuracy_after=(\d\.\d+) run_dir=(\S+)$")


def grove(args, tmp_path, timeout=900):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    cmd = [sys.executable, "-m", "trainer.cli", "train", f"output_root={tmp_path}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_short_run_completes_and_records_several_policy_versions(tmp_path, model_path):
    out = grove(["trainer.total_steps=6", "eval.every_steps=3", "eval.max_rows=100", "run_name=e2e"], tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    last = out.stdout.strip().splitlines()[-1]
    match = LAST_LINE.match(last)
    assert match, last
    run_dir = Path(match.group(3))
    assert run_dir == tmp_path / "e2e"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    versions = {v for r in steps for v in (r["batch/version_min"], r["batch/version_max"])}
    assert len(versions) > 1
    assert all(r["batch/age_max"] <= 1 for r in steps)  # default max_staleness
    for key in ("train/reward_mean", "train/tokens_per_s", "rollout/tokens_per_s", "weight_sync/total_s"):
        assert all(r[key] is not None for r in steps), key
    evals = [r for r in records if "eval/accuracy" in r]
    assert len(evals) >= 3  # before, mid-run, after
    assert float(match.group(1)) == pytest.approx(evals[0]["eval/accuracy"], abs=1e-4)
    assert "ledger: {" in out.stderr and "'lost': 0" in out.stderr
    assert (run_dir / "config.yaml").read_text().startswith("model:")
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B should run offline without an API key"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run_dir / "final_model").config.model_type == "qwen2"
