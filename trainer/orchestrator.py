"""The orchestrator: one class owns a run's state and drives the asynchronous loop.

    admit prompts while the staleness rule allows   ──>  rollout workers generate
    collect finished groups into the buffer         <──  (scored, versioned)
    when a batch is due and the trainer is idle: train one step on it
    when a step ends: its weights go to every worker (version v + 1)

Generation never stops for training. Admission follows the trainer's version: the
groups a step's end admits go to a worker at once, and it holds them until that step's
weights are on their way into its engine. Every decision is made by pure helpers (the
prompt sampler, `buffer.scheduler.RolloutScheduler`), and the engines are reached only
through `trainer.interfaces`, so the same code drives Ray actors in a run and
in-process fakes in the unit tests.

No call's result is dropped: a failed call (an exception in an engine, the trainer's
death) stops the run within seconds with a `RunError` that names the engine and the
call, shows the remote traceback and prints the ledger. A rollout worker that dies is
replaced instead, up to `max_restarts` times: the groups it was running are started
again from their prompt items (ledger `requeued`), and the new worker starts on the
trainer's newest weights; until it is up the others carry the load.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from buffer.prompts import PromptItem
from buffer.sampling import PromptSampler
from buffer.scheduler import RolloutScheduler
from trainer.interfaces import (EngineDied, RemoteCallError, RolloutClient, RolloutFactory, TrainerClient,
                                WeightTransport, describe_error)
from trainer.run_report import (budget_shares, masked_note, mean_stats, merge_worker_stats, sample_row, step_line,
                                step_metrics)

COLLECT_TIMEOUT_S = 2.0  # a worker's collect returns at least this often, so a dead one is seen


class RunLogger(Protocol):
    def log(self, step: int, metrics: dict[str, float], histograms: dict[str, list] | None = None) -> None: ...

    def progress(self, text: str) -> None: ...

    # optional: `log_samples(step, samples)`, a few of a step's trained responses (see
    # `sample_rows`), every `LoopConfig.samples_every` versions


class RunError(RuntimeError):
    """The run stopped on a fault; the message says where, why, and what the ledger held."""


class WorkerLost(Exception):
    """Inside the loop: rollout worker `index` died during a call."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(f"rollout worker {index} died: {error}")
        self.index, self.error = index, error


@dataclass
class LoopConfig:
    """What the loop needs from the run's config (`from_config` maps a GroveConfig)."""

    total_steps: int
    batch_groups: int
    n_samples: int
    max_staleness: int
    overprovision: float = 1.0
    stragglers: str = "proceed"
    hold_on_interrupt: bool = True  # APRIL by pause: interrupted groups stay in the engine
    eval_every: int = 0
    max_restarts: int = 0  # rollout workers that may die and be replaced in a run
    samples_every: int = 0  # hand the logger a few trained responses every this many versions (0: never)
    samples_per_step: int = 4

    @classmethod
    def from_config(cls, cfg: Any) -> "LoopConfig":
        return cls(cfg.trainer.total_steps, cfg.trainer.batch_groups, cfg.rollout.n_samples,
                   cfg.buffer.max_staleness, cfg.rollout.overprovision, cfg.buffer.stragglers,
                   cfg.rollout.interrupt_by == "pause", cfg.eval.every_steps, cfg.rollout.max_restarts,
                   cfg.logger.samples_every, cfg.logger.samples_per_step)


@dataclass
class PendingSync:
    """A weight push on its way to the workers, with what the step it came from trained.
    Its task gives {worker index: result} for the workers that took it."""

    task: asyncio.Future | None
    version: int
    batch_ages: list[int]
    partial_ratio: float
    pass_rates: list[float] = field(default_factory=list)  # per group: share of responses with reward >= 1
    group_sizes: list[int] = field(default_factory=list)
    workflow_stats: dict[str, float] = field(default_factory=dict)  # the batch's groups' own stats, averaged
    samples: list[dict] = field(default_factory=list)  # a few of its responses, for the logger
    step_metrics: dict[str, float] | None = None  # set when the step's own result arrives
    started: float = 0.0  # when the step ended

    def state(self) -> dict[str, Any]:
        return {"version": self.version, "batch_ages": self.batch_ages, "partial_ratio": self.partial_ratio,
                "pass_rates": self.pass_rates, "group_sizes": self.group_sizes, "workflow_stats": self.workflow_stats}


