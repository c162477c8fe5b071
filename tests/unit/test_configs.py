"""Every shipped YAML composes against the typed schema; bad configs fail before any engine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trainer.cli import CONFIG_DIR, load_config
from trainer.config import GroveConfig, register_configs

register_configs()
GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
# options whose YAML deliberately leaves a required value (???) to the user
NEEDS_VALUES = {("model", "hf"): ["model.path=/tmp/m"],
                ("task", "files"): ["task.train_files=a.jsonl", "task.eval_files=b.jsonl"]}


def load(overrides=()):
    return load_config(list(overrides))


def test_default_config_is_typed():
    cfg = load()
    assert isinstance(cfg, GroveConfig)
    assert cfg.algorithm.name == "grpo" and cfg.trainer.zero_stage == 1
    assert cfg.rollout.engine.kv_cache_mb > 0


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))])
def test_every_shipped_option_composes(group, option):
    overrides = [f"{group}={option}", *NEEDS_VALUES.get((group, option), [])]
    if (group, option) == ("algorithm", "xrpo"):  # composes, then refuses: its sampler is not built yet
        with pytest.raises(Exception, match="refuses"):
            load(overrides)
        return
    assert isinstance(load(overrides), GroveConfig)


def test_unknown_key_is_refused():
    with pytest.raises(Exception, match="trainer.lr_typo|lr_typo"):
        load(["trainer.lr_typo=1"])


@pytest.mark.parametrize("override,message", [
    ("trainer.zero_stage=5", "zero_stage"),
    ("algorithm.loss_agg=sum", "loss_agg"),
    ("rollout.n_samples=0", "n_samples"),
    ("buffer.max_staleness=-1", "max_staleness"),
    ("buffer.stragglers=drop", "buffer.stragglers"),
    ("rollout.interrupt_by=restart", "interrupt_by"),
    ("trainer.bucket_overhead_tokens=-1", "bucket_overhead_tokens"),
    ("rollout.engine.executor=threads", "rollout.engine.executor"),
    ("rollout.engine.weight_loader=fast", "rollout.engine.weight_loader"),
    (["rollout.engine.executor=uniproc", "+rollout.engine.extra_args.tensor_parallel_size=2"], "executor=mp"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(Exception, match=message):
        load(override if isinstance(override, list) else [override])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_prints_the_config_tree():
    out = run_cli("train", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    for section in ("model:", "task:", "algorithm:", "rollout:", "trainer:", "reward:", "logger:"):
        assert section in out.stdout


def test_cli_config_errors_exit_nonzero_with_a_message():
    out = run_cli("train", "trainer.zero_stage=7")
    assert out.returncode == 2
    assert "grove: config error" in out.stderr and "zero_stage" in out.stderr
    out = run_cli("train", "nosuch.key=1")
    assert out.returncode != 0 and "nosuch" in out.stderr
    out = run_cli("fly")
    assert out.returncode == 2 and "unknown command" in out.stderr
    for args in (["trainer.zero_stage=7"], ["nosuch.key=1"]):  # `grove prepare` composes the same config
        out = run_cli("prepare", *args)
        assert out.returncode == 2 and "grove: config error" in out.stderr and args[0].split(".")[0] in out.stderr
    out = run_cli("prepare", "model.path=/nonexistent/model")
    assert out.returncode == 2 and "model.path" in out.stderr
