"""The rollout worker: prompts in, scored groups out, weights swapped underneath.

The launcher decides *which* prompts to roll out and *when* (admission control lives
with the buffer); the worker only generates. Each prompt becomes a group of n
independent requests to the engine. Every output token is stamped with the policy
version that sampled it, from the engine's own weight labels, so the stamps are exact
even for a request that runs across an update. A weight update, by `rollout.on_update`:

- `wait`: closes the gate for new requests and lets the running ones finish on the old
  weights, then loads the new ones;
- `interrupt`: running requests continue on the new weights with the tokens, logprobs
  and versions they have, and the remaining token budget. `rollout.interrupt_by` says how:
  `pause` (default) keeps them in the engine while the weights load between two of its
  steps (`VLLMEngine.aswap_weights`), so they go on over the context already cached; `abort` ends them and resubmits prompt + partial
  response, so the context is re-prefilled on the new weights (one prefill per request
  per update);
- `mask`: as interrupt, but a response's tokens older than its newest ones leave the
  loss (kept as context).

`interrupt_groups` (APRIL, at each batch boundary) stops everything in flight, again by
`rollout.interrupt_by`: `pause` holds the requests in the engine, and the next weight
update resumes them first, on the new weights over the context already cached; `abort`
ends them and hands the unfinished groups back as partial groups, which `resume`
continues later (re-prefilled). Nothing generated is discarded.

The class is plain: tests drive it in-process, the launcher wraps it as a Ray actor.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import zlib
from dataclasses import dataclass, field

from buffer.prompts import PromptItem
from buffer.types import FinishReason, Group, Trajectory
from rewards.runner import RewardConfig, RewardRequest, RewardRunner
from rollout.engine import EngineConfig, VLLMEngine

ON_UPDATE_MODES = ("wait", "interrupt", "mask")
INTERRUPT_BY = ("pause", "abort")


@dataclass
class RolloutConfig:
    """How responses are sampled. Group size is `n_samples`."""

    n_samples: int = 8
    max_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    eval_max_tokens: int = 8
    on_update: str = "interrupt"  # wait | interrupt | mask (see the module docstring)
    interrupt_by: str = "pause"  # pause: keep requests in the engine | abort: resubmit, re-prefill
    overprovision: float = 1.0  # APRIL: keep this many batches' worth of groups in flight (1 = off)
    # A long-tail length mix for benchmarks and stress tests: this fraction of the prompts
    # must be answered with at least `long_tail_min_tokens` tokens (EOS is ignored until then).
    long_tail_fraction: float = 0.0
    long_tail_min_tokens: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"rollout.n_samples must be >= 1, got {self.n_samples}")
        if self.max_tokens < 1:
            raise ValueError(f"rollout.max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 < self.temperature:
            raise ValueError(f"rollout.temperature must be > 0 for RL sampling, got {self.temperature}")
        if self.on_update not in ON_UPDATE_MODES:
            raise ValueError(f"rollout.on_update={self.on_update!r} is not one of {list(ON_UPDATE_MODES)}")
        if self.interrupt_by not in INTERRUPT_BY:
            raise ValueError(f"rollout.interrupt_by={self.interrupt_by!r} is not one of {list(INTERRUPT_BY)}")
        if not 0.0 <= self.long_tail_fraction <= 1.0:
            raise ValueError(f"rollout.long_tail_fraction must be in [0, 1], got {self.long_tail_fraction}")
        if self.long_tail_min_tokens > self.max_tokens:
            raise ValueError(f"rollout.long_tail_min_tokens={self.long_tail_min_tokens} exceeds "
                             f"rollout.max_tokens={self.max_tokens}")
        if self.overprovision < 1.0:
            raise ValueError(f"rollout.overprovision must be >= 1 (1 = no over-provisioning), got {self.overprovision}")


@dataclass
class Collected:
    """What `collect` hands the launcher."""

    groups: list[Group]  # finished and scored
    dropped: list[str]  # ids of groups a reward failure policy dropped
    partial: list[Group]  # interrupted by `interrupt_groups`, to resume later


class RolloutWorker:
    def __init__(self, model_path: str, rollout: RolloutConfig, reward: RewardConfig,
                 reward_cwd: str | None = None, engine: VLLMEngine | None = None) -> None:
        self.model_path = model_path
        self.cfg = rollout
        self.reward_cfg = reward
        self.reward_cwd = reward_cwd  # where relative reward paths resolve: the launch directory
        if engine is None and rollout.engine.cpu_cores is not None:
            # the whole rollout stack (this actor, vLLM's engine-core and worker processes,
            # the reward workers) inherits the engine's core, as the trainer keeps to its own
            cores = {int(c) for c in str(rollout.engine.cpu_cores).split(",")}
            for tid in os.listdir("/proc/self/task"):  # every thread; threads and processes started later inherit
                os.sched_setaffinity(int(tid), cores)
        self.engine = engine or VLLMEngine(model_path, rollout.engine)  # tests share one engine
        self.version = 0  # the weights every request sent to the engine from now on runs on
        self._tasks: set[asyncio.Task] = set()
        self._finished: list[Group] = []
        self._dropped: list[str] = []
        self._partial: list[Group] = []
        self._active: dict[str, str | None] = {}  # running request id -> abort reason
        self._interrupts = 0  # bumped by interrupt_groups; groups started before it hand back
        self._error: BaseException | None = None
        self._stopped = False
        self.counts = dict.fromkeys(
            ("groups_started", "groups_finished", "groups_dropped", "groups_cancelled", "groups_partial",
             "groups_resumed", "samples_interrupted", "prefix_cache_kept"), 0)
        self._tokens_generated = 0
        self._busy_since: float | None = None
        self._busy_seconds = 0.0
        self._request_seconds = 0.0  # Σ over time of requests generating: their mean is the engine's concurrency
        self._paused = False  # requests held in the engine (a weight load, or an APRIL batch boundary)
        self._held = False  # ... and the engine has stopped: the clocks of busy and request time stop
        self._active_since = time.perf_counter()
        self._created = time.perf_counter()

    # -- lifecycle -------------------------------------------------------------------
    async def astart(self) -> dict[str, float]:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.rewards = RewardRunner(self.reward_cfg, cwd=self.reward_cwd)
        self._changed = asyncio.Event()  # something for `collect` to hand over
        self._gate = asyncio.Event()  # open unless a weight update is under way
        self._gate.set()
        self._idle = asyncio.Event()  # no request is generating
        self._idle.set()
        self._update_lock = asyncio.Lock()  # updates apply one at a time, in the order sent
        self._new_weights = asyncio.Event()  # set (and replaced) when `version` moves on
        seconds = 0.0 if self.engine.started else await self.engine.astart()
        await self.engine.alabel(self.version)
        await self.rewards.astart()  # the reward processes' start-up, not on the rollout's core in the first batches
        # The first request with logprobs compiles a sampler kernel; pay for it now.
        start = time.perf_counter()
        await self.engine.agenerate(self.tokenizer.encode("1+1="), max_tokens=2)
        # Generation allocates many small objects; the default collector then keeps
        # re-scanning the whole heap of vLLM, torch and transformers modules. Freezing what
        # start-up built and collecting less often gave the rollout-only path 15-25 % more
        # trajectories/s on the built-in model (see docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        return {"engine_start_s": seconds, "first_request_s": time.perf_counter() - start}

    async def stop_generation(self) -> int:
        """Cancel every in-flight group (their requests are aborted); returns how many."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._stopped = True  # nothing more will arrive: a waiting `collect` returns now
        self._changed.set()
        return len(tasks)

    async def ashutdown(self) -> None:
        await self.stop_generation()
        self.engine.shutdown()
        self.rewards.close()

    # -- generation ------------------------------------------------------------------
    async def submit(self, items: list[PromptItem]) -> int:
        """Start generating one group per item; returns immediately. A group generates
        only on weights of its `start_version` or newer: one admitted for a version whose
        update has not reached this worker yet waits for it here (see `_weights_sent`)."""
        for item in items:
            group = Group(group_id=item.group_id, prompt_id=item.prompt_id, prompt_text=item.prompt,
                          row=item.row, start_version=item.start_version)
            prompt_ids = self.tokenizer.encode(item.prompt)
            group.trajectories = [
                Trajectory(prompt_id=item.prompt_id, group_id=item.group_id, prompt_ids=list(prompt_ids))
                for _ in range(item.n_samples)
            ]
            self._spawn(group, not_before=item.start_version)
            self.counts["groups_started"] += 1
        return len(items)

    async def resume(self, groups: list[Group], not_before: int = 0) -> int:
        """Continue partial groups where they stopped (their stale tokens were already
        masked by the scheduler), on weights of version `not_before` or newer."""
        for group in groups:
            self._spawn(group, not_before)
            self.counts["groups_resumed"] += 1
        return len(groups)

    async def interrupt_groups(self) -> int:
        """APRIL: stop everything in flight until the next weight update. With
        interrupt_by=pause the requests wait in the engine and that update resumes them;
        with abort the unfinished groups come back through `collect` as partial groups,
        including samples waiting to start a segment. Returns the number of requests."""
        if self.cfg.interrupt_by == "pause":
            await self._pause()
            return len(self._active)
        self._interrupts += 1
        return await self._abort_active("partial")

    async def _pause(self) -> None:
        """Hold every request in the engine; the time held counts as idle, not busy.
        (A batch boundary that arrives while a weight load holds the engine is already
        served: its requests go on once the load ends, stamped with the new version.)"""
        if self._paused:
            return
        self._paused = True  # before the await: a concurrent call must see it
        await self.engine.apause()  # returns when the engine's current step is done
        self._stop_clocks(time.perf_counter())

    async def _resume(self) -> None:
        if not self._paused:
            return
        await self.engine.aresume()
        self._restart_clocks()

    def _stop_clocks(self, held_since: float) -> None:
        """The engine has been held since `held_since`: busy and request time stop there."""
        self._count_request_time(until=held_since)
        self._held = True
        if self._busy_since is not None:
            self._busy_seconds += max(0.0, held_since - self._busy_since)
            self._busy_since = None

    def _restart_clocks(self) -> None:
        self._count_request_time()
        self._held = self._paused = False
        if self._active and self._busy_since is None:
            self._busy_since = time.perf_counter()

    def _spawn(self, group: Group, not_before: int) -> None:
        task = asyncio.create_task(self._run_group(group, not_before))
        self._tasks.add(task)
        task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            self.counts["groups_cancelled"] += 1
        elif task.exception() is not None and self._error is None:
            self._error = task.exception()
            self._changed.set()

    def _min_tokens(self, group: Group) -> int:
        """Long-tail prompts, picked by a hash of the prompt id: the same prompts are long in
        every run and every mode, and a resumed group keeps its length."""
        if not self.cfg.long_tail_fraction:
            return 0
        draw = zlib.crc32(group.prompt_id.encode()) / 2**32
        return self.cfg.long_tail_min_tokens if draw < self.cfg.long_tail_fraction else 0

    async def _run_group(self, group: Group, not_before: int) -> None:
        min_tokens = self._min_tokens(group)
        interrupts = self._interrupts  # (an APRIL interrupt while held hands the group back)
        while self.version < not_before:
            await self._new_weights.wait()
        group.trajectories = list(await asyncio.gather(
            *(self._sample(t, self.cfg.max_tokens, self.cfg.temperature, min_tokens, interrupts, not_before)
              for t in group.trajectories)))
        if any(t.finish_reason is FinishReason.ABORTED for t in group.trajectories):
            self._partial.append(group)
            self.counts["groups_partial"] += 1
            self._changed.set()
            return
        await self._score(group)

    async def _abort_active(self, reason: str) -> int:
        ids = list(self._active)
        for request_id in ids:
            self._active[request_id] = reason
        if ids:
            await self.engine.abort(ids)
        return len(ids)

    async def _sample(self, traj: Trajectory, max_tokens: int, temperature: float,
                      min_tokens: int = 0, interrupts: int | None = None, not_before: int = 0) -> Trajectory:
        """Generate (or continue) one response, segment by segment, until it stops or is
        handed back as partial. A finished trajectory is returned unchanged."""
        if traj.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            return traj
        traj.finish_reason = None
        while traj.finish_reason is None:
            remaining = max_tokens - traj.num_response_tokens
            if remaining <= 0:
                traj.finish_reason = FinishReason.LENGTH
                break
            await self._gate.wait()
            if interrupts is not None and interrupts != self._interrupts:
                traj.finish_reason = FinishReason.ABORTED  # handed back partial (APRIL)
                break
            request_id = self.engine.new_request_id()
            self._mark_active(request_id)
            segment_start, segment_version = traj.num_response_tokens, self.version
            try:
                segment = await self.engine.agenerate(
                    traj.prompt_ids + traj.response_ids, remaining, temperature, self.cfg.top_p,
                    request_id=request_id, min_tokens=max(0, min_tokens - traj.num_response_tokens))
            finally:
                reason = self._mark_inactive(request_id)
            # provisional stamp (the gate keeps a segment on one version); the engine's labels replace it
            traj.append_tokens(segment.token_ids, segment.logprobs, segment_version)
            self._tokens_generated += len(segment.token_ids)
            finish = segment.finish_reason
            self._stamp_versions(traj, segment_start, segment.versions, request_id)
            if segment.token_ids and min(traj.versions[segment_start:]) < not_before:
                raise RuntimeError(f"engine request {request_id} sampled tokens on weights of version "
                                   f"{min(traj.versions[segment_start:])}, but its group was admitted at "
                                   f"version {not_before}: it would be trained older than the staleness bound allows")
            if finish is FinishReason.ABORTED and reason == "update":
                self.counts["samples_interrupted"] += 1
                continue  # resume on the new weights once the gate reopens
            traj.finish_reason = finish
        if self.cfg.on_update == "mask" and traj.versions:
            newest = traj.versions[-1]
            traj.loss_mask = [0 if v < newest else m for v, m in zip(traj.versions, traj.loss_mask)]
        return traj

    def _stamp_versions(self, traj: Trajectory, start: int, versions: list[int] | None, request_id: str) -> None:
        """Stamp a segment's tokens with the versions the engine reports sampled them."""
        count = traj.num_response_tokens - start
        if versions is None:
            if count and self.cfg.interrupt_by == "pause" and (self.cfg.on_update != "wait"
                                                               or self.cfg.overprovision > 1):
                raise RuntimeError(f"engine request {request_id} reported no weight versions; without them "
                                   "tokens sampled across a paused update cannot be stamped")
            return  # the gate kept the segment on one version: the provisional stamp is exact
        if len(versions) != count:
            raise RuntimeError(f"engine request {request_id}: {count} tokens received but weight versions "
                               f"for {len(versions)}")
        traj.versions[start:] = versions

    def _count_request_time(self, until: float | None = None) -> None:
        now = time.perf_counter() if until is None else max(until, self._active_since)
        if not self._held:
            self._request_seconds += len(self._active) * (now - self._active_since)
        self._active_since = now

    def _mark_active(self, request_id: str) -> None:
        self._count_request_time()
        if not self._active:
            self._idle.clear()
            if not self._held:
                self._busy_since = time.perf_counter()
        self._active[request_id] = None

    def _mark_inactive(self, request_id: str) -> str | None:
        self._count_request_time()
        reason = self._active.pop(request_id, None)
        if not self._active:
            self._idle.set()
            if self._busy_since is not None:
                self._busy_seconds += time.perf_counter() - self._busy_since
                self._busy_since = None
        return reason

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
        self._changed.set()

    async def collect(self, min_groups: int = 0, timeout_s: float = 0.0) -> Collected:
        """Hand over finished, dropped and partial groups; wait up to `timeout_s` until
        there are at least `min_groups` of them."""
        deadline = time.perf_counter() + timeout_s
        while (self._error is None and not self._stopped
               and len(self._finished) + len(self._dropped) + len(self._partial) < min_groups):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
        if self._error is not None:
            raise RuntimeError(f"rollout worker failed: {self._error!r}") from self._error
        out = Collected(self._finished, self._dropped, self._partial)
        self._finished, self._dropped, self._partial = [], [], []
        return out

    # -- weights ---------------------------------------------------------------------
    async def update_weights(self, payload: bytes, version: int) -> dict:
        """Load the trainer's weights for `version` (see the module docstring for what
        happens to requests in flight). Returns the load's timings and, under "stats",
        `stats()` as of its end, so the launcher logs a step without another call."""
        async with self._update_lock:
            return await self._update_weights(payload, version)

    async def _update_weights(self, payload: bytes, version: int) -> dict:
        if version <= self.version:
            raise ValueError(f"weight update to version {version}, but worker already at {self.version}")
        start = time.perf_counter()
        if self._paused or (self.cfg.on_update != "wait" and self.cfg.interrupt_by == "pause"):
            # requests stay in the engine with their cache (held there by an APRIL batch
            # boundary, or generating) and go on over it on the new weights
            held_already = self._paused
            self._paused = True  # a batch boundary arriving meanwhile is served by this swap
            interrupted = len(self._active)
            self.counts["samples_interrupted"] += interrupted
            drained = None
            try:
                drained = await self.engine.aswap_weights(payload, version, paused=held_already,
                                                          on_sent=lambda: self._weights_sent(version))
            finally:
                if not held_already and drained is not None:
                    self._stop_clocks(drained)
                self._restart_clocks()
            drained = drained or start
            self.counts["prefix_cache_kept"] += 1
        else:
            self._gate.clear()
            try:
                interrupted = 0
                if self.cfg.on_update != "wait":
                    interrupted = await self._abort_active("update")
                await self._idle.wait()  # no request of the old version is still generating
                drained = time.perf_counter()
                if not await self.engine.aload_weights(payload, version):
                    self.counts["prefix_cache_kept"] += 1
                self._weights_sent(version)
            finally:
                self._gate.set()
        now = time.perf_counter()
        return {"weight_sync_apply_s": now - start, "weight_sync_drain_s": drained - start,
                "weight_sync_load_s": now - drained, "weight_bytes": len(payload),
                "requests_interrupted": interrupted, "stats": self.stats()}

    def _weights_sent(self, version: int) -> None:
        """From now on every request sent to the engine runs on `version`'s weights (it
        queues behind their load): release the groups held for them."""
        self.version = version
        released, self._new_weights = self._new_weights, asyncio.Event()
        released.set()

    # -- evaluation and stats ----------------------------------------------------------
    async def evaluate(self, rows: list[dict], prompt_key: str = "prompt") -> dict[str, float]:
        """Greedy held-out accuracy: the fraction of rows whose reward is at least 1."""

        async def one(row: dict) -> Trajectory:
            traj = Trajectory(prompt_id="eval", group_id="eval", prompt_ids=self.tokenizer.encode(row[prompt_key]))
            return await self._sample(traj, self.cfg.eval_max_tokens, temperature=0.0)

        trajs = await asyncio.gather(*(one(row) for row in rows))
        requests = [
            RewardRequest(prompt=row[prompt_key], fields=row, response_ids=t.response_ids,
                          response=self.tokenizer.decode(t.response_ids, skip_special_tokens=True))
            for row, t in zip(rows, trajs)
        ]
        scores = await self.rewards.ascore(requests)
        correct = [s.score is not None and s.score >= 1.0 for s in scores]
        metrics = {"eval/accuracy": sum(correct) / len(correct)}
        by_level: dict[str, list[bool]] = {}
        for row, ok in zip(rows, correct):
            if "difficulty" in row:
                by_level.setdefault(str(row["difficulty"]), []).append(ok)
        for level, oks in sorted(by_level.items()):
            metrics[f"eval/accuracy_difficulty_{level}"] = sum(oks) / len(oks)
        return metrics

    def stats(self) -> dict[str, float]:
        busy = self._busy_seconds
        if self._busy_since is not None:
            busy += time.perf_counter() - self._busy_since
        self._count_request_time()
        return {
            **{f"rollout/{k}": float(v) for k, v in self.counts.items()},
            "rollout/in_flight_groups": float(len(self._tasks)),
            "rollout/tokens_generated": float(self._tokens_generated),
            "rollout/busy_s": busy,
            "rollout/request_s": self._request_seconds,
            "rollout/uptime_s": time.perf_counter() - self._created,
            "rollout/version": float(self.version),
            **self.rewards.metrics(),
        }
