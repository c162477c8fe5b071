"""Tree rollouts vs independent sampling: decoded tokens per leaf on the same prompts.

    python scripts/bench_tree.py --quick     # 3 repeats x 32 prompts
    python scripts/bench_tree.py             # 5 repeats x 64 prompts
    python scripts/bench_tree.py --quick --tree-kwargs ''     # the workflow's defaults
    python scripts/bench_tree.py --quick --tree-kwargs '{rule: surprisal, top_n: 7, rounds: 1}'

The tree runs with `--tree-kwargs` (`rollout.workflow_kwargs`), by default TUNED: LATR's
rule with looser thresholds (tau_abs 0.1, tau_rel 0.5), 4 rounds, a 4-token lookahead and
pruning of exact repeats only (prune_distance 0.2), which on the built-in model fills more
of each tree's budget with less waste than the workflow's defaults (docs/benchmarks.md).

One vLLM engine (as `grove train` builds it: the config's model, task and cluster
profile; default `task=arithmetic_steps`, whose worked answers run 14-64 tokens) serves two
rollout workers in turn: one with `rollout.workflow=tree`, one with the default `group`
(independent samples). Each repeat takes fresh prompts and runs

1. tree: one group per prompt with `rollout.n_samples` leaves at most; a tree may end with
   fewer (too few branch points, pruned branches);
2. flat: the same prompts, each with exactly as many independent samples as its tree got
   leaves, so both sides have the same number of leaves per prompt;

each from an empty prefix cache (neither side reuses the other's prefixes). Per phase:
tokens the engine decoded (the rollout worker's count of generated tokens: a tree's forced
tokens and resent prefixes are not decoded; pruned branches' lookahead is), wall time, and
distinct final answers per group (the text after the last '#', or the whole response).
Ratios are tree / flat per repeat:

    tokens_per_leaf_ratio = (tree decoded tokens / tree leaves) / (flat decoded / flat leaves)
    time_per_leaf_ratio   = (tree seconds / tree leaves) / (flat seconds / flat leaves)
    distinct_ratio        = mean distinct answers per tree / mean distinct answers per flat group

and the summary is the median over repeats. Why the token ratio is what it is:

    tree tokens per leaf = tree_leaf_length x (1 - shared_frac) - forced per leaf + wasted_per_leaf

(`shared_frac`: of the leaves' response tokens, the share another leaf decoded; `wasted`:
pruned branches' lookahead), against the flat samples' own length. Progress goes to
stderr; the table and the summary go to stdout, whose last line is

    bench_tree: tokens_per_leaf_ratio=<x> time_per_leaf_ratio=<y> distinct_ratio=<z> leaves_per_tree=<k> ...
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench_async import stdout_to_stderr  # noqa: E402


def say(text: str) -> None:
    print(f"[bench_tree {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def final_answer(text: str) -> str:
    return text.rsplit("#", 1)[-1].strip()


async def run_phase(worker, items) -> dict:
    """Submit `items`, wait for every group; the engine's decoded tokens, time, groups."""
    decoded, start = worker._tokens_generated, time.perf_counter()
    await worker.submit(items)
    groups, dropped = [], 0
    while len(groups) + dropped < len(items):
        got = await worker.collect(min_groups=len(items) - len(groups) - dropped, timeout_s=600)
        if got.partial:
            raise RuntimeError(f"{len(got.partial)} groups came back partial with no weight update under way")
        groups += got.groups
        dropped += len(got.dropped)
    seconds = time.perf_counter() - start
    by_prompt = {g.prompt_id: g for g in groups}
    return {"seconds": seconds, "decoded": worker._tokens_generated - decoded, "groups": by_prompt,
            "leaves": sum(g.num_samples for g in groups)}


def distinct(groups, tokenizer) -> float:
    counts = [len({final_answer(tokenizer.decode(t.response_ids, skip_special_tokens=True))
                   for t in g.trajectories}) for g in groups]
    return statistics.fmean(counts)