@dataclass
class Accounting:
    """Idle and staleness bookkeeping, in seconds of the loop's clock."""

    trainer_idle: float = 0.0
    # Trainer idle time split by cause: a full batch is buffered but a straggler is due
    # (deadline wait), or too few groups have finished (the rollout is the bottleneck).
    straggler_wait: float = 0.0
    trained_tokens: float = 0.0
    loop_s: float = 0.0
    samples_by_label: dict = field(default_factory=dict)  # samples started per prompt difficulty label


class Orchestrator:
    def __init__(self, cfg: LoopConfig, sampler: PromptSampler, rollouts: Sequence[RolloutClient],
                 trainer: TrainerClient, transport: WeightTransport, logger: RunLogger,
                 eval_rows: Sequence[dict] = (), factory: RolloutFactory | None = None) -> None:
        if not rollouts:
            raise ValueError("the orchestrator needs at least one rollout client")
        self.cfg = cfg
        self.sampler = sampler
        self.rollouts = list(rollouts)
        self.trainer = trainer
        self.transport = transport
        self.logger = logger
        self.eval_rows = list(eval_rows)
        self.factory = factory
        self.sched = RolloutScheduler(cfg.batch_groups, cfg.n_samples, cfg.max_staleness, cfg.overprovision,
                                      cfg.stragglers)
        self.version = 0  # the trainer's; admission follows it
        self.queued: deque[PromptItem] = deque()  # drawn from the sampler, waiting for room
        self.syncs: deque[PendingSync] = deque()  # weight pushes in flight, oldest first
        self.acct = Accounting()
        self.down: dict[int, asyncio.Future] = {}  # dead rollout workers -> their replacement starting
        self.restarts = 0
        self._fired: set[asyncio.Future] = set()
        self._fault: asyncio.Future | None = None

    # -- calls ---------------------------------------------------------------------------
    def _call(self, engine: str, call: str, awaitable: Awaitable, worker: int | None = None) -> asyncio.Future:
        """A task for one engine call, whose failure names the engine and the call; the
        death of rollout worker `worker` comes out as `WorkerLost`, to be replaced."""

        async def checked():
            try:
                return await awaitable
            except EngineDied as err:
                if worker is None:
                    raise RemoteCallError(engine, call, err) from err
                raise WorkerLost(worker, err) from err
            except Exception as err:  # noqa: BLE001 - every failure is surfaced, named
                raise RemoteCallError(engine, call, err) from err

        return asyncio.ensure_future(checked())

    def _fire(self, worker: int, call: str, awaitable: Awaitable, on_result=None) -> None:
        """A call to a rollout worker whose result the loop does not wait for, checked all
        the same: a failure stops the run at the loop's next turn, a death replaces it."""
        task = self._call(self.rollouts[worker].name, call, awaitable, worker)
        self._fired.add(task)

        def done(t: asyncio.Future) -> None:
            self._fired.discard(t)
            if t.cancelled():
                return
            error = t.exception()
            if isinstance(error, WorkerLost):
                self._lost(error)
            elif error is not None:
                self._set_fault(error)
            elif on_result is not None:
                on_result(t.result())

        task.add_done_callback(done)

    def _set_fault(self, error: BaseException) -> None:
        if not self._fault.done():
            self._fault.set_exception(error)

    def _lost(self, lost: WorkerLost) -> None:
        """Rollout worker `lost.index` is dead: start its groups again and a replacement."""
        i = lost.index
        if i in self.down:
            return  # already being replaced
        self.restarts += 1
        if self.factory is None or self.restarts > self.cfg.max_restarts:
            self._set_fault(RemoteCallError(self.rollouts[i].name, "(any call)", RuntimeError(
                f"the worker died ({lost.error}); rollout.max_restarts={self.cfg.max_restarts} "
                f"replacements were allowed and {self.restarts - 1} used. Raise rollout.max_restarts to let "
                "the run replace more, or find why the workers die (their logs above: out of memory?)")))
            return
        items = self.sched.requeue_worker(i)
        self.queued.extendleft(reversed(items))
        self.logger.progress(f"{self.rollouts[i].name} died ({type(lost.error).__name__}); its {len(items)} "
                             f"groups start again elsewhere; replacement {self.restarts} of "
                             f"{self.cfg.max_restarts} starting")
        self.down[i] = self._call(self.rollouts[i].name, "restart", self.factory.restart(i))

    def _live(self) -> list[int]:
        return [i for i in range(len(self.rollouts)) if i not in self.down]

    # -- the loop ------------------------------------------------------------------------
    async def run(self) -> dict[str, int]:
        """Train `total_steps` versions; returns the ledger's summary. Raises `RunError`."""
        loop = asyncio.get_running_loop()
        self._fault = loop.create_future()
        tasks: list[asyncio.Future] = []
        try:
            return await self._run(loop, tasks)
        except RunError:
            raise
        except Exception as err:  # noqa: BLE001 - a fault anywhere ends the run, named
            raise RunError(f"{describe_error(err)}\nledger at the fault: {self._ledger_now()}") from err
        finally:  # nothing left running, and no failure left unretrieved (asyncio would log it)
            syncs = [s.task for s in self.syncs if s.task is not None]
            for future in [*tasks, *self._fired, *syncs, *self.down.values(), self._fault]:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()

    def _ledger_now(self) -> dict[str, int]:
        return {**self.sched.ledger.as_dict(), "running": len(self.sched.running),
                "buffered": len(self.sched.buffer), "partial_pool": len(self.sched.partial_pool),
                "lost": self.sched.lost()}

    async def _run(self, loop: asyncio.AbstractEventLoop, tasks: list) -> dict[str, int]:
        cfg, now = self.cfg, loop.time
        first = await asyncio.gather(*(self._call(c.name, "health", c.health()) for c in self.rollouts))
        first_stats = last_stats = dict(enumerate(first))
        collects = {i: self._collect(i) for i in range(len(self.rollouts))}
        train_task: asyncio.Future | None = None
        eval_task: asyncio.Future | None = None
        start = last_time = trainer_idle_since = idle_mark = now()
        full_batch_waiting = False
        while self.version < cfg.total_steps or self.syncs or eval_task is not None:
            if self.version < cfg.total_steps:
                self._admit()
                if train_task is None:
                    train_task = self._start_step(now())
                    if train_task is not None:
                        self.acct.trainer_idle += now() - trainer_idle_since
            sync_task = self.syncs[0].task if self.syncs else None
            tasks[:] = [t for t in (*collects.values(), train_task, sync_task, eval_task, *self.down.values())
                        if t is not None]
            await asyncio.wait([*tasks, self._fault], return_when=asyncio.FIRST_COMPLETED)
            if self._fault.done():
                raise self._fault.exception()
            t = now()
            if train_task is None and full_batch_waiting and self.version < cfg.total_steps:
                self.acct.straggler_wait += t - idle_mark
            idle_mark = t
            for i, task in list(collects.items()):
                if task.done():
                    del collects[i]
                    if isinstance(task.exception(), WorkerLost):
                        self._lost(task.exception())
                        continue
                    self._absorb(task.result())
                    collects[i] = self._collect(i)
            for i, replacement in list(self.down.items()):
                if replacement.done():
                    self.rollouts[i] = replacement.result()  # a failed restart raises here
                    del self.down[i]
                    collects[i] = self._collect(i)
                    self.logger.progress(f"{self.rollouts[i].name} replaced; at work again")
            full_batch_waiting = self.sched.buffer.num_samples >= self.sched.batch_size
            step_ended = sync_task is not None and sync_task.done() and self.syncs[0].step_metrics is None
            if train_task is not None and (train_task.done() or step_ended):
                metrics = await train_task  # weights that arrived came from a step that has ended
                self.acct.trained_tokens += metrics["train/num_tokens"]
                train_task, trainer_idle_since = None, now()
                self.version += 1
                self.syncs[-1].step_metrics, self.syncs[-1].started = metrics, now()
            if sync_task is not None and sync_task.done():
                done, results = self.syncs.popleft(), sync_task.result()
                if results:  # (no worker took it if every one died meanwhile)
                    t = now()
                    self._log_step(done, results, last_stats, t - last_time, t - start, t - done.started)
                    last_stats, last_time = {i: r["stats"] for i, r in results.items()}, t
                if cfg.eval_every and done.version % cfg.eval_every == 0 and done.version < cfg.total_steps:
                    eval_task = self._evaluate()
            if eval_task is not None and eval_task.done():
                eval_task = self._evaluated(eval_task)
        return await self._finish(collects, first_stats, now() - start)

    def _collect(self, i: int) -> asyncio.Future:
        client = self.rollouts[i]
        return self._call(client.name, "collect", client.collect(1, COLLECT_TIMEOUT_S), i)

    def _evaluate(self) -> asyncio.Future | None:
        live = self._live()
        if not live:
            return None
        client = self.rollouts[live[0]]
        return self._call(client.name, "evaluate", client.evaluate(self.eval_rows), live[0])

    def _evaluated(self, task: asyncio.Future) -> None:
        if isinstance(task.exception(), WorkerLost):
            self._lost(task.exception())
            self.logger.progress(f"step {self.version}: held-out evaluation skipped (its worker died)")
            return None
        result = task.result()
        self.logger.log(self.version, result)
        self.logger.progress(f"step {self.version}: held-out accuracy {result['eval/accuracy']:.3f}")
        return None

    # -- decisions -------------------------------------------------------------------------
    def _loads(self) -> dict[int, int]:
        """Samples in flight per live worker (groups go by load, not in turn)."""
        load = dict.fromkeys(self._live(), 0)
        for running in self.sched.running.values():
            if running.worker in load:
                load[running.worker] += running.samples
        return load

    def _admit(self) -> None:
        """Resume partial groups first, then start new prompt items while there is room."""
        load = self._loads()
        if not load:
            return  # every worker is being replaced

        def least_loaded(samples: int) -> int:  # and count the new samples there
            worker = min(load, key=load.__getitem__)
            load[worker] += samples
            return worker

        worker = min(load, key=load.__getitem__)
        resume, _ = self.sched.partials_to_resume(self.version, worker)
        if resume:
            self._fire(worker, "resume", self.rollouts[worker].resume(resume, self.version))
        by_worker: dict[int, list[PromptItem]] = {}
        urgent = getattr(self.sampler, "urgent", None)
        for item in urgent(self.version) if urgent else ():  # extensions of groups admitted already
            worker = least_loaded(item.n_samples)
            by_worker.setdefault(worker, []).append(item)
            self.sched.started([item], worker)
        room = self.sched.capacity(self.version)
        while room > 0:
            if not self.queued:
                self.queued.extend(self.sampler.next(max(1, room // self.cfg.n_samples), self.version))
                if not self.queued:
                    break  # the sampler has nothing to start now
            item = self.queued.popleft()
            item.start_version = self.version
            room -= item.n_samples
            label = str(item.row.get("difficulty", "none"))
            self.acct.samples_by_label[label] = self.acct.samples_by_label.get(label, 0) + item.n_samples
            worker = least_loaded(item.n_samples)
            by_worker.setdefault(worker, []).append(item)
            self.sched.started([item], worker)
        for worker, items in by_worker.items():
            self._fire(worker, "submit", self.rollouts[worker].submit(items))

    def _absorb(self, got: Any, final: bool = False) -> None:
        """File a worker's hand-over. An extension's samples are merged into the group they
        extend first. The sampler then sees every finished group and says which to train
        on, and which it holds for more samples (at the end of a run everything is filed
        as it is)."""
        groups = [self.sched.merge_extension(g) if self.sched.is_extension(g.group_id) else g for g in got.groups]
        kept, held = groups, set()
        if not final:
            kept = self.sampler.observe(list(groups))
            holding = getattr(self.sampler, "holding", None)
            held = set(holding()) if holding else set()
        ids = {g.group_id for g in groups}
        kept_ids = {g.group_id for g in kept}
        if not kept_ids <= ids:
            raise RuntimeError(f"prompt sampler {type(self.sampler).__name__}.observe returned groups it was "
                               f"not given: {sorted(kept_ids - ids)[:3]}")
        for group in groups:
            if group.group_id in held and group.group_id not in kept_ids:
                self.sched.hold_for_extension(group)
        filtered = [gid for gid in ids if gid not in kept_ids and gid not in held]
        self.sched.absorb(kept, got.dropped, got.partial, filtered)

    def _start_step(self, now: float) -> asyncio.Future | None:
        """Hand the trainer a batch if one is due; its weights are pushed as soon as it ends."""
        batch = self.sched.next_batch(self.version)
        if batch is None:
            return None
        live = self._live()
        if self.sched.april:  # stop what is generating until the next weights
            hold = self.sched.hold_running if self.cfg.hold_on_interrupt else None
            for i in live:
                self._fire(i, "interrupt", self.rollouts[i].interrupt(), on_result=hold)
        trained = self._trimmed(batch)
        step = self.trainer.train_step(trained)
        version = self.version + 1
        pushes = self.transport.push(step.weights, version, [self.rollouts[i] for i in live])
        sync = asyncio.ensure_future(self._pushed(dict(zip(live, pushes))))
        pass_rates = [sum(r is not None and r >= 1.0 for r in g.rewards) / g.num_samples for g in batch]
        self.syncs.append(PendingSync(sync, version, [self.version - g.start_version for g in batch],
                                      self.sched.partial_ratio(batch), pass_rates, [g.num_samples for g in trained],
                                      mean_stats([g.stats for g in batch]),
                                      self._sample_rows(trained, version), started=now))
        return self._call(self.trainer.name, "train_step", step.metrics)

    def _trimmed(self, batch: list) -> list:
        """The batch as the trainer gets it: a sampler with `trim` (D³S) keeps part of each
        group's samples; the rest count in the ledger (`samples_trimmed`), the group stays one
        consumed group. Pass rates are logged from the whole groups."""
        trim = getattr(self.sampler, "trim", None)
        if trim is None:
            return batch
        trained = [trim(g, self.version) for g in batch]
        for before, after in zip(batch, trained):
            uids = {t.uid for t in before.trajectories}
            if after.group_id != before.group_id or not after.trajectories or not all(
                    t.uid in uids for t in after.trajectories):
                raise RuntimeError(f"prompt sampler {type(self.sampler).__name__}.trim must return group "
                                   f"{before.group_id} with a non-empty subset of its own samples")
        self.sched.ledger.samples_trimmed += sum(b.num_samples - a.num_samples for b, a in zip(batch, trained))
        return trained

    async def _pushed(self, pushes: dict[int, Awaitable]) -> dict[int, dict]:
        """The push's result from every worker that took it; a worker that died meanwhile is
        replaced (its successor starts on the newest weights) instead of failing the push."""
        calls = {i: self._call(self.rollouts[i].name, "update_weights", p, i) for i, p in pushes.items()}
        try:
            await asyncio.wait(calls.values())
        finally:  # cancelled with the run: leave no call running and no failure unretrieved
            for call in calls.values():
                if not call.done():
                    call.cancel()
                elif not call.cancelled():
                    call.exception()
        results = {}
        for i, call in calls.items():
            if isinstance(call.exception(), WorkerLost):
                self._lost(call.exception())
            else:
                results[i] = call.result()  # another failure raises: the run stops
        return results

    # -- reporting -------------------------------------------------------------------------
    def _sample_rows(self, batch: list, version: int) -> list[dict]:
        """A few of the batch's responses (the first of each of its first groups) when this
        version is one the logger samples at."""
        every = self.cfg.samples_every
        if not every or version % every or not hasattr(self.logger, "log_samples"):
            return []
        return [sample_row(g, version - 1) for g in batch[: self.cfg.samples_per_step]]

    def _log_step(self, done: PendingSync, results: dict[int, dict], last: dict[int, dict], wall: float,
                  elapsed: float, sync_s: float) -> None:
        elapsed = max(elapsed, 1e-9)
        self.sched.ledger.samples_interrupted = int(sum(r["stats"]["rollout/samples_interrupted"]
                                                        for r in results.values()))
        metrics = step_metrics(done.step_metrics, results, last, wall, {
            "weight_sync/total_s": sync_s,
            "trainer/idle_ratio": self.acct.trainer_idle / elapsed,
            "trainer/straggler_wait_ratio": self.acct.straggler_wait / elapsed,
            "batch/partial_ratio": done.partial_ratio,
            "staleness/group_age_max": float(max(done.batch_ages)),
            "staleness/group_age_mean": sum(done.batch_ages) / len(done.batch_ages),
            "buffer/groups": float(len(self.sched.buffer)),
            "buffer/partial_groups": float(len(self.sched.partial_pool)),
            "rollout/workers_live": float(len(self._live())),
            "rollout/restarts": float(self.restarts),
            "batch/samples_per_group_mean": sum(done.group_sizes) / max(len(done.group_sizes), 1),
            "batch/samples_per_group_max": float(max(done.group_sizes, default=0)),
            "batch/pass_rate_mean": sum(done.pass_rates) / max(len(done.pass_rates), 1),
            **budget_shares(self.acct.samples_by_label),
            **done.workflow_stats,
            **self.sampler.metrics(),
            **{f"ledger/{k}": float(v) for k, v in self.sched.ledger.as_dict().items()},
        })
        self.logger.log(done.version, metrics, histograms={"staleness/group_age_hist": done.batch_ages,
                                                           "batch/pass_rate_hist": done.pass_rates})
        if done.samples:
            self.logger.log_samples(done.version, done.samples)
        self.logger.progress(step_line(done.version, self.cfg.total_steps, metrics))

    async def _finish(self, collects: dict[int, asyncio.Future], first_stats: dict[int, dict],
                      wall: float) -> dict:
        """Cancel what is still generating, file everything, check the ledger."""
        live = self._live()
        stops = [self._call(self.rollouts[i].name, "stop", self.rollouts[i].stop()) for i in live]
        cancelled = sum(await asyncio.gather(*stops))
        for i in live:
            client = self.rollouts[i]
            for task in (collects[i], self._call(client.name, "collect", client.collect(0, 0.0))):
                self._absorb(await task, final=True)
        if cancelled != len(self.sched.running):
            raise RuntimeError(f"workers cancelled {cancelled} groups but the orchestrator counts "
                               f"{len(self.sched.running)} running")
        healths = await asyncio.gather(*(self._call(self.rollouts[i].name, "health", self.rollouts[i].health())
                                         for i in live))
        stats = merge_worker_stats(list(healths))
        first = merge_worker_stats(list(first_stats.values()))
        self.acct.loop_s = wall = max(wall, 1e-9)
        summary = self.sched.summary(cancelled)
        self.logger.log(self.version, {
            "run/rollout_idle_ratio": 1 - (stats["rollout/busy_s"] - first["rollout/busy_s"]) / (wall * len(live)),
            "run/trainer_idle_ratio": self.acct.trainer_idle / wall, "run/loop_s": wall,
            "run/trainer_straggler_wait_ratio": self.acct.straggler_wait / wall,
            "run/rollout_concurrency_mean": (stats["rollout/request_s"] - first["rollout/request_s"]) / wall,
            "run/rollout_restarts": float(self.restarts),
            **{f"ledger/{k}": float(v) for k, v in summary.items()}})
        self.logger.progress(f"ledger: {summary}")
        note = masked_note(summary["masked_tokens"], self.acct.trained_tokens, self.cfg.max_staleness,
                           self.sched.april)
        if note:
            self.logger.progress(note)
        if summary["lost"] != 0:
            raise RuntimeError(f"the ledger does not balance: {summary}")
        return summary

    # -- checkpoint --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The run's state as plain data (JSON-ready): version, sampler, scheduler and ledger,
        prompt items drawn but not started, weight pushes in flight, accounting. The
        engines' own state (weights, optimizer, requests in flight) is not part of it."""
        return {
            "version": self.version,
            "sampler": self.sampler.state_dict(),
            "scheduler": self.sched.state_dict(),
            "queued": [item.to_dict() for item in self.queued],
            "syncs": [s.state() for s in self.syncs],
            "accounting": asdict(self.acct),
            "restarts": self.restarts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = state["version"]
        self.sampler.load_state_dict(state["sampler"])
        self.sched.load_state_dict(state["scheduler"])
        self.queued = deque(PromptItem.from_dict(item) for item in state["queued"])
        self.syncs = deque(PendingSync(None, **s) for s in state["syncs"])
        self.acct = Accounting(**state["accounting"])
        self.restarts = state["restarts"]
