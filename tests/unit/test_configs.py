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
    ("rollout.top_p=0.9", "truncated, renormalised distribution"),
    ("rollout.on_update=mask", "was renamed: set rollout.on_update=interrupt_newest"),
    ("buffer.stragglers=mask", "was renamed: set buffer.stragglers=proceed"),
    ("trainer.max_nonfinite_steps=0", "max_nonfinite_steps"),
    ("trainer.dist_backend=mpi", "dist_backend"),
    ("rollout.workflow=nosuch", None),  # checked at start-up (it may name a file): see below
])
def test_bad_values_name_the_field(override, message):
    if message is None:
        assert isinstance(load([override]), GroveConfig)
        return
    with pytest.raises(Exception, match=message):
        load(override if isinstance(override, list) else [override])


def test_the_platform_profiles_hold_every_platform_choice():
    """No CPU-only choice is a code default: the dataclasses are platform-neutral and the
    cluster profile sets pinning, dtype, eager mode, GPUs and the process-group backend."""
    from rollout.engine import EngineConfig
    from trainer.policy_trainer import TrainerConfig

    engine, trainer = EngineConfig(), TrainerConfig()
    assert engine.cpu_cores is None and engine.dtype == "auto" and not engine.enforce_eager
    assert trainer.cpu_cores is None and trainer.dist_backend == "auto"
    cpu, gpu = load(), load(["cluster=gpu_local"])
    assert (cpu.cluster.name, cpu.rollout.engine.cpu_cores, cpu.trainer.cpu_cores) == ("cpu_local", "0", "1")
    assert (cpu.rollout.engine.dtype, cpu.rollout.engine.enforce_eager, cpu.trainer.dist_backend) == (
        "float32", True, "gloo")
    assert cpu.cluster.rollout_gpus == cpu.cluster.trainer_gpus == 0
    assert (gpu.rollout.engine.cpu_cores, gpu.trainer.cpu_cores) == (None, None)
    assert (gpu.rollout.engine.dtype, gpu.rollout.engine.enforce_eager, gpu.trainer.bf16) == ("bfloat16", False, True)
    assert gpu.trainer.dist_backend == "nccl" and gpu.cluster.rollout_gpus == gpu.cluster.trainer_gpus == 1


def test_plugins_named_by_path_are_checked_before_any_engine(tmp_path):
    """A workflow, sampler or transport that cannot be loaded stops `grove prepare` (and
    `grove train`) with exit code 2, naming the key."""
    for override, key in (("rollout.workflow=nosuch", "rollout.workflow"), ("sampling.name=nosuch", "sampling.name"),
                          ("weight_sync.transport=no.such:Transport", "weight_sync.transport")):
        out = run_cli("prepare", override)
        assert out.returncode == 2 and key in out.stderr, (override, out.stderr[-2000:])


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


def test_tree_rollouts_with_novelty_sharpening_are_refused_before_any_engine_starts():
    with pytest.raises(Exception, match="novelty_sharpening.*rollout.workflow=tree"):
        load(["rollout.workflow=tree", "algorithm.novelty_sharpening=true"])
    assert load(["rollout.workflow=tree"]).rollout.workflow == "tree"
