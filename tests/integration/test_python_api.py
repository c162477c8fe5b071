"""docs/python-api.md's complete script, run as written: it exits 0 and prints what the page
says it prints. The script and its output are read from the page, so the two cannot drift."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

DOC = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"
NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def block_after(marker: str, lang: str) -> str:
    """The fenced block of `lang` that follows `<!-- marker -->` in the page."""
    match = re.search(rf"<!-- {marker} -->\s*```{lang}\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"docs/python-api.md has no ```{lang} block after <!-- {marker} -->"
    return match.group(1)


def line_pattern(line: str) -> re.Pattern:
    """A documented output line as a regex: its words exactly, any number where it has one."""
    parts = re.split(rf"({NUMBER})", line.strip())
    return re.compile("".join(NUMBER if i % 2 else re.escape(p) for i, p in enumerate(parts)) + "$")


def test_the_documented_script_is_short_enough():
    assert len(block_after("python-api-script", "python").strip().splitlines()) <= 30


def test_the_documented_script_runs_and_prints_what_the_page_says(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(block_after("python-api-script", "python"))
    expected = [line_pattern(line) for line in block_after("python-api-output", "text").strip().splitlines()]
    skip = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in skip}
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    # Ray forwards its actors' output to stdout too: the documented lines must appear in order
    printed = [line.strip() for line in out.stdout.splitlines()]
    position = 0
    for pattern in expected:
        while position < len(printed) and not pattern.match(printed[position]):
            position += 1
        assert position < len(printed), f"no line matching {pattern.pattern!r} in order in:\n{out.stdout[-3000:]}"
        position += 1
    run_dir = tmp_path / "api-demo"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]
    assert (run_dir / "config.yaml").read_text().startswith("model:")
    assert (run_dir / "final_model" / "config.json").is_file()
    assert "'lost': 0" in out.stderr
