"""Where a run's numbers go: metrics.jsonl always, W&B when enabled, a live console line.

W&B runs offline when no API key is set: with a key but no network, `wandb.init`
blocks for about 100 s before failing, so the mode is always chosen explicitly.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console


def choose_wandb_mode(requested: str | None) -> str:
    if requested:
        return requested
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricsLogger:
    def __init__(self, run_dir: Path, config: dict[str, Any], use_wandb: bool, wandb_mode: str | None,
                 project: str, console: bool = True) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)
        self.console = Console(stderr=True) if console else None
        self._start = time.perf_counter()
        self.wandb_run = None
        if use_wandb:
            import wandb

            mode = choose_wandb_mode(wandb_mode)
            self.wandb_run = wandb.init(
                project=project, dir=str(run_dir), config=config, mode=mode,
                name=run_dir.name, reinit="finish_previous",
            )

    def log(self, step: int, metrics: dict[str, float], histograms: dict[str, list[float]] | None = None) -> None:
        record = {"step": step, "time_s": round(time.perf_counter() - self._start, 3)}
        record.update({k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None)
                       for k, v in metrics.items()})
        if histograms:
            record.update({k: list(v) for k, v in histograms.items()})
        self._file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            payload: dict[str, Any] = dict(metrics)
            if histograms:
                import wandb

                payload.update({k: wandb.Histogram(v) for k, v in histograms.items() if v})
            self.wandb_run.log(payload, step=step)

    def progress(self, text: str) -> None:
        if self.console is not None:
            # soft_wrap: one line per message, however narrow the terminal or log (no hard wraps)
            self.console.print(f"[dim]{time.perf_counter() - self._start:7.1f}s[/dim] {text}", highlight=False,
                               soft_wrap=True)

    def close(self) -> None:
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
