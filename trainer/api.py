"""Grove from Python, without the Hydra command line: build a config, run it, read its metrics.

    from trainer.api import default_config, read_metrics, run

    cfg = default_config("algorithm=dapo", "logger=none")   # composed as `grove train` composes it
    cfg.trainer.total_steps = 20                           # then plain dataclasses: set any field
    result = run(cfg, "runs/my-run")                       # checks it, then trains (as `grove train`)
    steps = read_metrics("runs/my-run", "train/loss")      # one dict per optimizer step

The config is the same typed `GroveConfig` the command line builds (trainer/config.py, every
key in docs/configuration.md). `default_config` takes the same overrides as `grove train`,
including group selections (`algorithm=dapo`, `cluster=gpu_local`, `task=gsm8k`), which only
composition can apply; after that, fields are set as on any dataclass. `validate` (which
`run` calls) checks the edited config the way composing it would have: the types of the
values, the range and combination checks of every `__post_init__`, and misspelt field names.

Errors are raised, not printed: `ConfigError` for a bad config (what `grove train` reports as
`grove: config error`, exit code 2), `trainer.launcher.StartupError` for bad input found before
any engine starts (`grove: error`), `trainer.orchestrator.RunError` for a fault during the run
(`grove: run failed`, exit code 1). docs/troubleshooting.md has every message.

`run` drives the asyncio loop itself (`asyncio.run`), as `grove train` does: call it from a
plain script or thread, not from inside a running event loop.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from trainer.config import GroveConfig
from trainer.launcher import RunSummary, StartupError
from trainer.orchestrator import RunError

__all__ = ["ConfigError", "GroveConfig", "RunError", "RunSummary", "StartupError", "default_config",
           "read_metrics", "run", "to_yaml", "validate"]


class ConfigError(ValueError):
    """A bad key, a value of the wrong type or out of range, or an impossible combination."""


def default_config(*overrides: str) -> GroveConfig:
    """The config `grove train <overrides>` would run: configs/ composed onto `GroveConfig`,
    platform profile and task files included. `overrides` are Hydra strings such as
    `"trainer.total_steps=4"` or `"algorithm=dapo"`."""
    from trainer.cli import load_config

    try:
        return load_config(list(overrides))
    except Exception as err:  # Hydra wraps the __post_init__ checks' ValueError
        raise ConfigError(str(err.__cause__ or err)) from err


def _unknown_attributes(obj: Any, prefix: str = "") -> list[str]:
    """Attributes set on a config dataclass that are not fields (a misspelt key)."""
    names = {f.name for f in dataclasses.fields(obj)}
    found = [prefix + name for name in vars(obj) if name not in names]
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        children = value if isinstance(value, list) else [value]
        for i, child in enumerate(children):
            if dataclasses.is_dataclass(child) and not isinstance(child, type):
                where = f"{prefix}{f.name}[{i}]." if isinstance(value, list) else f"{prefix}{f.name}."
                found += _unknown_attributes(child, where)
    return found


def validate(cfg: GroveConfig) -> GroveConfig:
    """`cfg` checked as composing it would: every value against its field's type, then every
    `__post_init__` check (nested configs first). Returns a fresh, checked copy; raises
    `ConfigError` naming the field."""
    from omegaconf import OmegaConf

    if not isinstance(cfg, GroveConfig):
        raise ConfigError(f"expected a GroveConfig, got {type(cfg).__name__}")
    unknown = _unknown_attributes(cfg)
    if unknown:
        raise ConfigError(f"not a config key: {', '.join(unknown)} (docs/configuration.md lists every key)")
    try:
        return OmegaConf.to_object(OmegaConf.structured(cfg))
    except Exception as err:  # OmegaConf's ValidationError, or a __post_init__ ValueError it wraps
        raise ConfigError(str(err.__cause__ or err)) from err


def to_yaml(cfg: GroveConfig) -> str:
    """The config as YAML, as a run writes it to `run_dir/config.yaml`."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def run(cfg: GroveConfig, run_dir: str | Path | None = None) -> RunSummary:
    """Check `cfg`, then train it as `grove train` does (trainer/launcher.py:train): the
    start-up check, the engines, held-out accuracy before and after, the run itself,
    `final_model/`, `metrics.jsonl` and `dashboard.png` in `run_dir` (default:
    `cfg.output_root/cfg.run_name`). Returns the `RunSummary` (accuracy_before,
    accuracy_after, run_dir, steps, ledger, seconds)."""
    from trainer.launcher import train

    cfg = validate(cfg)
    run_dir = Path(run_dir if run_dir is not None else Path(cfg.output_root) / cfg.run_name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return train(cfg, run_dir)


def read_metrics(run_dir: str | Path, key: str | None = None) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl`, in order: one per evaluation and per step,
    each with `step` (the policy version) and `time_s`. With `key`, only the records that
    have it (`"train/loss"`: one per optimizer step; `"eval/accuracy"`: the evaluations).
    A last line cut off by a killed run is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise
    return [r for r in records if key is None or key in r]