async def bench(cfg, rows: list[dict], prompt_key: str, model_path: str, repeats: int, prompts: int) -> list[dict]:
    from dataclasses import replace

    from algorithms.tree import shared_prefix_mask
    from buffer.prompts import PromptItem
    from rollout.engine import VLLMEngine
    from rollout.worker import RolloutWorker

    engine = VLLMEngine(model_path, cfg.rollout.engine)
    flat_cfg = replace(cfg.rollout, workflow="group", workflow_kwargs={})
    tree_w = RolloutWorker(model_path, cfg.rollout, cfg.reward, reward_cwd=str(ROOT), engine=engine)
    flat_w = RolloutWorker(model_path, flat_cfg, cfg.reward, reward_cwd=str(ROOT), engine=engine)
    await tree_w.astart()
    await flat_w.astart()
    tokenizer = tree_w.tokenizer
    n = cfg.rollout.n_samples
    roots = max(1, n - round(n * tree_w.workflow.mix_at(0)))  # independent samples per tree
    results = []
    try:
        for r in range(repeats):
            chosen = [(str(r * prompts + i), rows[(r * prompts + i) % len(rows)]) for i in range(prompts)]
            tree_items = [PromptItem(pid, row[prompt_key], row, n) for pid, row in chosen]
            await engine.engine.reset_prefix_cache()  # neither side starts with the other's prefixes
            tree = await run_phase(tree_w, tree_items)
            leaves = {p: g.num_samples for p, g in tree["groups"].items()}
            flat_items = [PromptItem(pid, row[prompt_key], row, leaves[pid]) for pid, row in chosen if pid in leaves]
            await engine.engine.reset_prefix_cache()
            flat = await run_phase(flat_w, flat_items)
            trees = list(tree["groups"].values())
            # where the tree's decoded tokens go: distinct tokens of the tree (each shared token
            # once) less the forced ones (one per branched leaf, never decoded), plus wasted
            # ones (pruned branches' lookahead)
            total = sum(t.num_response_tokens for g in trees for t in g.trajectories)
            unique = sum(sum(map(sum, shared_prefix_mask([t.node_ids for t in g.trajectories]))) for g in trees)
            forced = tree["leaves"] - roots * len(trees)
            stats = {k: statistics.fmean(g.stats.get(k, 0.0) for g in trees)
                     for k in ("tree/branch_points", "tree/pruned", "tree/prefix_cache_hit_rate")}
            row = {
                "repeat": r,
                "tree_leaves": tree["leaves"], "flat_leaves": flat["leaves"],
                "tree_tokens_per_leaf": tree["decoded"] / tree["leaves"],
                "flat_tokens_per_leaf": flat["decoded"] / flat["leaves"],
                "tree_s_per_leaf": tree["seconds"] / tree["leaves"],
                "flat_s_per_leaf": flat["seconds"] / flat["leaves"],
                "tree_distinct": distinct(trees, tokenizer),
                "flat_distinct": distinct(flat["groups"].values(), tokenizer),
                "leaves_per_tree": tree["leaves"] / len(trees),
                "tree_leaf_length": total / tree["leaves"],  # response tokens per leaf, shared ones included
                "shared_frac": 1 - unique / total,  # of the leaves' tokens, the share decoded in another leaf
                "wasted_per_leaf": (tree["decoded"] - unique + forced) / tree["leaves"],
                "branch_points": stats["tree/branch_points"], "pruned": stats["tree/pruned"],
                "prefix_cache_hit_rate": stats["tree/prefix_cache_hit_rate"],
            }
            row["tokens_per_leaf_ratio"] = row["tree_tokens_per_leaf"] / row["flat_tokens_per_leaf"]
            row["time_per_leaf_ratio"] = row["tree_s_per_leaf"] / row["flat_s_per_leaf"]
            row["distinct_ratio"] = row["tree_distinct"] / row["flat_distinct"]
            results.append(row)
            say(f"repeat {r}: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in row.items() if k != "repeat"))
    finally:
        await tree_w.stop_generation()
        await flat_w.stop_generation()
        tree_w.rewards.close()
        flat_w.rewards.close()
        engine.shutdown()
    return results


TUNED = "{tau_abs: 0.1, tau_rel: 0.5, rounds: 4, lookahead: 4, prune_distance: 0.2}"
SUMMARY = ("tokens_per_leaf_ratio", "time_per_leaf_ratio", "distinct_ratio", "leaves_per_tree",
           "tree_tokens_per_leaf", "flat_tokens_per_leaf", "tree_leaf_length", "shared_frac", "wasted_per_leaf",
           "branch_points", "pruned", "prefix_cache_hit_rate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 repeats of 32 prompts")
    ap.add_argument("--repeats", type=int, default=None, help="repeats, each on fresh prompts (quick 3, full 5)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per repeat (quick 32, full 64)")
    ap.add_argument("--task", default="arithmetic_steps")
    ap.add_argument("--tree-kwargs", default=TUNED, help="rollout.workflow_kwargs of the tree ('': its defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other grove config override (e.g. rollout.n_samples=16)")
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    prompts = args.prompts or (32 if args.quick else 64)

    from trainer.cli import load_config
    from trainer.launcher import preflight

    # mix 1.0 (one root per tree) as the workflow's default; the CPU build's attention takes
    # cache blocks of multiples of 32 only, so the default block size stays
    overrides = [f"task={args.task}", "rollout.workflow=tree", "logger=none", *args.set]
    if args.tree_kwargs:
        overrides.append(f"+rollout.workflow_kwargs={args.tree_kwargs}")
    cfg = load_config(overrides)
    say(f"config: {' '.join(overrides)}; n_samples={cfg.rollout.n_samples}, workflow_kwargs="
        f"{dict(cfg.rollout.workflow_kwargs)}, {repeats} repeats x {prompts} prompts")
    start = time.perf_counter()
    with stdout_to_stderr():
        data, model_path = preflight(cfg, say)
        results = asyncio.run(bench(cfg, data.train, cfg.task.prompt_key, model_path, repeats, prompts))
    say(f"done in {time.perf_counter() - start:.0f}s")
    med = {k: statistics.median(r[k] for r in results) for k in SUMMARY}
    print("| repeat | tree tok/leaf | flat tok/leaf | tokens ratio | time ratio | distinct ratio | leaves/tree |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['repeat']} | {r['tree_tokens_per_leaf']:.2f} | {r['flat_tokens_per_leaf']:.2f} | "
              f"{r['tokens_per_leaf_ratio']:.3f} | {r['time_per_leaf_ratio']:.3f} | {r['distinct_ratio']:.3f} | "
              f"{r['leaves_per_tree']:.2f} |")
    print("bench_tree: " + " ".join(f"{k}={med[k]:.3f}" for k in SUMMARY) + f" repeats={len(results)}")


if __name__ == "__main__":
    main()
