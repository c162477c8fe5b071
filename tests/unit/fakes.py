"""In-process engines for the orchestrator's unit tests, in virtual time.

`run_virtual(coro)` (trainer/virtual_time.py) runs a coroutine on an event loop whose
clock jumps to the next timer whenever nothing is ready, so a simulated minute of
generation and training takes milliseconds. `FakeRollout` and `FakeTrainer` implement the orchestrator's Protocols with
the behaviour the real engines promise (a group waits for its admission version's
weights; tokens are stamped with the weights that sampled them; updates apply in order;
APRIL's interrupt holds requests until the next weights) and check what the orchestrator
hands them (no trained token older than η).
"""

from __future__ import annotations

import asyncio
import inspect
import random
import zlib
from dataclasses import dataclass, field

from buffer.types import FinishReason, Group, Trajectory
from trainer.interfaces import EngineDied, StepHandle
from trainer.virtual_time import run_virtual  # noqa: F401 - the tests import it from here


@dataclass
class Collected:
    groups: list
    dropped: list
    partial: list


def _failing(error: BaseException):
    future = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future


def _done(value):
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


@dataclass
class FakeRollout:
    name: str = "rollout worker 0"
    seed: int = 0
    token_s: float = 0.01  # virtual seconds per token
    long_fraction: float = 0.2  # share of prompts answered with `long_tokens`
    short_tokens: int = 3
    long_tokens: int = 30
    sync_s: float = 0.005
    fail: dict = field(default_factory=dict)  # call name -> exception its next call raises
    die_after_tokens: int | None = None  # the engine dies (all its work lost) after this many tokens
    version: int = 0
    received: list = field(default_factory=list)  # versions of the weight updates, in order
    submitted: list = field(default_factory=list)  # (virtual time, item) for every item

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.tasks: dict[asyncio.Task, str] = {}
        self.out = Collected([], [], [])
        self.tokens = 0
        self._changed: asyncio.Event | None = None
        self._weights: asyncio.Event | None = None
        self._resume: asyncio.Event | None = None  # cleared while APRIL holds requests
        self.active: dict[str, int] = {}  # group id -> responses generating
        self.dead = False

    def _events(self) -> None:
        if self._changed is None:
            self._changed, self._weights, self._resume = asyncio.Event(), asyncio.Event(), asyncio.Event()
            self._resume.set()

    def _maybe_fail(self, call: str):
        if self.dead:
            return _failing(EngineDied(f"{self.name} is dead"))
        error = self.fail.pop(call, None)
        return None if error is None else _failing(error)

    def _die(self) -> None:
        """As a killed process: everything in flight is gone, every call fails from now on."""
        self.dead = True
        for task in list(self.tasks):
            task.cancel()
        self._changed.set()
        self._weights.set()
        self._resume.set()

    # -- RolloutClient ---------------------------------------------------------------
    def submit(self, items):
        self._events()
        if (f := self._maybe_fail("submit")) is not None:
            return f
        loop = asyncio.get_running_loop()
        for item in items:
            self.submitted.append((loop.time(), item))
            group = Group(item.group_id, item.prompt_id, item.prompt, item.row, start_version=item.start_version)
            group.trajectories = [Trajectory(item.prompt_id, item.group_id, [1]) for _ in range(item.n_samples)]
            self._spawn(group, item.start_version)
        return _done(len(items))

    def resume(self, groups, not_before):
        self._events()
        if (f := self._maybe_fail("resume")) is not None:
            return f
        for group in groups:
            self._spawn(group, not_before)
        return _done(len(groups))

    def interrupt(self):
        self._events()
        if (f := self._maybe_fail("interrupt")) is not None:
            return f
        self._resume.clear()  # held until the next weights, as a paused engine holds them
        return _done(sorted(gid for gid, n in self.active.items() if n))

    def collect(self, min_groups, timeout_s):
        self._events()
        if (f := self._maybe_fail("collect")) is not None:
            return f
        return asyncio.ensure_future(self._collect(min_groups, timeout_s))

    def update_weights(self, weights, version):
        self._events()
        if (f := self._maybe_fail("update_weights")) is not None:
            return f
        return asyncio.ensure_future(self._update(weights, version))

    def health(self):
        self._events()
        if (f := self._maybe_fail("health")) is not None:
            return f
        return _done(self.stats())

    def evaluate(self, rows):
        return _done({"eval/accuracy": 0.5})

    def stop(self):
        if (f := self._maybe_fail("stop")) is not None:
            return f
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        return _done(len(tasks))

    # -- the simulated engine --------------------------------------------------------
    def _spawn(self, group: Group, not_before: int) -> None:
        task = asyncio.ensure_future(self._episode(group, not_before))
        self.tasks[task] = group.group_id
        task.add_done_callback(lambda t: self.tasks.pop(t, None))

    def _length(self, group: Group) -> int:
        long = zlib.crc32(group.prompt_id.encode()) / 2**32 < self.long_fraction
        return self.long_tokens if long else self.short_tokens

    async def _episode(self, group: Group, not_before: int) -> None:
        while self.version < not_before:
            self._weights.clear()
            await self._weights.wait()
        self.active[group.group_id] = len(group.trajectories)
        await asyncio.gather(*(self._sample(t, self._length(group)) for t in group.trajectories))
        del self.active[group.group_id]
        for t in group.trajectories:
            t.reward = float(self.rng.random() < 0.5)
        self.out.groups.append(group)
        self._changed.set()

    async def _sample(self, traj: Trajectory, length: int) -> None:
        while traj.num_response_tokens < length:
            await self._resume.wait()
            await asyncio.sleep(self.token_s)
            if not self._resume.is_set():
                continue  # held before this token was sampled
            traj.append_tokens([7], [-0.5], self.version)
            self.tokens += 1
            if self.die_after_tokens is not None and self.tokens >= self.die_after_tokens and not self.dead:
                self._die()
        traj.finish_reason = FinishReason.STOP

    async def _collect(self, min_groups: int, timeout_s: float) -> Collected:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.out.groups) + len(self.out.dropped) + len(self.out.partial) < min_groups:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
            if self.dead:
                break
        if self.dead:
            raise EngineDied(f"{self.name} is dead")
        out, self.out = self.out, Collected([], [], [])
        return out

    async def _update(self, weights, version: int) -> dict:
        payload = await weights if inspect.isawaitable(weights) else weights
        await asyncio.sleep(self.sync_s)
        if self.dead:
            raise EngineDied(f"{self.name} is dead")
        # as the real worker: versions only move forward (a replacement that started on a
        # newer version than a push already under way skips it)
        assert version > self.version, f"{self.name}: update to {version} while at {self.version}"
        assert payload == ("weights", version) or payload is None, payload
        self.version = version
        self.received.append(version)
        self._weights.set()
        self._resume.set()
        return {"weight_sync_apply_s": self.sync_s, "weight_sync_drain_s": 0.0, "weight_sync_load_s": self.sync_s,
                "weight_bytes": 100, "requests_interrupted": 0, "stats": self.stats()}

    def stats(self) -> dict[str, float]:
        return {"rollout/samples_interrupted": 0.0, "rollout/tokens_generated": float(self.tokens),
                "rollout/busy_s": 0.0, "rollout/request_s": 0.0, "rollout/version": float(self.version),
                "rollout/uptime_s": asyncio.get_running_loop().time(),
                "rollout/in_flight_groups": float(len(self.tasks)), "reward/failure_rate": 0.0}


