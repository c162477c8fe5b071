"""Train with each prompt sampler on one rollout budget, several seeds each (issue 22).

    python scripts/compare_sampling.py [--strategies uniform dapo_filter vade xrpo dars] [--seeds 0 1 2]
                                       [--task arithmetic] [--budget 40000] [--target +0.05]
                                       [--eval-every 20] [--eval-rows 400] [--batch-groups 8]
                                       [--out results.json] [-- extra hydra overrides]

Every (strategy, seed) is one `grove train sampling=<strategy> seed=<seed>` subprocess,
one after another (they would fight over the cores otherwise), with `logger=none`,
`algorithm=grpo`, the same task data (`task.seed` is left alone) and held-out greedy
accuracy every `--eval-every` steps on `--eval-rows` rows.

**Budget: rollouts, not steps.** The samplers spend different numbers of responses per
step (dapo_filter generates groups it then drops, xrpo and dars give some prompts extra
samples), so every run gets the same number of rollouts. A run's rollouts after step s
are the responses trained on up to s (the sum of `train/num_trajectories`, DARS's merged
extensions included) plus those of the groups the sampler filtered out or a reward
failure dropped (`ledger/filtered` + `ledger/dropped`, `rollout.n_samples` each). The
script watches each run's metrics.jsonl; once a step passes `--budget` rollouts and the
evaluation in flight at that point is logged, it stops the run (SIGINT to the run's
process group; `grove train` cannot stop at a rollout count by itself). Only evaluations
at or under the budget count. `--max-steps` caps a run that would never reach the budget
(it is then reported as short of the budget).

**Reported per strategy**, as the mean ± std and [min-max] over the seeds:
- rollouts to the target: those at the first evaluation at or above `--target`. A target
  written with a sign (`+0.05`, the default) is relative to the shared starting accuracy
  (the median of every run's step-0 evaluation; they are the same model on the same rows,
  greedy, so they agree); without a sign it is absolute. A run that does not reach it
  within the budget is "not reached", counted in the `reached` column, never dropped;
  the mean is then over the seeds that reached it;
- seconds to the target, since the step-0 evaluation (engine start-up is not counted);
- the final accuracy: the last evaluation at or under the budget;
- the zero-variance share: the mean of `batch/zero_variance_group_frac` (groups in a
  trained batch whose rewards are all equal). dapo_filter's is 0 by construction, so the
  share of groups the sampler filtered out is shown beside it.

An evaluation is logged with the version the trainer had reached when it finished (often
one past the version it was started at), and its rollouts are read at that step, so they
are an upper bound. The last line is machine-readable:

    compare_sampling: uniform=<rollouts_to_target>/<zero_var_frac> dapo_filter=... ...

where rollouts_to_target is the mean over seeds, or nan unless every seed reached it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_algorithms import REPO, _fmt  # noqa: E402

STRATEGIES = ("uniform", "dapo_filter", "vade", "xrpo", "dars", "d3s")
STOP_GRACE_S = 60  # after SIGINT, how long the run may take to shut its engines down


# -- reading a run's metrics.jsonl (pure) --------------------------------------------------
@dataclass
class EvalPoint:
    step: int
    seconds: float  # since the step-0 evaluation
    accuracy: float
    rollouts: int  # rollouts used by this step


@dataclass
class RunMetrics:
    evals: list[EvalPoint]
    steps: int  # the last step logged
    rollouts: int  # rollouts used by the last step logged
    zero_var: list[tuple[int, float]]  # (rollouts by that step, batch/zero_variance_group_frac)
    filtered: list[tuple[int, float, float]]  # (rollouts, ledger/filtered, ledger/consumed), cumulative
    samples_per_group: list[tuple[int, float]]  # (rollouts, batch/samples_per_group_mean)
    sampling: dict[int, dict[str, float]]  # rollouts -> that step's sampling/* metrics


def parse_records(lines: Iterable[str]) -> list[dict]:
    """The JSON records of metrics.jsonl lines; a line cut short (a run stopped while
    writing it) or blank is skipped."""
    records = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def rollouts_by_step(records: list[dict], n_samples: int) -> dict[int, int]:
    """Rollouts used by each logged training step: trained responses so far, plus the
    samples a sampler trimmed from trained groups (D³S: generated, then not trained), plus
    `n_samples` for every group filtered out or dropped so far."""
    steps = sorted((r for r in records if r.get("train/num_trajectories") is not None), key=lambda r: r["step"])
    used, trained = {}, 0.0
    for r in steps:
        trained += r["train/num_trajectories"]
        retired = (r.get("ledger/filtered") or 0.0) + (r.get("ledger/dropped") or 0.0)
        used[r["step"]] = int(round(trained + (r.get("ledger/samples_trimmed") or 0.0) + n_samples * retired))
    return used


def rollouts_at(used: dict[int, int], step: int) -> int:
    """Rollouts by the last training step at or before `step` (0 before the first)."""
    before = [s for s in used if s <= step]
    return used[max(before)] if before else 0


def parse_run(records: list[dict], n_samples: int) -> RunMetrics:
    used = rollouts_by_step(records, n_samples)
    raw = sorted((r["step"], r["time_s"], r["eval/accuracy"]) for r in records if r.get("eval/accuracy") is not None)
    t0 = raw[0][1] if raw else 0.0
    evals = [EvalPoint(step, round(t - t0, 1), acc, rollouts_at(used, step)) for step, t, acc in raw]
    steps = [r for r in records if r.get("train/num_trajectories") is not None]
    steps.sort(key=lambda r: r["step"])
    last = steps[-1]["step"] if steps else 0
    return RunMetrics(
        evals=evals, steps=last, rollouts=used.get(last, 0),
        zero_var=[(used[r["step"]], r["batch/zero_variance_group_frac"]) for r in steps
                  if r.get("batch/zero_variance_group_frac") is not None],
        filtered=[(used[r["step"]], r.get("ledger/filtered") or 0.0, r.get("ledger/consumed") or 0.0) for r in steps],
        samples_per_group=[(used[r["step"]], r["batch/samples_per_group_mean"]) for r in steps
                           if r.get("batch/samples_per_group_mean") is not None],
        sampling={used[r["step"]]: {k: v for k, v in r.items() if k.startswith("sampling/")
                                    and isinstance(v, (int, float)) and not isinstance(v, bool)} for r in steps})


def budget_passed(records: list[dict], n_samples: int, budget: int) -> bool:
    """True once a training step has passed `budget` rollouts and an evaluation logged at
    or after that step shows that every evaluation started before it is in the file."""
    used = rollouts_by_step(records, n_samples)
    over = [s for s, r in used.items() if r >= budget]
    if not over:
        return False
    crossed = min(over)
    return any(r.get("eval/accuracy") is not None and r["step"] >= crossed for r in records)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


# -- one run --------------------------------------------------------------------------------
@dataclass
class Result:
    strategy: str
    seed: int
    task: str
    command: list[str]
    returncode: int
    status: str  # "budget" (stopped at the budget), "short" (ended before it), "failed"
    wall_s: float
    budget: int
    steps: int = 0  # the last step logged
    rollouts_used: int = 0  # by the last step logged (the run stops just past the budget)
    evals: list[tuple[int, float, float, int]] = field(default_factory=list)  # (step, s since step 0, acc, rollouts)
    start_accuracy: Optional[float] = None
    final_accuracy: Optional[float] = None  # last evaluation at or under the budget
    final_rollouts: Optional[int] = None
    target: Optional[float] = None
    rollouts_to_target: Optional[int] = None
    seconds_to_target: Optional[float] = None
    steps_to_target: Optional[int] = None
    zero_var_frac: Optional[float] = None  # mean batch/zero_variance_group_frac, steps under the budget
    filtered_frac: Optional[float] = None  # groups filtered out / (filtered + trained), by the budget
    samples_per_group: Optional[float] = None  # mean batch/samples_per_group_mean, under the budget
    sampling_last: dict = field(default_factory=dict)  # the sampling/* metrics of the last step under the budget

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def summarize_run(result: Result, metrics: RunMetrics) -> Result:
    """Fill in what is read from the metrics, up to the budget (the target is set later,
    once every run's starting accuracy is known: `apply_target`)."""
    budget = result.budget
    result.steps, result.rollouts_used = metrics.steps, metrics.rollouts
    result.evals = [(e.step, e.seconds, e.accuracy, e.rollouts) for e in metrics.evals]
    inside = [e for e in metrics.evals if e.rollouts <= budget]
    if metrics.evals and metrics.evals[0].step == 0:
        result.start_accuracy = metrics.evals[0].accuracy
    if inside:
        result.final_accuracy, result.final_rollouts = inside[-1].accuracy, inside[-1].rollouts
    zv = [f for r, f in metrics.zero_var if r <= budget]
    result.zero_var_frac = mean(zv) if zv else None
    fl = [(f, c) for r, f, c in metrics.filtered if r <= budget]
    if fl:
        f, c = fl[-1]
        result.filtered_frac = f / (f + c) if f + c else 0.0
    spg = [s for r, s in metrics.samples_per_group if r <= budget]
    result.samples_per_group = mean(spg) if spg else None
    under = [r for r in metrics.sampling if r <= budget]
    result.sampling_last = metrics.sampling[max(under)] if under else {}
    return result


def apply_target(result: Result, target: float) -> Result:
    """Rollouts, seconds and steps at the first evaluation at or above `target`, within the budget."""
    result.target = target
    result.rollouts_to_target = result.seconds_to_target = result.steps_to_target = None
    for step, seconds, acc, rollouts in result.evals:
        if rollouts > result.budget:
            break
        if acc >= target:
            result.rollouts_to_target, result.seconds_to_target, result.steps_to_target = rollouts, seconds, step
            break
    return result


def resolve_target(spec: str, starts: list[float]) -> tuple[float, float]:
    """(target accuracy, shared start): '+0.05' is relative to the median starting accuracy,
    '0.30' is absolute."""
    start = statistics.median(starts) if starts else math.nan
    spec = spec.strip()
    if spec.startswith("+"):
        return start + float(spec[1:]), start
    return float(spec), start


# -- summary over seeds (pure) --------------------------------------------------------------
@dataclass
class Spread:
    n: int
    mean: float
    std: float
    lo: float
    hi: float

    def text(self, spec: str) -> str:
        if self.n == 0:
            return "-"
        if self.n == 1:
            return format(self.mean, spec)
        m, sd, lo, hi = (format(x, spec) for x in (self.mean, self.std, self.lo, self.hi))
        return f"{m} ± {sd} [{lo}-{hi}]"


def spread(xs: list[Optional[float]]) -> Spread:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return Spread(0, math.nan, math.nan, math.nan, math.nan)
    return Spread(len(xs), mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, min(xs), max(xs))


@dataclass
class Summary:
    strategy: str
    runs: int
    failed: int
    reached: int
    rollouts_to_target: Spread
    seconds_to_target: Spread
    final_accuracy: Spread
    zero_var_frac: Spread
    filtered_frac: Spread
    rollouts_used: Spread

    @property
    def all_reached(self) -> bool:
        return self.runs > 0 and self.failed == 0 and self.reached == self.runs

    def last_value(self) -> str:
        r = f"{self.rollouts_to_target.mean:.0f}" if self.all_reached else "nan"
        z = "nan" if self.zero_var_frac.n == 0 else f"{self.zero_var_frac.mean:.3f}"
        return f"{self.strategy}={r}/{z}"


def summarize(results: list[Result], strategies: Iterable[str]) -> list[Summary]:
    out = []
    for name in strategies:
        runs = [r for r in results if r.strategy == name]
        good = [r for r in runs if r.ok]
        out.append(Summary(
            name, len(runs), len(runs) - len(good), sum(r.rollouts_to_target is not None for r in good),
            spread([r.rollouts_to_target for r in good]), spread([r.seconds_to_target for r in good]),
            spread([r.final_accuracy for r in good]), spread([r.zero_var_frac for r in good]),
            spread([r.filtered_frac for r in good]), spread([r.rollouts_used for r in good])))
    return out


def versus(summary: Summary, base: Optional[Summary]) -> str:
    """Rollouts to the target against the baseline's: the ratio of the means, and whether
    the seeds' ranges are apart (every seed of one needed fewer than every seed of the other)."""
    if base is None or summary is base or not (summary.all_reached and base.all_reached):
        return "-"
    a, b = summary.rollouts_to_target, base.rollouts_to_target
    apart = "apart" if a.hi < b.lo or b.hi < a.lo else "overlap"
    return f"{a.mean / b.mean:.2f}x ({apart})"


def summary_table(summaries: list[Summary], baseline: str = "uniform") -> str:
    base = next((s for s in summaries if s.strategy == baseline), None)
    head = (f"{'strategy':12} {'reached':>7}  {'rollouts_to_target':>34}  {'s_to_target':>26}  "
            f"{'final_acc':>32}  {'zero_var_frac':>26}  {'filtered':>6}  {'vs ' + baseline:>16}")
    lines = [head, "-" * len(head)]
    for s in summaries:
        reached = f"{s.reached}/{s.runs}" + (f" ({s.failed} failed)" if s.failed else "")
        filtered = s.filtered_frac.mean if s.filtered_frac.n else None
        lines.append(f"{s.strategy:12} {reached:>7}  {s.rollouts_to_target.text('.0f'):>34}  "
                     f"{s.seconds_to_target.text('.1f'):>26}  {s.final_accuracy.text('.4f'):>32}  "
                     f"{s.zero_var_frac.text('.3f'):>26}  {_fmt(filtered, '.3f'):>6}  "
                     f"{versus(s, base):>16}")
    return "\n".join(lines)


def runs_table(results: list[Result]) -> str:
    head = (f"{'strategy':12} {'seed':>4} {'status':>6} {'steps':>5} {'rollouts':>8} {'acc_0':>6} "
            f"{'rollouts_to_t':>13} {'s_to_t':>7} {'final_acc':>9} {'zero_var':>8} {'filtered':>8} "
            f"{'samples/grp':>11} {'wall_s':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.strategy:12} {r.seed:>4} {r.status:>6} {r.steps:>5} {r.rollouts_used:>8} "
                     f"{_fmt(r.start_accuracy, '.4f'):>6} {_fmt(r.rollouts_to_target, 'd'):>13} "
                     f"{_fmt(r.seconds_to_target, '.1f'):>7} {_fmt(r.final_accuracy, '.4f'):>9} "
                     f"{_fmt(r.zero_var_frac, '.3f'):>8} {_fmt(r.filtered_frac, '.3f'):>8} "
                     f"{_fmt(r.samples_per_group, '.2f'):>11} {r.wall_s:>6.0f}")
    return "\n".join(lines)


def last_line(summaries: list[Summary]) -> str:
    return "compare_sampling: " + " ".join(s.last_value() for s in summaries)


# -- running ------------------------------------------------------------------------------
def command(strategy: str, seed: int, task: str, max_steps: int, args: argparse.Namespace, root: Path,
            extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "train", "algorithm=grpo", f"sampling={strategy}", f"task={task}",
            f"trainer.total_steps={max_steps}", f"trainer.batch_groups={args.batch_groups}",
            f"eval.every_steps={args.eval_every}", f"eval.max_rows={args.eval_rows}",
            f"seed={seed}", f"trainer.seed={seed}", f"rollout.engine.seed={seed}",
            "logger=none", f"output_root={root}", f"run_name={strategy}-seed{seed}", *extra]


class Tail:
    """The complete lines appended to a file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.records = path, 0, []

    def read(self) -> list[dict]:
        if self.path.exists():
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            cut = data.rfind(b"\n") + 1  # keep a line still being written for next time
            self.offset += cut
            self.records += parse_records(data[:cut].decode(errors="replace").splitlines())
        return self.records


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-s", str(sid), "-o", "pid="], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _interruptible() -> None:
    """In the run's process, before exec: SIGINT back to its default, which Python turns
    into KeyboardInterrupt. A driver started in the background (`nohup ... &`) inherits
    SIGINT ignored, and its runs would then ignore `_stop`'s SIGINT until SIGKILL."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to the run's process group (the driver shuts Ray down), then anything of its
    session still there after the grace period is killed."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _reap(sid: int) -> None:
    """Leave none of the run's processes (its session) behind."""
    deadline = time.monotonic() + 20
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(1)
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def n_samples_of(run_dir: Path, default: int = 8) -> int:
    """rollout.n_samples from the run's resolved config.yaml."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return default
    import yaml

    cfg = yaml.safe_load(path.read_text()) or {}
    return int((cfg.get("rollout") or {}).get("n_samples", default))


def run(strategy: str, seed: int, task: str, cmd: list[str], root: Path, budget: int, poll_s: float = 1.0) -> Result:
    print("$ " + " ".join(cmd), flush=True)
    run_dir = root / f"{strategy}-seed{seed}"
    tail = Tail(run_dir / "metrics.jsonl")
    start = time.perf_counter()
    stopped = False
    with open(root / f"{strategy}-seed{seed}.log", "w") as log:  # the run's own console output
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_interruptible)
        try:
            n = None
            while proc.poll() is None:
                time.sleep(poll_s)
                if n is None and (run_dir / "config.yaml").exists():
                    n = n_samples_of(run_dir)
                if n is not None and budget_passed(tail.read(), n, budget):
                    stopped = True
                    _stop(proc)
                    break
        finally:
            if proc.poll() is None:  # the driver itself was interrupted
                _stop(proc)
            _reap(proc.pid)
    wall = round(time.perf_counter() - start, 1)
    code = proc.returncode
    n = n_samples_of(run_dir)
    metrics = parse_run(tail.read(), n)
    if stopped:
        status = "budget"
    elif code == 0:
        status = "budget" if metrics.rollouts >= budget else "short"
    else:
        status = "failed"
    result = summarize_run(Result(strategy, seed, task, cmd, code, status, wall, budget), metrics)
    note = {"budget": f"stopped at {metrics.rollouts} rollouts, step {metrics.steps}",
            "short": f"ended at step {metrics.steps} with only {metrics.rollouts} rollouts (raise --max-steps)",
            "failed": f"exit {code}, see {root / f'{strategy}-seed{seed}.log'}"}[status]
    print(f"  {strategy} seed {seed}: {note}, {wall:.0f} s", flush=True)
    return result


def reanalyse(paths: list[Path], target_spec: str) -> int:
    """The summary of earlier comparisons' results (their --out files, merged) at another target."""
    results, order = [], []
    for path in paths:
        for raw in json.loads(path.read_text())["results"]:
            raw["evals"] = [tuple(e) for e in raw["evals"]]
            results.append(Result(**raw))
            order += [] if raw["strategy"] in order else [raw["strategy"]]
    starts = [r.start_accuracy for r in results if r.start_accuracy is not None]
    target, start = resolve_target(target_spec, starts)
    for r in results:
        apply_target(r, target)
    summaries = summarize(results, order)
    print(f"{len(results)} runs from {', '.join(map(str, paths))}; starting accuracy {start:.4f}, "
          f"target {target:.4f} ({target_spec})\n")
    print(runs_table(results) + "\n")
    print(summary_table(summaries))
    print(last_line(summaries))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--task", default="arithmetic", help="a config in configs/task/ (default: the built-in task)")
    ap.add_argument("--budget", type=int, default=40000, help="rollouts (sampled responses) per run")
    ap.add_argument("--target", default="+0.05",
                    help="held-out accuracy to reach: '+x' over the shared starting accuracy, or absolute")
    ap.add_argument("--eval-every", type=int, default=20, help="held-out evaluation every N steps")
    ap.add_argument("--eval-rows", type=int, default=400, help="held-out rows per evaluation (eval.max_rows)")
    ap.add_argument("--batch-groups", type=int, default=8, help="trainer.batch_groups")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="trainer.total_steps, a cap (default 3x the steps uniform needs at 8 samples a group)")
    ap.add_argument("--output-root", type=Path, default=None, help="default runs/compare-sampling-<time>")
    ap.add_argument("--out", type=Path, default=None, help="write every run's results as JSON here")
    ap.add_argument("--from", dest="from_json", nargs="+", type=Path, default=None,
                    help="runs nothing: re-reads the --out files of earlier comparisons (merged) at --target")
    ap.add_argument("overrides", nargs="*", help="hydra overrides applied to every run (after --)")
    args = ap.parse_args()
    if args.from_json:
        return reanalyse(args.from_json, args.target)
    if not (REPO / "configs" / "task" / f"{args.task}.yaml").exists():
        print(f"compare_sampling: skipping task={args.task}: configs/task/{args.task}.yaml does not exist "
              "(no such task in this checkout)", flush=True)
        return 0
    max_steps = args.max_steps or math.ceil(3 * args.budget / (args.batch_groups * 8))
    root = (args.output_root or REPO / "runs" / time.strftime("compare-sampling-%Y%m%d-%H%M%S")).resolve()
    root.mkdir(parents=True, exist_ok=True)

    began = time.perf_counter()
    results = [run(s, seed, args.task, command(s, seed, args.task, max_steps, args, root, args.overrides), root,
                   args.budget)
               for s in args.strategies for seed in args.seeds]
    total_s = time.perf_counter() - began

    starts = [r.start_accuracy for r in results if r.start_accuracy is not None]
    target, start = resolve_target(args.target, starts)
    for r in results:
        apply_target(r, target)
    summaries = summarize(results, args.strategies)
    if len(set(starts)) > 1:
        print(f"\nnote: the runs' starting accuracies differ: {sorted(set(starts))} (median {start:.4f} used)")
    print(f"\ntask={args.task}, budget {args.budget} rollouts per run, batch_groups={args.batch_groups}, eval every "
          f"{args.eval_every} steps on {args.eval_rows} rows, starting accuracy {start:.4f}, target {target:.4f} "
          f"({args.target}), seeds {args.seeds}, {total_s / 60:.1f} min in all, runs in {root}\n")
    print(runs_table(results) + "\n")
    print(summary_table(summaries))
    if args.out:
        args.out.write_text(json.dumps({
            "task": args.task, "budget": args.budget, "target": target, "target_spec": args.target,
            "start_accuracy": start, "eval_every": args.eval_every, "eval_rows": args.eval_rows,
            "batch_groups": args.batch_groups, "max_steps": max_steps, "seeds": args.seeds,
            "overrides": args.overrides, "total_s": round(total_s, 1), "output_root": str(root),
            "summary": [asdict(s) | {"last": s.last_value()} for s in summaries],
            "results": [asdict(r) for r in results]}, indent=2))
    print(last_line(summaries))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
