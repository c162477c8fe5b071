"""The rollout worker: prompt items in, scored groups out, weights swapped underneath.

The orchestrator decides *which* prompts to roll out and *when* (admission control lives
with the scheduler); the worker only generates. Each prompt item becomes one episode of
the configured `RolloutWorkflow` (rollout/workflow.py; by default n independent
requests to the engine). Every output token is stamped with the policy version that
sampled it, from the engine's own weight labels, so the stamps are exact even for a
request that runs across an update. A weight update, by `rollout.on_update`:

- `wait`: closes the gate for new requests and lets the running ones finish on the old
  weights, then loads the new ones;
- `interrupt`: running requests continue on the new weights with the tokens, logprobs
  and versions they have, and the remaining token budget. `rollout.interrupt_by` says how:
  `pause` (default) keeps them in the engine while the weights load between two of its
  steps (`VLLMEngine.aswap_weights`), so they go on over the context already cached;
  `abort` ends them and resubmits prompt + partial response, so the context is
  re-prefilled on the new weights (one prefill per request per update);
- `interrupt_newest`: as interrupt, but a response's tokens older than its newest ones
  leave the loss (kept as context).

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
import inspect
import os
import time
from dataclasses import dataclass

from buffer.prompts import PromptItem
from buffer.scheduler import item_of
from buffer.types import FinishReason, Group, Trajectory
from rewards.runner import RewardConfig, RewardRequest, RewardRunner
from rollout.clock import BusyClock
from rollout.config import RolloutConfig
from rollout.engine import VLLMEngine
from rollout.episode import Episode, EvalEpisode
from rollout.workflow import build_workflow

__all__ = ["Collected", "Episode", "RolloutConfig", "RolloutWorker"]

@dataclass
class Collected:
    """What `collect` hands the orchestrator."""

    groups: list[Group]  # finished and scored
    dropped: list[str]  # ids of groups a reward failure policy dropped or the workflow rejected
    partial: list[Group]  # interrupted by `interrupt_groups`, to resume later


class RolloutWorker:
    def __init__(self, model_path: str, rollout: RolloutConfig, reward: RewardConfig,
                 reward_cwd: str | None = None, engine: VLLMEngine | None = None) -> None:
        self.model_path = model_path
        self.cfg = rollout
        self.reward_cfg = reward
        self.reward_cwd = reward_cwd  # where relative reward and workflow paths resolve: the launch directory
        if engine is None and rollout.engine.cpu_cores is not None:
            # the whole rollout stack (this actor, vLLM's engine-core and worker processes,
            # the reward workers) inherits the engine's core, as the trainer keeps to its own
            cores = {int(c) for c in str(rollout.engine.cpu_cores).split(",")}
            for tid in os.listdir("/proc/self/task"):  # every thread; threads and processes started later inherit
                os.sched_setaffinity(int(tid), cores)
        self.engine = engine or VLLMEngine(model_path, rollout.engine)  # tests share one engine
        self.workflow = build_workflow(rollout.workflow, dict(rollout.workflow_kwargs), reward_cwd)
        if rollout.eval_workflow and not inspect.iscoroutinefunction(getattr(self.workflow, "aevaluate", None)):
            raise ValueError(f"rollout.eval_workflow=true, but rollout.workflow={rollout.workflow!r} "
                             f"({type(self.workflow).__name__}) has no `async def aevaluate(self, ctx, traj, row)` "
                             "to run a held-out row with: set rollout.eval_workflow=false (plain greedy samples), "
                             "or use a workflow that has one (multiturn)")
        self.version = 0  # the weights every request sent to the engine from now on runs on
        self._tasks: dict[asyncio.Task, str] = {}  # episode task -> its group id
        self._finished: list[Group] = []
        self._dropped: list[str] = []
        self._partial: list[Group] = []
        self._active: dict[str, tuple[str, str | None]] = {}  # running request id -> (group id, abort reason)
        self._interrupts = 0  # bumped by interrupt_groups; groups started before it hand back
        self._error: BaseException | None = None
        self._stopped = False
        self.counts = dict.fromkeys(
            ("groups_started", "groups_finished", "groups_dropped", "groups_cancelled", "groups_partial",
             "groups_resumed", "samples_interrupted", "prefix_cache_kept"), 0)
        self._tokens_generated = 0
        self.clock = BusyClock()
        self._paused = False  # requests held in the engine (a weight load, or an APRIL batch boundary)
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
        # Generation allocates many small objects, and the default collector would keep
        # re-scanning the whole heap of vLLM, torch and transformers modules on the rollout
        # core: freeze what start-up built and collect less often.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        return {"engine_start_s": seconds, "first_request_s": time.perf_counter() - start}

    async def stop_generation(self) -> int:
        """Cancel every in-flight episode (their requests are aborted); returns how many."""
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

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's token ids: as is, or inside the chat template (`rollout.chat_template`)."""
        if not self.cfg.chat_template:
            return self.tokenizer.encode(text)
        messages = [{"role": "user", "content": text}]
        if self.cfg.system_prompt:
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    # -- generation ------------------------------------------------------------------
    async def submit(self, items: list[PromptItem]) -> int:
        """Start one episode per item; returns immediately. An episode generates only on
        weights of its item's `start_version` or newer: one admitted for a version whose
        update has not reached this worker yet waits for it here (see `_weights_sent`)."""
        for item in items:
            self._spawn(item, None, item.start_version)
            self.counts["groups_started"] += 1
        return len(items)

    async def resume(self, groups: list[Group], not_before: int = 0) -> int:
        """Continue partial groups where they stopped (their stale tokens were already
        masked by the scheduler), on weights of version `not_before` or newer."""
        for group in groups:
            self._spawn(item_of(group), group, not_before)
            self.counts["groups_resumed"] += 1
        return len(groups)

    async def interrupt_groups(self) -> list[str]:
        """APRIL: stop everything in flight until the next weight update. With
        interrupt_by=pause the requests wait in the engine and that update resumes them;
        with abort the unfinished groups come back through `collect` as partial groups,
        including samples waiting to start a segment. Returns the ids of the groups whose
        requests were stopped."""
        groups = sorted({group_id for group_id, _ in self._active.values()})
        if self.cfg.interrupt_by == "pause":
            await self._pause()
            return groups
        self._interrupts += 1
        await self._abort_active("partial")
        return groups

    async def _pause(self) -> None:
        """Hold every request in the engine; the time held counts as idle, not busy.
        (A batch boundary that arrives while a weight load holds the engine is already
        served: its requests go on once the load ends, stamped with the new version.)"""
        if self._paused:
            return
        self._paused = True  # before the await: a concurrent call must see it
        await self.engine.apause()  # returns when the engine's current step is done
        self.clock.hold(time.perf_counter())

    def _spawn(self, item: PromptItem, partial: Group | None, not_before: int) -> None:
        task = asyncio.create_task(self._run_episode(item, partial, not_before))
        self._tasks[task] = item.group_id
        task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task) -> None:
        self._tasks.pop(task, None)
        if task.cancelled():
            self.counts["groups_cancelled"] += 1
        elif task.exception() is not None and self._error is None:
            self._error = task.exception()
            self._changed.set()

    async def _run_episode(self, item: PromptItem, partial: Group | None, not_before: int) -> None:
        while self.version < not_before:
            await self._new_weights.wait()
        episode = Episode(self, item, partial, not_before)
        group = await self.workflow.arun_episode(episode, item)
        name = type(self.workflow).__name__
        if group is None or episode.scored is False:
            self._dropped.append(item.group_id)
            self.counts["groups_dropped"] += 1
        elif group.group_id != item.group_id:
            raise RuntimeError(f"workflow {name} returned group {group.group_id!r} for item {item.group_id!r}")
        elif group.is_finished:
            if episode.scored is None:
                raise RuntimeError(f"workflow {name} returned finished group {group.group_id} without scoring it "
                                   "(await ctx.ascore(group) before returning it)")
            self._finished.append(group)
            self.counts["groups_finished"] += 1
        elif any(t.finish_reason is FinishReason.ABORTED for t in group.trajectories):
            self._partial.append(group)
            self.counts["groups_partial"] += 1
        else:
            raise RuntimeError(f"workflow {name} returned group {group.group_id} neither finished nor interrupted")
        self._changed.set()

    async def _abort_active(self, reason: str) -> int:
        ids = list(self._active)
        for request_id in ids:
            self._active[request_id] = (self._active[request_id][0], reason)
        if ids:
            await self.engine.abort(ids)
        return len(ids)

    async def _sample(self, traj: Trajectory, max_tokens: int, temperature: float,
                      min_tokens: int = 0, interrupts: int | None = None, not_before: int = 0,
                      top_logprobs: int = 0, on_segment=None, stop: tuple[str, ...] = ()) -> Trajectory:
        """Generate (or continue) one response, segment by segment, until it stops or is
        handed back as partial. A finished trajectory is returned unchanged. `on_segment`
        sees every engine segment (its top logprobs, its prefix-cache hits)."""
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
            self._mark_active(request_id, traj.group_id)
            segment_start, segment_version = traj.num_response_tokens, self.version
            try:
                segment = await self.engine.agenerate(
                    traj.context_ids + traj.prompt_ids + traj.response_ids, remaining, temperature, self.cfg.top_p,
                    request_id=request_id, min_tokens=max(0, min_tokens - traj.num_response_tokens),
                    top_logprobs=top_logprobs, stop=stop)
            finally:
                reason = self._mark_inactive(request_id)
            # provisional stamp (the gate keeps a segment on one version); the engine's labels replace it
            traj.append_tokens(segment.token_ids, segment.logprobs, segment_version)
            self._tokens_generated += len(segment.token_ids)
            if on_segment is not None:
                on_segment(segment)
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
        if self.cfg.on_update == "interrupt_newest" and traj.versions:
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

    def _mark_active(self, request_id: str, group_id: str) -> None:
        if not self._active:
            self._idle.clear()
        self._active[request_id] = (group_id, None)
        self.clock.request_started()

    def _mark_inactive(self, request_id: str) -> str | None:
        _, reason = self._active.pop(request_id, ("", None))
        self.clock.request_ended()
        if not self._active:
            self._idle.set()
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

    async def _score(self, group: Group) -> bool:
        scored, keep = await self.rewards.ascore_group(self._requests(group))
        for traj, result in zip(group.trajectories, scored):
            traj.reward = result.score
            traj.reward_info = dict(result.info)
            traj.reward_failure = result.failure
        return keep

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
    async def update_weights(self, payload: bytes | dict | None, version: int) -> dict:
        """Load the trainer's weights for `version` (see the module docstring for what
        happens to requests in flight); `payload=None` (a step the trainer skipped) only
        relabels the weights in place as `version`. Returns the load's timings and, under
        "stats", `stats()` as of its end, so the orchestrator logs a step without another call."""
        async with self._update_lock:
            if version <= self.version:
                raise ValueError(f"weight update to version {version}, but worker already at {self.version}")
            if payload is None:
                return await self._relabel(version)
            return await self._update_weights(payload, version)

    async def _relabel(self, version: int) -> dict:
        start = time.perf_counter()
        await self.engine.alabel(version)
        self._weights_sent(version)
        if self._paused:  # an APRIL batch boundary: the held requests go on
            await self.engine.aresume()
            self._paused = False
            self.clock.release()
        return {"weight_sync_apply_s": time.perf_counter() - start, "weight_sync_drain_s": 0.0,
                "weight_sync_load_s": 0.0, "weight_bytes": 0, "requests_interrupted": 0, "stats": self.stats()}

    async def _update_weights(self, payload: bytes, version: int) -> dict:
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
                    self.clock.hold(drained)
                self._paused = False
                self.clock.release()
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
        size = payload["bytes"] if isinstance(payload, dict) else len(payload)  # a broadcast ticket, or a blob
        return {"weight_sync_apply_s": now - start, "weight_sync_drain_s": drained - start,
                "weight_sync_load_s": now - drained, "weight_bytes": size,
                "requests_interrupted": interrupted, "stats": self.stats()}

    async def join_weight_group(self, address: str, port: int, rank: int, world: int, backend: str,
                                timeout_s: float) -> list:
        """The broadcast transport: this engine's model worker joins the trainer's group."""
        return await self.engine.engine.collective_rpc("grove_join_group",
                                                       args=(address, port, rank, world, backend, timeout_s))

    async def set_weight_plan(self, plan: list) -> list:
        return await self.engine.engine.collective_rpc("grove_set_plan", args=(plan,))

    def _weights_sent(self, version: int) -> None:
        """From now on every request sent to the engine runs on `version`'s weights (it
        queues behind their load): release the groups held for them."""
        self.version = version
        released, self._new_weights = self._new_weights, asyncio.Event()
        released.set()

    # -- evaluation and stats ----------------------------------------------------------
    async def evaluate(self, rows: list[dict], prompt_key: str = "prompt") -> dict[str, float]:
        """Greedy held-out accuracy: the fraction of rows whose reward is at least 1 (and
        per difficulty, when rows have one)."""
        return (await self.evaluate_samples(rows, prompt_key))[0]

    async def evaluate_samples(self, rows: list[dict], prompt_key: str = "prompt") -> tuple[dict, list[dict]]:
        """`evaluate`'s metrics, and one record per row: prompt, response, reward, reward
        info, failure, finish reason (what `grove eval` writes)."""
        if not rows:
            raise ValueError("no held-out rows to evaluate (eval.max_rows, or an empty eval split)")

        async def one(row: dict) -> Trajectory:
            traj = Trajectory(prompt_id="eval", group_id="eval", prompt_ids=self.encode_prompt(row[prompt_key]))
            if self.cfg.eval_workflow:
                return await self.workflow.aevaluate(EvalEpisode(self), traj, row)
            return await self._sample(traj, self.cfg.eval_max_tokens, temperature=0.0)

        trajs = await asyncio.gather(*(one(row) for row in rows))
        texts = [self.tokenizer.decode(t.response_ids, skip_special_tokens=True) for t in trajs]
        requests = [RewardRequest(prompt=row[prompt_key], fields=row, response_ids=t.response_ids, response=text)
                    for row, t, text in zip(rows, trajs, texts)]
        scores = await self.rewards.ascore(requests)
        correct = [s.score is not None and s.score >= 1.0 for s in scores]
        metrics = {"eval/accuracy": sum(correct) / len(correct)}
        by_level: dict[str, list[bool]] = {}
        for row, ok in zip(rows, correct):
            if "difficulty" in row:
                by_level.setdefault(str(row["difficulty"]), []).append(ok)
        for level, oks in sorted(by_level.items()):
            metrics[f"eval/accuracy_difficulty_{level}"] = sum(oks) / len(oks)
        if self.cfg.eval_workflow:  # episodes whose environment failed: scored as they stood, and counted
            metrics["eval/env_failed"] = sum(bool(t.reward_info.get("env_failed")) for t in trajs) / len(trajs)
        records = [{"index": i, "prompt": row[prompt_key], "response": text, "reward": scored.score, "correct": ok,
                    "reward_info": dict(scored.info), "failure": scored.failure,
                    "failure_detail": scored.detail or None,
                    "finish_reason": t.finish_reason.value if t.finish_reason else None,
                    "response_tokens": t.num_response_tokens,
                    **({"episode_info": dict(t.reward_info)} if self.cfg.eval_workflow else {}),
                    "fields": {k: v for k, v in row.items() if k != prompt_key}}
                   for i, (row, t, text, scored, ok) in enumerate(zip(rows, trajs, texts, scores, correct))]
        return metrics, records

    def stats(self) -> dict[str, float]:
        busy, requests = self.clock.read()
        return {
            **{f"rollout/{k}": float(v) for k, v in self.counts.items()},
            "rollout/in_flight_groups": float(len(self._tasks)),
            "rollout/tokens_generated": float(self._tokens_generated),
            "rollout/busy_s": busy,
            "rollout/request_s": requests,
            "rollout/uptime_s": time.perf_counter() - self._created,
            "rollout/version": float(self.version),
            **self.rewards.metrics(),
            **(self.workflow.metrics() if hasattr(self.workflow, "metrics") else {}),  # e.g. env/* (multiturn)
        }
