"""Learning speed on `task=arithmetic_steps` by rollout workflow (issue 21): flat groups,
tree rollouts and the calculator tool, several seeds each.

    python scripts/compare_workflows.py [--arms flat tree tool] [--seeds 0 1 2] [--budget 30720]
                                        [--target +0.05] [--eval-every 20] [--eval-rows 200]
                                        [--batch-groups 16] [--out results.json] [-- extra hydra overrides]
    python scripts/compare_workflows.py --from results.json --target +0.08   # re-read at another target

Arms (each adds its overrides to `grove train task=arithmetic_steps algorithm=grpo logger=none`):
- `flat`: `rollout.workflow=group`, n independent samples per prompt;
- `tree`: `rollout.workflow=tree`, LATR branching with bench_tree's settings (τ_abs 0.1,
  τ_rel 0.5, 4 rounds, lookahead 4, prune distance 0.2: about 5 of `rollout.n_samples` = 8
  leaves per tree, half their tokens shared); the workflow's own defaults grow ~2.4;
- `tree_mix`: the same with LATR's tree/flat mix at 0.5: half of the leaves start as
  independent samples (roots), the rest branch from them (`tree` has one root per tree);
- `tool`: `rollout.workflow=multiturn` with the calculator answering each step's `=` (stop
  "=", max_turns 8), and evaluated with it (`rollout.eval_workflow=true`): the result of every
  step comes from the tool, so the model learns which steps to write, not the sums.

Each (arm, seed) is one subprocess, one after another, run and stopped as
scripts/compare_sampling.py runs its strategies: the budget is rollouts (trained responses,
plus n_samples for every group dropped), so every arm samples as many responses; a run is
stopped once a step passes it and the evaluation then in flight is logged. Runs go seed by
seed (flat, tree, tool for seed 0, then seed 1, ...), so a cut-short comparison still holds
every arm.

**Targets.** A target written with a sign (`+0.05`) is relative to each arm's own starting
accuracy (the median of its seeds' step-0 evaluations): the tool arm is evaluated with its
calculator, so it starts higher, and "learning speed" is the gain each arm makes. Without a
sign it is absolute for every arm.

Reported per arm, the mean ± std [min-max] over seeds: steps, rollouts and seconds (since
the step-0 evaluation: engine start-up is not counted) to the target, and the accuracy at
the budget; a seed that never reaches the target is counted as not reached, never dropped.
The last line:

    compare_workflows: flat=<steps_to_target>/<gain_at_budget> tree=... tool=...

(steps: the mean over seeds, nan unless every seed reached the target).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_algorithms import REPO, _fmt  # noqa: E402
from compare_sampling import Result, apply_target, resolve_target, run, runs_table, spread  # noqa: E402

TREE_KWARGS = "tau_abs: 0.1, tau_rel: 0.5, rounds: 4, lookahead: 4, prune_distance: 0.2"  # bench_tree's
ARMS = {
    "flat": ["rollout.workflow=group"],
    "tree": ["rollout.workflow=tree", f"+rollout.workflow_kwargs={{{TREE_KWARGS}}}"],
    "tree_mix": ["rollout.workflow=tree", f"+rollout.workflow_kwargs={{{TREE_KWARGS}, mix: 0.5}}"],
    "tool": ["rollout.workflow=multiturn", "+rollout.workflow_kwargs={stop: ['='], max_turns: 8}",
             "rollout.eval_workflow=true"],
}
TASK = "arithmetic_steps"


def command(arm: str, seed: int, max_steps: int, args: argparse.Namespace, root: Path) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "train", "algorithm=grpo", f"task={TASK}", *ARMS[arm],
            f"trainer.total_steps={max_steps}", f"trainer.batch_groups={args.batch_groups}",
            f"eval.every_steps={args.eval_every}", f"eval.max_rows={args.eval_rows}",
            f"seed={seed}", f"trainer.seed={seed}", f"rollout.engine.seed={seed}",
            "logger=none", f"output_root={root}", f"run_name={arm}-seed{seed}", *args.overrides]


def arm_targets(results: list[Result], spec: str) -> dict[str, tuple[float, float]]:
    """arm -> (target, its median starting accuracy)."""
    return {arm: resolve_target(spec, [r.start_accuracy for r in results
                                       if r.strategy == arm and r.start_accuracy is not None])
            for arm in dict.fromkeys(r.strategy for r in results)}


def report(results: list[Result], spec: str) -> str:
    targets = arm_targets(results, spec)
    for r in results:
        apply_target(r, targets[r.strategy][0])
    head = (f"{'arm':5} {'start':>6} {'target':>6} {'reached':>7}  {'steps_to_target':>24}  {'rollouts_to_target':>30}  "
            f"{'s_to_target':>26}  {'acc_at_budget':>28}  {'s_per_step':>10}")
    lines = [runs_table(results), "", head, "-" * len(head)]
    last = []
    for arm, (target, start) in targets.items():
        runs = [r for r in results if r.strategy == arm and r.ok]
        failed = sum(1 for r in results if r.strategy == arm and not r.ok)
        reached = sum(r.steps_to_target is not None for r in runs)
        steps = spread([r.steps_to_target for r in runs])
        final = spread([r.final_accuracy for r in runs])
        pace = spread([r.evals[-1][1] / r.evals[-1][0] for r in runs if r.evals and r.evals[-1][0]])
        lines.append(f"{arm:5} {start:>6.3f} {target:>6.3f} {f'{reached}/{len(runs)}':>7}"
                     f"{f' ({failed} failed)' if failed else ''}  {steps.text('.0f'):>24}  "
                     f"{spread([r.rollouts_to_target for r in runs]).text('.0f'):>30}  "
                     f"{spread([r.seconds_to_target for r in runs]).text('.0f'):>26}  "
                     f"{final.text('.3f'):>28}  {pace.text('.2f'):>10}")
        all_reached = runs and not failed and reached == len(runs)
        gain = _fmt(final.mean - start if final.n else None, '+.3f')
        last.append(f"{arm}={f'{steps.mean:.0f}' if all_reached else 'nan'}/{gain}")
    lines.append("compare_workflows: " + " ".join(last))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", nargs="+", default=["flat", "tree", "tool"], choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=30720, help="rollouts (sampled responses) per run")
    ap.add_argument("--target", default="+0.05", help="'+x' over each arm's starting accuracy, or absolute")
    ap.add_argument("--eval-every", type=int, default=20, help="held-out evaluation every N steps")
    ap.add_argument("--eval-rows", type=int, default=200, help="held-out rows per evaluation (eval.max_rows)")
    ap.add_argument("--batch-groups", type=int, default=16, help="trainer.batch_groups")
    ap.add_argument("--output-root", type=Path, default=None, help="default runs/compare-workflows-<time>")
    ap.add_argument("--out", type=Path, default=None, help="write every run's results as JSON here")
    ap.add_argument("--from", dest="from_json", type=Path, default=None,
                    help="runs nothing: re-reads an earlier --out file at --target")
    ap.add_argument("overrides", nargs="*", help="hydra overrides applied to every run (after --)")
    args = ap.parse_args()
    if args.from_json:
        raw = json.loads(args.from_json.read_text())["results"]
        print(report([Result(**(r | {"evals": [tuple(e) for e in r["evals"]]})) for r in raw], args.target))
        return 0
    max_steps = math.ceil(2 * args.budget / (args.batch_groups * 8))  # a cap: runs stop at the budget
    root = (args.output_root or REPO / "runs" / time.strftime("compare-workflows-%Y%m%d-%H%M%S")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    results = [run(arm, seed, TASK, command(arm, seed, max_steps, args, root), root, args.budget)
               for seed in args.seeds for arm in args.arms]
    print(f"\ntask={TASK}, budget {args.budget} rollouts per run, batch_groups={args.batch_groups}, eval every "
          f"{args.eval_every} steps on {args.eval_rows} rows, target {args.target}, seeds {args.seeds}, "
          f"{(time.perf_counter() - began) / 60:.1f} min in all, runs in {root}\n")
    text = report(results, args.target)
    if args.out:
        args.out.write_text(json.dumps({"budget": args.budget, "target_spec": args.target, "seeds": args.seeds,
                                        "arms": {a: ARMS[a] for a in args.arms}, "overrides": args.overrides,
                                        "output_root": str(root), "results": [asdict(r) for r in results]}, indent=2))
    print(text)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
