"""Train grpo, dr_grpo, dapo and gspo on the built-in task with one seed and one budget.

    python scripts/compare_algorithms.py [--steps 400] [--eval-every 25] [--target 0.45] [--quick]
                                         [--out results.json] [-- extra hydra overrides]

Each recipe is one `grove train` subprocess, one after another (they would fight over the
cores otherwise). From each run's metrics.jsonl it reads the held-out evaluations and
reports how many steps and seconds (since the before-RL evaluation, so engine start-up is
not counted) the recipe needed to reach `--target` accuracy, and its final accuracy. The
last line is machine-readable:

    compare_algorithms: grpo=<steps_to_target>/<final_acc> dr_grpo=... dapo=... gspo=...

Runs are asynchronous, so two runs with the same seed still differ a little: compare
trends, not the third decimal.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

RECIPES = ("grpo", "dr_grpo", "dapo", "gspo")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    recipe: str
    command: list[str]
    returncode: int
    wall_s: float
    evals: list[tuple[int, float, float]] = field(default_factory=list)  # (step, seconds since step 0, accuracy)
    steps_to_target: Optional[int] = None
    seconds_to_target: Optional[float] = None

    @property
    def final_accuracy(self) -> Optional[float]:
        return self.evals[-1][2] if self.evals else None

    def summary(self) -> str:
        if self.returncode != 0 or self.final_accuracy is None:
            return "failed"
        steps = "none" if self.steps_to_target is None else str(self.steps_to_target)
        return f"{steps}/{self.final_accuracy:.4f}"


def command(recipe: str, steps: int, eval_every: int, seed: int, root: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "train", f"algorithm={recipe}", f"trainer.total_steps={steps}",
            f"eval.every_steps={eval_every}", f"seed={seed}", f"trainer.seed={seed}", f"rollout.engine.seed={seed}",
            "logger=none", f"output_root={root}", f"run_name={recipe}", *extra]


def read_evals(metrics: Path) -> list[tuple[int, float, float]]:
    """The held-out evaluations of a run, (step, seconds since the step-0 evaluation, accuracy)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    evals = [(r["step"], r["time_s"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
    if not evals:
        return []
    t0 = evals[0][1]
    return sorted((step, round(t - t0, 1), acc) for step, t, acc in evals)


def run(recipe: str, cmd: list[str], root: Path, target: float) -> Result:
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(root / f"{recipe}.log", "w") as log:  # the run's own console output, for when it fails
        code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    result = Result(recipe, cmd, code, round(time.perf_counter() - start, 1), read_evals(root / recipe / "metrics.jsonl"))
    reached = [(step, t) for step, t, acc in result.evals if acc >= target]
    if reached:
        result.steps_to_target, result.seconds_to_target = reached[0]
    status = f"exit {code}, see {root / f'{recipe}.log'}" if code else f"{result.wall_s:.0f} s"
    print(f"  {recipe}: {status}", flush=True)
    return result


def table(results: list[Result], target: float) -> str:
    head = f"{'recipe':8} {'steps_to_' + str(target):>15} {'s_to_target':>11} {'acc_before':>10} {'acc_final':>9} {'wall_s':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        before = r.evals[0][2] if r.evals else None
        lines.append(f"{r.recipe:8} {_fmt(r.steps_to_target, 'd'):>15} {_fmt(r.seconds_to_target, '.1f'):>11} "
                     f"{_fmt(before, '.4f'):>10} {_fmt(r.final_accuracy, '.4f'):>9} {r.wall_s:>7.0f}")
    return "\n".join(lines)


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="trainer steps per recipe (default 400, 120 with --quick)")
    ap.add_argument("--eval-every", type=int, default=25, help="held-out evaluation every N steps")
    ap.add_argument("--target", type=float, default=0.45, help="held-out accuracy to reach")
    ap.add_argument("--quick", action="store_true", help="120 steps per recipe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset")
    ap.add_argument("--output-root", type=Path, default=None, help="default runs/compare-<time>")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("overrides", nargs="*", help="hydra overrides applied to every run (after --)")
    args = ap.parse_args()
    steps = args.steps or (120 if args.quick else 400)
    root = (args.output_root or REPO / "runs" / time.strftime("compare-%Y%m%d-%H%M%S")).resolve()
    root.mkdir(parents=True, exist_ok=True)

    recipes = args.recipes.split(",")
    commands = {r: command(r, steps, args.eval_every, args.seed, root, args.overrides) for r in recipes}
    results = [run(r, commands[r], root, args.target) for r in recipes]

    print(f"\n{steps} steps, eval every {args.eval_every}, target accuracy {args.target}, runs in {root}")
    print(table(results, args.target))
    if args.out:
        args.out.write_text(json.dumps({"steps": steps, "eval_every": args.eval_every, "target": args.target,
                                        "seed": args.seed, "results": [asdict(r) | {"final_accuracy": r.final_accuracy}
                                                                       for r in results]}, indent=2))
    print("compare_algorithms: " + " ".join(f"{r.recipe}={r.summary()}" for r in results))
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
