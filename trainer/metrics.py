"""Where a run's numbers go: metrics.jsonl always, W&B when enabled, the console (trainer/console.py).

W&B runs offline when no API key is set: with a key but no network, `wandb.init`
blocks for about 100 s before failing, so the mode is always chosen explicitly.

In W&B every metric's section is the prefix before its first `/` (train, loss, adv, batch,
response, staleness, rollout, trainer, weight_sync, buffer, ledger, reward, sampling, tree,
env, eval, run; samples for the sample table). Rows are logged without W&B's own step:
each carries `train/step` (the policy version, the x-axis of every chart, by
`define_metric`) and `time_s` (seconds since the logger started, the other x-axis to pick),
so a row that arrives late for its version (an evaluation, a sample table) is still drawn
where it belongs instead of being dropped as out of order.

Every `logger.samples_every` versions a few trained responses go to run_dir/samples.jsonl
and, with W&B, to the `samples/responses` table (all rows so far, the latest `TABLE_ROWS`).
At the end `finish_run` writes the run's summary (held-out accuracy before and after, the
ledger, the code's git commit) to W&B's run summary and run_dir/summary.json, and shows it
as a table on the console.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.console import RunConsole, duration

ROOT = Path(__file__).resolve().parent.parent
STEP_KEY = "train/step"  # the x-axis of every W&B chart: the policy version
TIME_KEY = "time_s"  # the other one: wall time since the logger started
SAMPLE_COLUMNS = ["step", "prompt", "response", "reward", "group_reward_mean", "token_age_max", "token_age_mean",
                  "group_size", "response_tokens"]
TABLE_ROWS = 512  # the sample table keeps the latest this many rows
# the orchestrator's per-step progress text (trainer/run_report.py:step_line); the console
# draws its own status from the step's metrics instead
STEP_LINE = re.compile(r"^step (\d+)/(\d+)  reward=")


def choose_wandb_mode(requested: str | None) -> str:
    if requested:
        return requested
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def code_commit(repo: Path = ROOT) -> str:
    """`git rev-parse HEAD` of Grove's own checkout, or "unknown" (not a checkout, no git)."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        top, sha = out.stdout.split()
        if out.returncode == 0 and Path(top).resolve() == repo.resolve() and re.fullmatch(r"[0-9a-f]{40}", sha):
            return sha
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return "unknown"


def tokenizer_decoder(model_path: str) -> Callable[[list[int]], str]:
    """Token ids -> text with the model's tokenizer (ids as text if it cannot be loaded)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - the sample table must never stop a run
        return lambda ids: " ".join(map(str, ids))
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


class Say:
    """`logger.progress` as the plain `say(text)` callable the launcher hands around, also
    carrying `warmup_progress(step, total, accuracy)` for the default model's warm-up bar."""

    def __init__(self, logger: "MetricsLogger") -> None:
        self.logger = logger

    def __call__(self, text: str) -> None:
        self.logger.progress(text)

    def warmup_progress(self, step: int, total: int, accuracy: float | None = None) -> None:
        self.logger.console.warmup_progress(step, total, accuracy)


def _finite(v: Any) -> Any:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


