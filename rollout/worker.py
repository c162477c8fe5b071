"""The rollout worker: prompts in, scored groups out, weights swapped underneath.

The launcher decides *which* prompts to roll out and *when* (admission control lives
with the buffer); the worker only generates. Each prompt becomes a group of n
independent requests to the engine. Every streamed token is stamped with the policy
version the worker holds at that moment, and weight updates bump that version while
the engine is paused, so the stamps are exact. Finished groups are scored through the
reward runner and wait in `collect()` for the launcher.

The class is plain: tests drive it in-process, the launcher wraps it as a Ray actor.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from buffer.prompts import PromptItem
from buffer.types import FinishReason, Group, Trajectory
from rewards.runner import RewardConfig, RewardRequest, RewardRunner
from rollout.engine import EngineConfig, VLLMEngine


@dataclass
class RolloutConfig:
    """How responses are sampled. Group size is `n_samples`."""

    n_samples: int = 8
    max_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    eval_max_tokens: int = 8
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"rollout.n_samples must be >= 1, got {self.n_samples}")
        if self.max_tokens < 1:
            raise ValueError(f"rollout.max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 < self.temperature:
            raise ValueError(
                f"rollout.temperature must be > 0 for RL sampling, got {self.temperature}"
            )


class RolloutWorker:
    def __init__(self, model_path: str, rollout: RolloutConfig, reward: RewardConfig,
                 reward_cwd: str | None = None) -> None:
        self.model_path = model_path
        self.reward_cwd = reward_cwd  # where relative reward paths resolve: the launch directory
        self.cfg = rollout
        self.reward_cfg = reward
        self.engine = VLLMEngine(model_path, rollout.engine)
        self.version = 0
        self._tasks: set[asyncio.Task] = set()
        self._finished: list[Group] = []
        self._dropped: list[str] = []  # group ids a reward failure policy dropped
        self._finished_event: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.counts = {"groups_started": 0, "groups_finished": 0, "groups_dropped": 0, "groups_cancelled": 0}
        self._tokens_generated = 0
        self._busy_since: float | None = None
        self._busy_seconds = 0.0

    # -- lifecycle -------------------------------------------------------------------
    async def astart(self) -> dict[str, float]:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.rewards = RewardRunner(self.reward_cfg, cwd=self.reward_cwd)
        self._finished_event = asyncio.Event()
        seconds = await self.engine.astart()
        # The first request with logprobs compiles a sampler kernel; pay for it now.
        start = time.perf_counter()
        async for _ in self.engine.astream(self.tokenizer.encode("1+1="), max_tokens=2):
            pass
        return {"engine_start_s": seconds, "first_request_s": time.perf_counter() - start}

    async def stop_generation(self) -> int:
        """Cancel every in-flight group (their requests are aborted); returns how many."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def ashutdown(self) -> None:
        await self.stop_generation()
        self.engine.shutdown()
        self.rewards.close()

    # -- generation ------------------------------------------------------------------
    async def submit(self, items: list[PromptItem]) -> int:
        """Start generating one group per item; returns immediately."""
        for item in items:
            task = asyncio.create_task(self._run_group(item))
            self._tasks.add(task)
            task.add_done_callback(self._on_task_done)
            self.counts["groups_started"] += 1
        if self._tasks and self._busy_since is None:
            self._busy_since = time.perf_counter()
        return len(items)

    def _on_task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            self.counts["groups_cancelled"] += 1
        elif task.exception() is not None and self._error is None:
            self._error = task.exception()
            self._finished_event.set()
        if not self._tasks and self._busy_since is not None:
            self._busy_seconds += time.perf_counter() - self._busy_since
            self._busy_since = None

    async def _run_group(self, item: PromptItem) -> None:
        prompt_ids = self.tokenizer.encode(item.prompt)
        group = Group(
            group_id=item.group_id,
            prompt_id=item.prompt_id,
            prompt_text=item.prompt,
            row=item.row,
            start_version=item.start_version,
        )
        group.trajectories = await asyncio.gather(
            *(self._sample(group, prompt_ids) for _ in range(item.n_samples))
        )
        await self._score(group)

    async def _sample(self, group: Group, prompt_ids: list[int]) -> Trajectory:
        traj = Trajectory(prompt_id=group.prompt_id, group_id=group.group_id, prompt_ids=prompt_ids)
        async for delta in self.engine.astream(
            prompt_ids, self.cfg.max_tokens, self.cfg.temperature, self.cfg.top_p
        ):
            traj.append_tokens(delta.token_ids, delta.logprobs, self.version)
            self._tokens_generated += len(delta.token_ids)
            if delta.finish_reason is not None:
                traj.finish_reason = delta.finish_reason
        if traj.finish_reason is None:
            raise RuntimeError(f"request for group {group.group_id} ended without a finish reason")
        return traj

    def _requests(self, group: Group) -> list[RewardRequest]:
        return [
            RewardRequest(
                prompt=group.prompt_text,
                response=self.tokenizer.decode(t.response_ids, skip_special_tokens=True),
                fields=group.row,
                prompt_ids=t.prompt_ids,
                response_ids=t.response_ids,
                finish_reason=t.finish_reason.value if t.finish_reason else None,
            )
            for t in group.trajectories
        ]

    async def _score(self, group: Group) -> None:
        scored, keep = await self.rewards.ascore_group(self._requests(group))
        for traj, result in zip(group.trajectories, scored):
            traj.reward = result.score
            traj.reward_info = dict(result.info)
            traj.reward_failure = result.failure
        if keep:
            self._finished.append(group)
            self.counts["groups_finished"] += 1
        else:
            self._dropped.append(group.group_id)
            self.counts["groups_dropped"] += 1
        self._finished_event.set()

    async def collect(self, min_groups: int = 0, timeout_s: float = 0.0) -> tuple[list[Group], list[str]]:
        """Hand over finished groups and the ids of dropped ones; wait up to `timeout_s`
        for at least `min_groups` of either."""
        deadline = time.perf_counter() + timeout_s
        while self._error is None and len(self._finished) + len(self._dropped) < min_groups:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._finished_event.clear()
            try:
                await asyncio.wait_for(self._finished_event.wait(), remaining)
            except asyncio.TimeoutError:
                break
        if self._error is not None:
            raise RuntimeError(f"rollout worker failed: {self._error!r}") from self._error
        groups, self._finished = self._finished, []
        dropped, self._dropped = self._dropped, []
        return groups, dropped

    # -- weights ---------------------------------------------------------------------
    async def update_weights(self, payload: bytes, version: int) -> dict[str, float]:
        """Load the trainer's weights for `version` while in-flight requests are kept."""
        if version <= self.version:
            raise ValueError(f"weight update to version {version}, but worker already at {self.version}")
        start = time.perf_counter()

        def bump() -> None:
            self.version = version

        await self.engine.aupdate_weights(payload, on_paused=bump)
        return {"weight_sync_apply_s": time.perf_counter() - start, "weight_bytes": len(payload)}

    # -- evaluation and stats ----------------------------------------------------------
    async def evaluate(self, rows: list[dict], prompt_key: str = "prompt") -> dict[str, float]:
        """Greedy held-out accuracy: the fraction of rows whose reward is at least 1."""

        async def one(row: dict) -> tuple[dict, float]:
            ids = self.tokenizer.encode(row[prompt_key])
            tokens: list[int] = []
            async for delta in self.engine.astream(
                ids, self.cfg.eval_max_tokens, temperature=0.0,
                request_id=self.engine.new_request_id("eval"),
            ):
                tokens.extend(delta.token_ids)
            return row, tokens

        done = await asyncio.gather(*(one(row) for row in rows))
        requests = [
            RewardRequest(
                prompt=row[prompt_key],
                response=self.tokenizer.decode(tokens, skip_special_tokens=True),
                fields=row,
                response_ids=tokens,
            )
            for row, tokens in done
        ]
        scores = await self.rewards.ascore(requests)
        correct = [s.score is not None and s.score >= 1.0 for s in scores]
        metrics = {"eval/accuracy": sum(correct) / len(correct)}
        by_level: dict[str, list[bool]] = {}
        for (row, _), ok in zip(done, correct):
            if "difficulty" in row:
                by_level.setdefault(str(row["difficulty"]), []).append(ok)
        for level, oks in sorted(by_level.items()):
            metrics[f"eval/accuracy_difficulty_{level}"] = sum(oks) / len(oks)
        return metrics

    def stats(self) -> dict[str, float]:
        busy = self._busy_seconds
        if self._busy_since is not None:
            busy += time.perf_counter() - self._busy_since
        return {
            **{f"rollout/{k}": float(v) for k, v in self.counts.items()},
            "rollout/in_flight_groups": float(len(self._tasks)),
            "rollout/tokens_generated": float(self._tokens_generated),
            "rollout/busy_s": busy,
            "rollout/version": float(self.version),
            **self.rewards.metrics(),
        }
