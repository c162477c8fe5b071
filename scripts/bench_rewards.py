"""Per-sample overhead of the reward runner: ``python scripts/bench_rewards.py [--samples N] [--workers W]``.

Scores N arithmetic-style samples with ``exact_match`` isolated (worker processes) and
in-process, after a warm-up call that starts the workers, and prints microseconds per sample.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from rewards.runner import RewardConfig, RewardRequest, RewardRunner


def _requests(n: int, response_tokens: int) -> list[RewardRequest]:
    return [
        RewardRequest(
            prompt=f"{i} + {i} = ", response=str(2 * i), fields={"answer": 2 * i, "difficulty": 1, "op": "+"},
            prompt_ids=list(range(12)), response_ids=list(range(response_tokens)), finish_reason="stop",
        )
        for i in range(n)
    ]


async def _time(runner: RewardRunner, reqs: list[RewardRequest], repeats: int) -> float:
    await runner.ascore(reqs[:8])  # start workers
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = await runner.ascore(reqs)
        best = min(best, time.perf_counter() - t0)
        assert all(s.score == 1.0 for s in out), out[:3]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--response-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    reqs = _requests(args.samples, args.response_tokens)
    for isolated in (True, False):
        cfg = RewardConfig(num_workers=args.workers, isolated=isolated)
        with RewardRunner(cfg) as runner:
            best = asyncio.run(_time(runner, reqs, args.repeats))
        print(f"isolated={isolated!s:5} workers={args.workers} samples={args.samples}: "
              f"{best * 1e6 / args.samples:8.1f} us/sample ({best * 1e3:.1f} ms per batch, best of {args.repeats})")


if __name__ == "__main__":
    main()