class MetricsLogger:
    """`console`: True (stderr), False (nothing), or a `RunConsole` to draw on. `decode`: token
    ids -> text for the sample table (set it once the model is known: `tokenizer_decoder`)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], use_wandb: bool, wandb_mode: str | None,
                 project: str, console: bool | RunConsole = True, console_every: int = 10,
                 total_steps: int | None = None, decode: Callable[[list[int]], str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self._file = open(self.path, "a", buffering=1)
        total_steps = total_steps or (config.get("trainer") or {}).get("total_steps")
        if isinstance(console, RunConsole):
            self.console = console
            self.console.status.total = self.console.status.total or total_steps
        elif console:
            self.console = RunConsole(every=console_every, total_steps=total_steps)
        else:
            self.console = RunConsole.disabled()
        self.decode = decode
        self._start = time.perf_counter()
        self._last_step = -1  # the last training step logged (its progress text is the console's to draw)
        self._sample_rows: list[list] = []
        self.trained_samples = 0.0
        self.loop_s: float | None = None
        self.final: dict[str, Any] | None = None
        self.wandb_run = None
        self.wandb_dir: Path | None = None
        self.wandb_url: str | None = None
        if use_wandb:
            import wandb

            mode = choose_wandb_mode(wandb_mode)
            self.wandb_run = wandb.init(
                project=project, dir=str(self.run_dir), config=config, mode=mode,
                name=self.run_dir.name, reinit="finish_previous",
            )
            self.wandb_dir = Path(self.wandb_run.dir).parent
            self.wandb_url = self.wandb_run.url if mode == "online" else None
            # every chart over the policy version; wall time is there to pick instead
            self.wandb_run.define_metric(STEP_KEY)
            self.wandb_run.define_metric(TIME_KEY)
            self.wandb_run.define_metric("*", step_metric=STEP_KEY)

    def use_tokenizer(self, model_path: str) -> None:
        """Decode the sample table's responses with this model's tokenizer."""
        self.decode = tokenizer_decoder(model_path)

    @property
    def say(self) -> Say:
        return Say(self)

    def elapsed(self) -> float:
        return round(time.perf_counter() - self._start, 3)

    def log(self, step: int, metrics: dict[str, float], histograms: dict[str, list[float]] | None = None) -> None:
        t = self.elapsed()
        record = {"step": step, TIME_KEY: t}
        record.update({k: _finite(v) for k, v in metrics.items()})
        if histograms:
            record.update({k: list(v) for k, v in histograms.items()})
        self._file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            payload: dict[str, Any] = dict(metrics)
            if histograms:
                import wandb

                payload.update({k: wandb.Histogram(v) for k, v in histograms.items() if v})
            payload.update({STEP_KEY: step, TIME_KEY: t})
            self.wandb_run.log(payload)
        if "eval/accuracy" in metrics and _finite(metrics["eval/accuracy"]) is not None:
            self.console.evaluated(float(metrics["eval/accuracy"]))
        if "run/loop_s" in metrics:
            self.loop_s = _finite(metrics["run/loop_s"])
        if "train/loss" in metrics:  # a training step
            self.trained_samples += _finite(metrics.get("train/num_trajectories")) or 0.0
            self._last_step = step
            self.console.step(step, metrics)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """A few trained responses (trainer/run_report.py:sample_row): run_dir/samples.jsonl
        always, the `samples/responses` table with W&B."""
        rows = []
        for s in samples:
            ids = list(s.get("response_ids") or [])
            try:
                response = self.decode(ids) if self.decode is not None else " ".join(map(str, ids))
            except Exception:  # noqa: BLE001 - a sample that cannot be decoded is shown as its ids
                response = " ".join(map(str, ids))
            rows.append({"step": step, "prompt": s.get("prompt"), "response": response,
                         "reward": _finite(s.get("reward")), "group_reward_mean": _finite(s.get("group_reward_mean")),
                         "token_age_max": s.get("token_age_max"), "token_age_mean": _finite(s.get("token_age_mean")),
                         "group_size": s.get("samples"), "response_tokens": len(ids)})
        with open(self.samples_path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        self._sample_rows.extend([row[c] for c in SAMPLE_COLUMNS] for row in rows)
        del self._sample_rows[:-TABLE_ROWS]
        if self.wandb_run is not None and rows:
            import wandb

            table = wandb.Table(columns=SAMPLE_COLUMNS, data=[list(r) for r in self._sample_rows])
            self.wandb_run.log({"samples/responses": table, STEP_KEY: step, TIME_KEY: self.elapsed()})

    def progress(self, text: str) -> None:
        match = STEP_LINE.match(text)
        if match and int(match.group(1)) == self._last_step:
            if not self.console.status.total:  # (a logger made without the run's length learns it here)
                self.console.status.total = int(match.group(2))
            return  # the console drew this step from its metrics (`log`)
        self.console.message(text)

    def activity(self, description: str, total: float | None = None):
        """A spinner or a bar on the console while the `with` block runs."""
        return self.console.activity(description, total)

    def start_training(self, total_steps: int | None = None) -> None:
        self.console.start_training(total_steps)

    def finish_run(self, *, accuracy_before: float, accuracy_after: float, steps: int, ledger: dict[str, int],
                   seconds: float, **_: Any) -> dict[str, Any]:
        """The run's summary: W&B's run summary (then W&B is closed), run_dir/summary.json,
        and the console's closing table. Returns the summary."""
        loop_s = self.loop_s or seconds
        final = {
            "eval/accuracy_before": accuracy_before, "eval/accuracy_after": accuracy_after,
            "run/steps": steps, "run/wall_s": round(seconds, 3), "run/loop_s": round(loop_s, 3),
            "run/trained_samples": self.trained_samples,
            "run/trained_samples_per_s": self.trained_samples / max(loop_s, 1e-9),
            "run/git_commit": code_commit(),
            **{f"ledger/{k}": v for k, v in ledger.items()},
        }
        self.final = final
        (self.run_dir / "summary.json").write_text(json.dumps(final, indent=2) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.summary.update(final)
            self._finish_wandb()
        self.console.summary(self.summary_rows(final))
        return final

    def summary_rows(self, final: dict[str, Any]) -> list[tuple[str, str]]:
        before, after = final["eval/accuracy_before"], final["eval/accuracy_after"]
        ledger = {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("ledger/")}
        counts = "  ".join(f"{k} {int(ledger[k])}" for k in ("started", "consumed", "dropped", "filtered",
                                                              "requeued", "lost") if k in ledger)
        rows = [("held-out accuracy", f"{before:.3f} -> {after:.3f} ({after - before:+.3f})"),
                ("steps", str(final["run/steps"])),
                ("wall time", f"{duration(final['run/wall_s'])} (training loop {duration(final['run/loop_s'])})"),
                ("trained samples/s", f"{final['run/trained_samples_per_s']:.1f} "
                                      f"({int(final['run/trained_samples'])} samples)"),
                ("ledger (groups)", counts),
                ("run dir", str(self.run_dir))]
        if (self.run_dir / "dashboard.png").exists():
            rows.append(("dashboard", str(self.run_dir / "dashboard.png")))
        if self.samples_path.exists():
            rows.append(("samples", str(self.samples_path)))
        if self.wandb_url:
            rows.append(("W&B", self.wandb_url))
        elif self.wandb_dir is not None:
            rows.append(("W&B (offline)", f"wandb sync {self.wandb_dir}"))
        rows.append(("code", final["run/git_commit"]))
        return rows

    def _finish_wandb(self) -> None:
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            run.finish()

    def close(self) -> None:
        self.console.close()
        if not self._file.closed:
            self._file.close()
        self._finish_wandb()


# -- reading an offline W&B run back -----------------------------------------------------------


@dataclass
class OfflineRun:
    """What a run's `.wandb` file holds: the history rows, the final summary, the metric
    definitions (`define_metric`), and its `files/` folder (tables under media/table/)."""

    history: list[dict] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    files: Path | None = None


def _put(target: dict, item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


def wandb_records(path: Path) -> list:
    """The records of a `.wandb` file (a LevelDB-style log: 32 KiB blocks of checksummed
    chunks, after a 7-byte W&B header), as `wandb_internal_pb2.Record`s."""
    from wandb.proto import wandb_internal_pb2

    data, block = Path(path).read_bytes(), 32768
    records, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        part, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        chunk = part if kind in (1, 2) else chunk + part  # full/first start a record; middle/last extend it
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
    return records


def read_offline_run(run_dir: Path) -> OfflineRun:
    """The newest W&B run under `run_dir/wandb`, read back from its `.wandb` file."""
    found = sorted(Path(run_dir, "wandb").glob("*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not found:
        return OfflineRun()
    out = OfflineRun(files=found[-1].parent / "files")
    for record in wandb_records(found[-1]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            out.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _put(out.summary, item)
        elif kind == "metric":
            m = record.metric
            out.metrics.append({"name": m.name, "glob_name": m.glob_name, "step_metric": m.step_metric})
    return out
