"""What the orchestrator logs: the per-step metrics and the end-of-run summary.

Kept apart from the loop so the loop stays readable; every number here is derived from
what the engines returned and the orchestrator's own accounting.
"""

from __future__ import annotations

from typing import Any


def merge_worker_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    """Several workers' counters as one: sums, except rates, ratios, latencies and
    versions, which are averaged."""
    if len(stats) == 1:
        return dict(stats[0])
    averaged = ("rate", "ratio", "latency", "version")
    merged: dict[str, float] = {}
    for key in stats[0]:
        values = [float(s.get(key, 0.0)) for s in stats]
        merged[key] = sum(values) / len(values) if any(a in key for a in averaged) else sum(values)
    return merged


RATE_KEYS = ("rollout/tokens_generated", "rollout/busy_s", "rollout/request_s", "rollout/uptime_s")


def worker_rates(stats: dict[int, dict], last: dict[int, dict], wall: float) -> dict[int, dict[str, float]]:
    """Per worker, since its last report: tokens/s, busy share and mean requests in flight
    (a worker new since then counts from its start). The busy share is over the worker's
    own clock, so it is a true fraction whatever the reports' latency."""
    rates = {}
    for i, now in stats.items():
        before = last.get(i, {})
        delta = {k: now[k] - before.get(k, 0.0) for k in RATE_KEYS}
        rates[i] = {"tokens_per_s": delta["rollout/tokens_generated"] / wall,
                    "busy": min(1.0, delta["rollout/busy_s"] / max(delta["rollout/uptime_s"], 1e-9)),
                    "concurrency": delta["rollout/request_s"] / wall}
    return rates


def step_metrics(step: dict[str, float], results: dict[int, dict], last: dict[int, dict], wall: float,
                 extra: dict[str, Any]) -> dict[str, float]:
    """One step's metrics: the trainer's, the workers' (merged, and per worker when there
    are several), the weight sync's, and `extra` from the orchestrator."""
    wall = max(wall, 1e-9)
    stats = {i: r["stats"] for i, r in results.items()}
    rates = worker_rates(stats, last, wall)
    metrics = {
        **step,
        **merge_worker_stats(list(stats.values())),
        "weight_sync/apply_s": max(r["weight_sync_apply_s"] for r in results.values()),
        "weight_sync/drain_s": max(r["weight_sync_drain_s"] for r in results.values()),
        "weight_sync/load_s": max(r["weight_sync_load_s"] for r in results.values()),
        "weight_sync/bytes": float(sum(r["weight_bytes"] for r in results.values())),
        "rollout/requests_interrupted": float(sum(r["requests_interrupted"] for r in results.values())),
        "rollout/tokens_per_s": sum(r["tokens_per_s"] for r in rates.values()),
        "rollout/idle_ratio": 1.0 - sum(r["busy"] for r in rates.values()) / len(rates),
        "rollout/concurrency_mean": sum(r["concurrency"] for r in rates.values()),
        **extra,
    }
    if len(stats) > 1:
        for i, s in stats.items():
            metrics[f"rollout/worker{i}/version"] = s["rollout/version"]
            metrics[f"rollout/worker{i}/in_flight_groups"] = s["rollout/in_flight_groups"]
            metrics[f"rollout/worker{i}/tokens_per_s"] = rates[i]["tokens_per_s"]
    return metrics


def sample_row(group: Any, trained_at: int) -> dict[str, Any]:
    """One trained response for the logger's sample table: the prompt, the response's token
    ids (the logger decodes them), its reward and its tokens' ages at training."""
    traj = group.trajectories[0]
    ages = [trained_at - v for v, m in zip(traj.versions, traj.loss_mask) if m]
    return {"prompt": group.prompt_text, "response_ids": list(traj.response_ids), "reward": traj.reward,
            "group_reward_mean": sum(t.reward or 0.0 for t in group.trajectories) / len(group.trajectories),
            "token_age_max": max(ages, default=0), "token_age_mean": sum(ages) / len(ages) if ages else 0.0,
            "samples": len(group.trajectories)}


def mean_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    """Each key's mean over the dicts that have it (what workflows measured per group)."""
    keys = {k for s in stats for k in s}
    return {k: sum(s[k] for s in stats if k in s) / sum(k in s for s in stats) for k in sorted(keys)}


def budget_shares(samples_by_label: dict[str, int]) -> dict[str, float]:
    """The share of the samples started so far that went to each prompt difficulty label."""
    total = max(sum(samples_by_label.values()), 1)
    return {f"sampling/budget_share_difficulty_{label}": n / total for label, n in sorted(samples_by_label.items())}


def step_line(version: int, total: int, m: dict[str, float]) -> str:
    return (f"step {version}/{total}  reward={m['train/reward_mean']:.3f}  loss={m['train/loss']:+.4f}  "
            f"rollout_tok/s={m['rollout/tokens_per_s']:.0f}  sync={m['weight_sync/total_s'] * 1000:.0f}ms  "
            f"versions={int(m['batch/version_min'])}..{int(m['batch/version_max'])}  "
            f"reward_fail={m.get('reward/failure_rate', 0.0):.0%}")


def masked_note(masked_tokens: float, trained_tokens: float, eta: int, april: bool) -> str | None:
    """A note when much of what was generated was kept as context only."""
    share = masked_tokens / max(masked_tokens + trained_tokens, 1.0)
    if share <= 0.2:
        return None
    return (f"note: {share:.0%} of the generated tokens were kept as context only, not trained on "
            f"(older than buffer.max_staleness={eta} when consumed). A larger buffer.max_staleness or "
            "trainer.batch_groups leaves slow groups more time"
            + ("." if april else "; buffer.stragglers=wait trains every token at the price of the trainer "
               "waiting for them") + " See docs/async.md.")
