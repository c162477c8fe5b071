"""`grove eval MODEL_DIR`: score an HF model folder on the configured task's held-out split.

    grove eval runs/20261124-013000/final_model
    grove eval /models/my-sft task=files task.train_files=t.jsonl task.eval_files=e.jsonl \
        eval.max_rows=1000 --out samples.jsonl

The same held-out accuracy a run logs (`eval/accuracy`, and per difficulty when the rows
have one), from the same pieces: a `RolloutWorker` over a `VLLMEngine` started in this
process with the config's `rollout.engine` settings (the platform profile sets them), its
greedy requests of `rollout.eval_max_tokens` tokens, and its `RewardRunner` with the
configured rewards. A sample is correct when its reward is at least 1. Besides the
numbers, one JSON line per sample (prompt, response, reward, reward info, failure) goes
to `--out` (default `MODEL_DIR/eval_samples.jsonl`).

The records come from `RolloutWorker.evaluate_samples`, the method a run's held-out
evaluation uses too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# as the launcher's rollout actor runs; vLLM's log goes to stderr, stdout holds only the report
QUIET_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
             "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
             "VLLM_LOGGING_STREAM": "ext://sys.stderr"}


@dataclass
class EvalResult:
    metrics: dict[str, float]  # named as RolloutWorker.evaluate names them: eval/accuracy, eval/accuracy_difficulty_<d>
    samples: list[dict[str, Any]]  # one record per row, in row order


def check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(model_dir)!r}: no such directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} has no config.json (an HF model folder is "
                                "expected, e.g. a run's final_model/)")
    return path


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (as in metrics.jsonl)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


async def evaluate_samples(worker, rows: list[dict], prompt_key: str = "prompt") -> EvalResult:
    """The worker's held-out evaluation, sample by sample (`RolloutWorker.evaluate_samples`)."""
    return EvalResult(*await worker.evaluate_samples(rows, prompt_key))


async def run_eval(model_dir: str, cfg, rows: list[dict], say) -> EvalResult:
    """Start a rollout worker on `model_dir` in this process, evaluate `rows`, stop it."""
    from rollout.worker import RolloutWorker

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    worker = RolloutWorker(model_dir, cfg.rollout, cfg.reward, reward_cwd=os.getcwd())
    try:
        setup = await worker.astart()
        say("engine ready: " + ", ".join(f"{k}={v:.1f}s" for k, v in setup.items()))
        start = time.perf_counter()
        result = await evaluate_samples(worker, rows, cfg.task.prompt_key)
        say(f"{len(rows)} rows generated and scored in {time.perf_counter() - start:.1f}s")
        return result
    finally:
        worker.engine.shutdown()
        rewards = getattr(worker, "rewards", None)
        if rewards is not None:
            rewards.close()


def write_samples(samples: list[dict], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for sample in samples:
            f.write(json.dumps(_plain(sample), default=str, allow_nan=False) + "\n")
    return out


def report(result: EvalResult, out: Path) -> list[str]:
    """What `grove eval` prints on stdout; the last line is machine-readable."""
    samples = result.samples
    right = sum(s["correct"] for s in samples)
    acc = result.metrics["eval/accuracy"]
    lines = [f"held-out accuracy: {acc:.4f} ({right}/{len(samples)})"]
    levels = {}
    for s in samples:
        if "difficulty" in s["fields"]:
            levels.setdefault(str(s["fields"]["difficulty"]), []).append(s["correct"])
    for level, oks in sorted(levels.items()):
        lines.append(f"  difficulty {level}: {result.metrics[f'eval/accuracy_difficulty_{level}']:.4f} "
                     f"({sum(oks)}/{len(oks)})")
    failures: dict[str, int] = {}
    for s in samples:
        if s["failure"]:
            failures[s["failure"]] = failures.get(s["failure"], 0) + 1
    lines.append(f"reward failures: {sum(failures.values())}/{len(samples)}"
                 + (" (" + ", ".join(f"{k}={v}" for k, v in sorted(failures.items())) + ")" if failures else ""))
    extra = "".join(f" accuracy_difficulty_{level}={result.metrics[f'eval/accuracy_difficulty_{level}']:.4f}"
                    for level in sorted(levels))
    lines.append(f"grove: accuracy={acc:.4f}{extra} rows={len(samples)} samples={out}")
    return lines


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # as every grove usage error: one line, exit 2
        from trainer.cli import usage_error

        usage_error("error", f"{self.prog}: {message}")


def main(argv: list[str]) -> None:
    from trainer.cli import load_config, usage_error

    parser = _Parser(prog="grove eval", description="Score an HF model folder on the configured task's held-out "
                     "split with the configured rewards (greedy decoding, rollout.eval_max_tokens).")
    parser.add_argument("model_dir", nargs="?", metavar="MODEL_DIR",
                        help="an HF model folder, e.g. a run's final_model/")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="hydra overrides, as for grove train (eval.max_rows=100 ...)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.jsonl",
                        help="where the per-sample JSON lines go (default: MODEL_DIR/eval_samples.jsonl)")
    args = parser.parse_intermixed_args(argv)  # overrides and --out in any order
    if args.model_dir is None:
        usage_error("error", "grove eval: MODEL_DIR is required (an HF model folder, e.g. runs/<run>/final_model)")
    say = lambda text: print(f"grove eval: {text}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        model_dir = check_model_dir(args.model_dir).resolve()
    except FileNotFoundError as err:
        usage_error("error", err)
    try:
        cfg = load_config(args.overrides)
    except Exception as err:  # an unknown key, a bad value: as `grove train` reports them
        usage_error("config error", err.__cause__ or err)
    from rewards.runner import RewardRunner
    from trainer.launcher import load_data

    try:
        data = load_data(cfg)
    except (ValueError, FileNotFoundError) as err:
        usage_error("error", f"task: {err}")
    rows = data.eval[: cfg.eval.max_rows]
    if not rows:
        usage_error("error", f"task: no held-out rows to evaluate (eval.max_rows={cfg.eval.max_rows}, "
                             f"{len(data.eval)} rows in the eval split)")
    try:  # the start-up check `grove train` makes, on the first held-out row
        with RewardRunner(cfg.reward, example_row=rows[0], cwd=os.getcwd()) as rewards:
            rewards.probe(rows[0], prompt_key=cfg.task.prompt_key)
    except Exception as err:  # import errors, bad specs, wrong signatures, a reward that raises
        usage_error("error", f"reward: {err}")
    out = (args.out or model_dir / "eval_samples.jsonl").resolve()
    say(f"model {model_dir}, {len(rows)} held-out rows, rewards {[f.fn for f in cfg.reward.functions]}")
    try:
        result = asyncio.run(run_eval(str(model_dir), cfg, rows, say))
    except Exception as err:  # noqa: BLE001 - an engine or reward fault: named, exit 1
        print(f"grove: eval failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    write_samples(result.samples, out)
    for line in report(result, out):
        print(line, flush=True)