@dataclass
class FakeTrainer:
    eta: int
    name: str = "trainer"
    step_s: float = 0.05
    fail: dict = field(default_factory=dict)
    version: int = 0
    completed: int = 0  # versions whose step has ended (what a new worker starts from)
    max_group_size: int = 0
    batches: list = field(default_factory=list)  # group ids of every batch, in order
    ages: list = field(default_factory=list)  # age of every trained token

    def train_step(self, groups) -> StepHandle:
        if (error := self.fail.pop("train_step", None)) is not None:
            # both results carry the step's error, as Ray's two refs do (each its own copy)
            return StepHandle(_failing(error), _failing(type(error)(*error.args)))
        metrics = asyncio.ensure_future(self._step(groups))
        return StepHandle(metrics, asyncio.ensure_future(self._export(metrics)))

    async def _step(self, groups) -> dict[str, float]:
        version = self.version
        self.version += 1  # steps run one at a time: the orchestrator waits for each
        for g in groups:
            for t in g.trajectories:
                trained = [version - v for v, m in zip(t.versions, t.loss_mask) if m]
                assert all(age <= self.eta for age in trained), (g.group_id, version, t.versions, t.loss_mask)
                self.ages += trained
        self.batches.append([g.group_id for g in groups])
        self.max_group_size = max(self.max_group_size, *(g.num_samples for g in groups))
        await asyncio.sleep(self.step_s)
        self.completed = version + 1
        versions = [v for g in groups for t in g.trajectories for v in t.versions]
        return {"train/num_tokens": float(sum(t.num_response_tokens for g in groups for t in g.trajectories)),
                "train/reward_mean": 0.5, "train/loss": 0.0, "batch/version_min": float(min(versions)),
                "batch/version_max": float(max(versions))}

    async def _export(self, metrics) -> tuple[str, int]:
        await metrics
        return ("weights", self.version)

    def save(self, path):
        return _done(None)


@dataclass
class FakeFactory:
    """Replaces a dead FakeRollout with a new one holding the trainer's newest weights."""

    trainer: FakeTrainer
    start_s: float = 0.5
    made: list = field(default_factory=list)

    def restart(self, index: int):
        return asyncio.ensure_future(self._start(index))

    async def _start(self, index: int) -> FakeRollout:
        await asyncio.sleep(self.start_s)
        worker = FakeRollout(name=f"rollout worker {index}", seed=100 + len(self.made))
        worker._events()
        worker.version = self.trainer.completed
        self.made.append(worker)
        return worker


class RecordingLogger:
    def __init__(self) -> None:
        self.logs: list[tuple[int, dict]] = []
        self.lines: list[str] = []
        self.samples: list[tuple[int, list[dict]]] = []
        self.on_log = None

    def log_samples(self, step, samples):
        self.samples.append((step, samples))

    def log(self, step, metrics, histograms=None):
        self.logs.append((step, dict(metrics)))
        if self.on_log is not None:
            self.on_log(step, metrics)

    def progress(self, text):
        self.lines.append(text)
