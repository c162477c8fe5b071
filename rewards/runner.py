"""The reward runner: scores samples with the configured rewards in isolated worker processes.

::

    runner = RewardRunner(RewardConfig(functions=[RewardFunctionConfig("math_verify")]))
    runner.check_signatures(dataset[0])          # at start-up, before any GPU time is spent
    runner.probe(dataset[0])                     # ... and call each reward once on that row
    scored = await runner.ascore([RewardRequest(prompt, response, fields=row), ...])
    scored, keep = await runner.ascore_group(requests_of_one_prompt)   # group rewards, drop_group

Every failure is contained and marked (:data:`rewards.api.FAILURE_KINDS`), never turned into a
silent 0.0: an exception, a timeout (the worker is killed: CPU-bound code cannot hide from it),
NaN or inf, a non-number, an oversized result, or a worker that died. A dead or killed worker
is replaced. The failure policy (``on_failure``) decides what a failed sample scores:

* ``"score"``: ``failure_score`` (default 0.0), still marked as failed, training goes on;
* ``"drop_group"``: ``ascore_group`` returns ``keep_group=False`` for a group with any failure;
* ``"stop"``: like ``"score"``, but ``max_consecutive_failures`` failed samples in a row raise
  :class:`RewardFailureError` naming the reward and the last error.

Under every policy, more than ``max_failure_rate`` failed samples among the last
``failure_window`` scored ones raise :class:`RewardAlarmError` (once the window holds
``failure_min_samples``), naming the failing rewards.

Costs: the runner sends batches of up to ``max_batch_size`` samples to a worker, which sends
one small message back per sample; a trivial reward costs tens of microseconds per sample
(``python scripts/bench_rewards.py``). ``timeout_s`` bounds the scoring of one sample (all its
per-sample rewards together; for a group reward, the whole group's call).

Sync rewards run one sample at a time in a worker's main thread. After a timeout the runner
turns *suspect*: the samples still to score in that call (up to ``_PARALLEL_MAX`` = 256 per
batch) go to a worker that runs each in a thread of its own and times them out itself, so a
reward that always hangs costs about two timeouts per call, not one per sample. A worker that timed
out a thread is replaced; a parallel batch without a timeout ends the suspect mode.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import weakref
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from multiprocessing.connection import Connection
from typing import Any

from rewards.api import (
    FAILURE_KINDS,
    RewardSpec,
    ScoredSample,
    _plain,
    check_reward_signature,
    is_async_reward,
)
from rewards._worker import Scorer

__all__ = [
    "RewardAlarmError",
    "RewardConfig",
    "RewardFailureError",
    "RewardFunctionConfig",
    "RewardProbeError",
    "RewardRequest",
    "RewardRunner",
    "RewardWorkerError",
]

_POLICIES = ("score", "drop_group", "stop")
#: most samples sent to one worker at once in the parallel (suspect) mode, one thread each
_PARALLEL_MAX = 256
#: how much of a failure's detail the alarm and the probe quote
_DETAIL_CHARS = 1500
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER_BOOT = (
    "import os, sys\n"
    "try:\n"
    "    import ctypes\n"
    "    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the runner\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != {ppid}:\n"
    "    sys.exit(0)\n"
    "sys.path.insert(0, {root!r})\n"
    "from rewards._worker import main\n"
    "main({rfd}, {wfd})\n"
)


@dataclass
class RewardFunctionConfig:
    """One reward in the mix: ``fn`` is any spec (see :mod:`rewards.api`), ``kwargs`` are bound
    to it, ``weight`` multiplies its score, ``name`` labels it in logs (default: the function's
    name), ``group`` forces group mode (default: what its decorator says)."""

    fn: str = "exact_match"
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    group: bool | None = None


@dataclass
class RewardConfig:
    """How samples are scored. A plain dataclass: usable as a Hydra structured-config schema.

    The reward is ``sum(weight_i * reward_i)``. (DAPO's overlong shaping is the reward
    ``overlong_penalty``: list it in ``functions``.)
    """

    functions: list[RewardFunctionConfig] = field(default_factory=lambda: [RewardFunctionConfig()])
    #: worker processes (``isolated=True``); each scores one batch at a time
    num_workers: int = 1
    #: hard limit in seconds on scoring one sample (or one group, for group rewards)
    timeout_s: float = 5.0
    #: "score" | "drop_group" | "stop" (see module docstring)
    on_failure: str = "score"
    failure_score: float = 0.0
    max_consecutive_failures: int = 20
    #: raise RewardAlarmError when MORE than this share of the last ``failure_window`` scored
    #: samples failed (any policy); 1.0 disables the alarm
    max_failure_rate: float = 0.5
    failure_window: int = 256
    #: no alarm before the window holds this many samples
    failure_min_samples: int = 32
    #: a result (score + info) larger than this, pickled, is an "oversized" failure
    max_result_bytes: int = 65536
    #: False runs rewards in the caller's process: fast, for trusted code; exceptions, NaN etc.
    #: are still caught, async rewards still time out, but a hung sync reward hangs the caller
    isolated: bool = True
    #: folders added to sys.path (after the launching directory) to import reward modules
    search_paths: list[str] = field(default_factory=list)
    #: most samples sent to one worker at once
    max_batch_size: int = 32
    #: a worker must be ready within this (imports, warm-up) or start-up fails
    start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and what to set instead."""
        if self.on_failure not in _POLICIES:
            raise ValueError(f"reward.on_failure={self.on_failure!r}: choose one of {', '.join(_POLICIES)}")
        if self.num_workers < 1:
            raise ValueError(f"reward.num_workers={self.num_workers}: need at least 1")
        if not self.timeout_s > 0:
            raise ValueError(f"reward.timeout_s={self.timeout_s}: must be > 0 seconds")
        if self.max_consecutive_failures < 1:
            raise ValueError("reward.max_consecutive_failures must be >= 1")
        if self.max_batch_size < 1:
            raise ValueError("reward.max_batch_size must be >= 1")
        if not self.functions:
            raise ValueError("reward.functions is empty: list at least one reward, e.g. [{fn: exact_match}]")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ValueError(
                f"reward.max_failure_rate={self.max_failure_rate}: must be a share between 0 and 1 "
                f"(e.g. 0.5; 1.0 disables the failure alarm)"
            )
        if self.failure_window < 1:
            raise ValueError(f"reward.failure_window={self.failure_window}: must be >= 1 samples (default 256)")
        if not 1 <= self.failure_min_samples <= self.failure_window:
            raise ValueError(
                f"reward.failure_min_samples={self.failure_min_samples}: must be between 1 and "
                f"reward.failure_window={self.failure_window} (default 32); to disable the alarm, "
                f"set reward.max_failure_rate=1.0"
            )

    @classmethod
    def from_any(cls, cfg: Any) -> "RewardConfig":
        """Accept a :class:`RewardConfig`, a mapping (e.g. an OmegaConf ``DictConfig``) or None."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            cfg.validate()
            return cfg
        if not isinstance(cfg, Mapping):
            cfg = {f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}
        data = _plain(cfg)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown reward config key(s) {unknown}; valid keys: {sorted(known)}")
        if "functions" in data:
            data["functions"] = [_function_config(f) for f in data["functions"]]
        return cls(**data)


def _function_config(entry: Any) -> RewardFunctionConfig:
    if isinstance(entry, RewardFunctionConfig):
        return entry
    if isinstance(entry, str):
        return RewardFunctionConfig(fn=entry)
    if isinstance(entry, Mapping):
        entry = dict(entry)
        if "_target_" in entry:
            target = entry.pop("_target_")
            return RewardFunctionConfig(fn=target, kwargs=entry)
        known = {f.name for f in fields(RewardFunctionConfig)}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in reward function entry {entry}; valid: {sorted(known)}")
        return RewardFunctionConfig(**entry)
    raise ValueError(f"a reward.functions entry must be a spec string or a dict, got {entry!r}")


@dataclass
class RewardRequest:
    """One sample to score: the prompt and response text, the dataset row's fields, and
    optionally token ids and the finish reason. ``prompt``/``response``/... win over row
    fields of the same name."""

    prompt: str
    response: str
    fields: dict = field(default_factory=dict)
    prompt_ids: list[int] | None = None
    response_ids: list[int] | None = None
    finish_reason: str | None = None


class RewardFailureError(RuntimeError):
    """Raised under ``on_failure="stop"`` after ``max_consecutive_failures`` failures in a row."""


class RewardWorkerError(RuntimeError):
    """A reward worker process could not start (the rewards fail to import in a fresh process)."""


class RewardAlarmError(RuntimeError):
    """More than ``max_failure_rate`` of the last ``failure_window`` scored samples failed."""


class RewardProbeError(ValueError):
    """A reward failed when :meth:`RewardRunner.probe` called it on the first dataset row."""


class _Drain:
    """The work of one ``_run_items`` call: item indices still to send, shared by its tasks."""

    __slots__ = ("queue", "size", "parallel_ok")

    def __init__(self, n: int, size: int):
        self.queue: deque[int] = deque(range(n))
        self.size = size
        self.parallel_ok = True  # False after a parallel batch crashed or wedged its worker


def _describe_exit(rc: int | None) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


class _Worker:
    def __init__(self, proc: subprocess.Popen, rconn: Connection, wconn: Connection):
        self.proc = proc
        self.rconn = rconn
        self.wconn = wconn

    def kill(self) -> int | None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            rc = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            rc = None
        for c in (self.rconn, self.wconn):
            try:
                c.close()
            except OSError:
                pass
        return rc


def _kill_all(workers: list) -> None:
    for w in workers:
        if w is not None:
            w.kill()


class RewardRunner:
    """Scores :class:`RewardRequest` s with the rewards of a :class:`RewardConfig`.

    Construct it anywhere (no event loop needed; no process is started until the first call);
    use it from one event loop at a time. Resolving the specs imports the reward modules in
    this process too, so a bad spec fails here, with a clear message.
    """

    def __init__(self, cfg: RewardConfig | Mapping | None = None, *, example_row: Mapping | None = None,
                 cwd: str | None = None):
        self.cfg = RewardConfig.from_any(cfg)
        self._cwd = os.path.abspath(cwd or os.getcwd())
        self._specs: list[RewardSpec] = []
        self._weights: list[float] = []
        for fc in self.cfg.functions:
            self._specs.append(RewardSpec.parse(
                fc.fn, kwargs=fc.kwargs, name=fc.name, group=fc.group,
                search_paths=tuple(self.cfg.search_paths), cwd=self._cwd,
            ))
            self._weights.append(float(fc.weight))
        self._fns = [s.resolve() for s in self._specs]
        self._groups = [s.is_group(fn) for s, fn in zip(self._specs, self._fns)]
        self._async = [is_async_reward(fn) for fn in self._fns]
        self._names = self._unique_names([s.name for s in self._specs])
        self._sample_fns = [i for i, g in enumerate(self._groups) if not g]
        self._group_fns = [i for i, g in enumerate(self._groups) if g]
        self._concurrent = any(self._async)
        self._scorer = Scorer(self._fns, self._groups, self.cfg.max_result_bytes)
        params = self._scorer.params
        self._wanted: frozenset[str] | None = (
            None if any(params[i].var_keyword for i in self._sample_fns)
            else frozenset().union(*(params[i].names for i in self._sample_fns))
        )
        # worker pool (isolated mode)
        self._workers: list[_Worker | None] = [None] * self.cfg.num_workers
        self._idle: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
        self._warmed = False
        self._closed = False
        self._suspect = False  # a sync reward timed out: run the next batch in parallel mode
        # metrics
        self._consecutive = 0
        self._counts = {k: 0 for k in FAILURE_KINDS}
        self._samples = 0
        self._restarts = 0
        self._dropped_groups = 0
        self._window_latency: list[float] = []
        self._window_samples = 0
        self._window_failures = 0
        # the failure alarm: None for a scored sample, (reward, kind, detail) for a failed one
        self._recent: deque[tuple[str, str, str] | None] = deque(maxlen=self.cfg.failure_window)
        self._recent_failures = 0
        if example_row is not None:
            self.check_signatures(example_row)

    # ---- public API ------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The display names of the configured rewards, in config order."""
        return list(self._names)

    @property
    def has_group_rewards(self) -> bool:
        return bool(self._group_fns)

    def check_signatures(self, example_row: Mapping[str, Any]) -> None:
        """Check every reward can be called with this dataset row; raises
        :class:`rewards.api.RewardSignatureError` naming the function, its file, the missing
        parameters and the available fields."""
        for fn, group, name in zip(self._fns, self._groups, self._names):
            check_reward_signature(fn, example_row, group=group, name=name)

    async def ascore(self, requests: Sequence[RewardRequest]) -> list[ScoredSample]:
        """Score independent samples concurrently; one :class:`ScoredSample` per request, in order.

        Never raises for a failing sample (only :class:`RewardFailureError` under the "stop"
        policy). With group rewards configured, use :meth:`ascore_group`.
        """
        if self._group_fns:
            raise TypeError(
                f"group reward(s) {[self._names[i] for i in self._group_fns]} are configured: "
                f"score whole groups with ascore_group / ascore_groups"
            )
        if not requests:
            return []
        items = [("sample", self._sample_fns, self._sample_kwargs(r)) for r in requests]
        results = await self._run_items(items)
        combined = [self._combine(list(zip(self._sample_fns, res[0]))) for res in results]
        samples = [c[0] for c in combined]
        self._account(samples, [res[1] for res in results], [c[1] for c in combined])
        return samples

    async def ascore_group(self, requests: Sequence[RewardRequest]) -> tuple[list[ScoredSample], bool]:
        """Score the responses of one prompt; returns ``(samples, keep_group)``.

        ``keep_group`` is False only under ``on_failure="drop_group"`` when a sample failed.
        """
        return (await self.ascore_groups([requests]))[0]

    async def ascore_groups(
        self, groups: Sequence[Sequence[RewardRequest]]
    ) -> list[tuple[list[ScoredSample], bool]]:
        """:meth:`ascore_group` for several groups at once (all their work runs concurrently)."""
        items: list[tuple] = []
        layout = []
        for reqs in groups:
            first = len(items)
            if self._sample_fns:
                items += [("sample", self._sample_fns, self._sample_kwargs(r)) for r in reqs]
            group_item = None
            if self._group_fns and reqs:
                group_item = len(items)
                items.append(("group", self._group_fns, self._group_kwargs(reqs)))
            layout.append((first, group_item))
        results = await self._run_items(items) if items else []
        out = []
        for reqs, (first, group_item) in zip(groups, layout):
            samples, latencies, sources = [], [], []
            for k in range(len(reqs)):
                entries = []
                if self._sample_fns:
                    res = results[first + k]
                    entries += list(zip(self._sample_fns, res[0]))
                    latencies.append(res[1])
                if group_item is not None:
                    g_out, g_seconds = results[group_item]
                    for i, e in zip(self._group_fns, g_out):
                        entries.append((i, e[1][k] if e[0] == "group" else e))
                    if not self._sample_fns:
                        latencies.append(g_seconds / max(1, len(reqs)))
                sample, source = self._combine(entries)
                samples.append(sample)
                sources.append(source)
            keep = not (self.cfg.on_failure == "drop_group" and any(s.failed for s in samples))
            if not keep:
                self._dropped_groups += 1
            self._account(samples, latencies, sources)
            out.append((samples, keep))
        return out

    def score(self, requests: Sequence[RewardRequest]) -> list[ScoredSample]:
        """Synchronous :meth:`ascore`, for scripts and tests (not inside a running event loop)."""
        return asyncio.run(self.ascore(requests))

    def probe(self, row: Mapping[str, Any], prompt_key: str = "prompt", response: str | None = None) -> None:
        """The start-up check: call every reward once on one dataset row (row 0 by convention).

        The request is ``prompt=row[prompt_key]``, ``response`` (default: ``str(row["answer"])``
        when the row has an ``answer``, else ``""``) and the row's fields; group rewards get a
        group of that one response. Raises :class:`rewards.api.RewardSignatureError` if a reward
        cannot take the row, and :class:`RewardProbeError` naming each reward that failed on it
        (exception, timeout, nan, ...). Synchronous; starts the isolated workers (which then
        stay up). The probe is a check, not training data: it feeds neither :meth:`metrics` nor
        the failure alarm. Call it before scoring starts, not while scoring calls are in flight.
        """
        if prompt_key not in row:
            raise ValueError(
                f"reward start-up check: the first dataset row has no field {prompt_key!r} (the prompt key); "
                f"its fields: {sorted(row)}"
            )
        self.check_signatures(row)
        if response is None:
            response = str(row["answer"]) if "answer" in row else ""
        prompt = row[prompt_key]
        req = RewardRequest(prompt=prompt, response=response, fields=dict(row))
        items: list[tuple] = []
        if self._sample_fns:
            items.append(("sample", self._sample_fns, self._sample_kwargs(req)))
        if self._group_fns:
            items.append(("group", self._group_fns, self._group_kwargs([req])))
        saved = (self._restarts, self._suspect)
        try:
            results = _run_sync(self._run_items(items))
        finally:
            self._restarts, self._suspect = saved
        entries: list[tuple[int, tuple]] = []
        if self._sample_fns:
            entries += zip(self._sample_fns, results[0][0])
        if self._group_fns:
            for i, e in zip(self._group_fns, results[-1][0]):
                entries.append((i, e[1][0] if e[0] == "group" else e))
        failed = [(self._names[i], e[1], e[2]) for i, e in entries if e[0] == "fail"]
        if not failed:
            return
        shown = repr(prompt)
        if len(shown) > 200:
            shown = shown[:200] + "..."
        lines = [
            f"the reward start-up check failed: it calls each reward once on the first dataset row "
            f"(row 0, prompt {shown}, response {response[:200]!r}), and {len(failed)} of "
            f"{len(entries)} reward(s) failed on it:"
        ]
        for name, kind, detail in failed:
            lines.append(f"- reward {name!r}: {kind} on row 0:\n{_tail(detail)}")
        lines.append("Fix the reward (or its kwargs in reward.functions, or the dataset row) before training.")
        raise RewardProbeError("\n".join(lines))

    def metrics(self) -> dict[str, float]:
        """Counters for logging.

        Cumulative: ``reward/samples``, ``reward/failures/<kind>`` for every kind,
        ``reward/failures/total``, ``reward/worker_restarts``, ``reward/dropped_groups``.
        Since the previous call: ``reward/failure_rate``, ``reward/latency_ms/mean`` and
        ``/max`` (time inside the reward functions per sample).
        """
        m = {"reward/samples": float(self._samples)}
        for k, v in self._counts.items():
            m[f"reward/failures/{k}"] = float(v)
        m["reward/failures/total"] = float(sum(self._counts.values()))
        m["reward/worker_restarts"] = float(self._restarts)
        m["reward/dropped_groups"] = float(self._dropped_groups)
        lat = self._window_latency
        m["reward/latency_ms/mean"] = 1000.0 * sum(lat) / len(lat) if lat else 0.0
        m["reward/latency_ms/max"] = 1000.0 * max(lat) if lat else 0.0
        m["reward/failure_rate"] = self._window_failures / self._window_samples if self._window_samples else 0.0
        self._window_latency = []
        self._window_samples = self._window_failures = 0
        return m

    def close(self) -> None:
        """Kill the worker processes. Idempotent; also done at garbage collection and exit."""
        self._closed = True
        for slot, w in enumerate(self._workers):
            if w is not None:
                w.kill()
                self._workers[slot] = None

    def __enter__(self) -> "RewardRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> "RewardRunner":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    # ---- building calls and combining results ----------------------------------------------

    @staticmethod
    def _unique_names(names: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        out = []
        for n in names:
            seen[n] = seen.get(n, 0) + 1
            out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
        return out

    def _sample_kwargs(self, r: RewardRequest) -> dict[str, Any]:
        kw = dict(r.fields) if r.fields else {}
        kw.update(prompt=r.prompt, response=r.response, prompt_ids=r.prompt_ids,
                  response_ids=r.response_ids, finish_reason=r.finish_reason)
        if self._wanted is not None:
            kw = {k: v for k, v in kw.items() if k in self._wanted}
        return kw

    @staticmethod
    def _group_kwargs(reqs: Sequence[RewardRequest]) -> dict[str, Any]:
        kw = dict(reqs[0].fields) if reqs[0].fields else {}
        kw.update(
            prompt=reqs[0].prompt,
            responses=[r.response for r in reqs],
            prompt_ids=reqs[0].prompt_ids,
            response_ids=[r.response_ids for r in reqs],
            finish_reasons=[r.finish_reason for r in reqs],
        )
        return kw

    def _combine(self, entries: list[tuple[int, tuple]]) -> tuple[ScoredSample, str | None]:
        """The weighted sample, and the name of the reward that failed it (or None)."""
        total = 0.0
        info: dict[str, float] = {}
        single = len(self._fns) == 1
        for i, e in entries:
            if e[0] == "fail":
                return ScoredSample(None, {}, e[1], f"reward {self._names[i]!r}: {e[2]}"), self._names[i]
            _, score, fn_info = e
            total += self._weights[i] * score
            if single:
                info.update(fn_info)
            else:
                info[self._names[i]] = score
                for k, v in fn_info.items():
                    info[f"{self._names[i]}/{k}"] = v
        if not math.isfinite(total):
            return ScoredSample(None, {}, "nan", f"the weighted total is {total}"), "(weighted total)"
        return ScoredSample(total, info), None

    def _account(self, samples: list[ScoredSample], latencies: list[float], sources: list[str | None]) -> None:
        """Count, apply the failure policy (in request order), maybe stop or raise the alarm."""
        cfg = self.cfg
        self._samples += len(samples)
        self._window_samples += len(samples)
        self._window_latency.extend(latencies)
        recent = self._recent
        stop_with: ScoredSample | None = None
        for s, source in zip(samples, sources):
            if len(recent) == recent.maxlen and recent[0] is not None:
                self._recent_failures -= 1
            if not s.failed:
                recent.append(None)
                self._consecutive = 0
                continue
            recent.append((source or "?", s.failure, s.detail))
            self._recent_failures += 1
            self._counts[s.failure] += 1
            self._window_failures += 1
            self._consecutive += 1
            s.score = None if cfg.on_failure == "drop_group" else cfg.failure_score
            if cfg.on_failure == "stop" and self._consecutive >= cfg.max_consecutive_failures and stop_with is None:
                stop_with = s
        if stop_with is not None:
            counts = {k: v for k, v in self._counts.items() if v}
            raise RewardFailureError(
                f"{self._consecutive} reward failures in a row (reward.max_consecutive_failures="
                f"{cfg.max_consecutive_failures}); the last was {stop_with.failure!r}: "
                f"{stop_with.detail[-1500:]}\nFailures so far: {counts}. Fix the reward, or set "
                f"reward.on_failure=score to score failed samples as {cfg.failure_score} and go on."
            )
        n = len(recent)
        if n >= cfg.failure_min_samples and self._recent_failures > cfg.max_failure_rate * n:
            self._raise_alarm()

    def _raise_alarm(self) -> None:
        cfg = self.cfg
        n, failed = len(self._recent), self._recent_failures
        kinds: dict[str, Counter] = {}
        example = None
        for entry in self._recent:
            if entry is not None:
                kinds.setdefault(entry[0], Counter())[entry[1]] += 1
                example = entry
        lines = [
            f"reward failure alarm: {failed} of the last {n} scored samples failed ({failed / n:.0%}), more "
            f"than reward.max_failure_rate={cfg.max_failure_rate} (window: the last "
            f"reward.failure_window={cfg.failure_window} samples). Failing rewards in this window:"
        ]
        for name, counts in kinds.items():
            lines.append(f"- reward {name!r}: " + ", ".join(f"{k} x{v}" for k, v in counts.most_common()))
        if example is not None:
            lines.append(f"Latest failure (reward {example[0]!r}, {example[1]}):\n{_tail(example[2])}")
        lines.append(
            "Fix the reward, or raise reward.max_failure_rate if this share of failures is expected "
            "(reward.max_failure_rate=1.0 disables this alarm)."
        )
        # a caller that catches the alarm and goes on starts a fresh window
        self._recent.clear()
        self._recent_failures = 0
        raise RewardAlarmError("\n".join(lines))

    # ---- execution -------------------------------------------------------------------------

    async def _run_items(self, items: list[tuple]) -> list[tuple[list[tuple], float]]:
        """Run ``(kind, fn_indices, kwargs)`` items; for each, ``(entries, seconds)``."""
        if self._closed:
            raise RuntimeError("RewardRunner is closed")
        if not self.cfg.isolated:
            return await self._run_inprocess(items)
        self._bind_loop()
        n = len(items)
        if not n:
            return []
        size = max(1, min(self.cfg.max_batch_size, math.ceil(n / self.cfg.num_workers)))
        results: list[Any] = [None] * n
        drain = _Drain(n, size)
        n_tasks = min(self.cfg.num_workers, math.ceil(n / size))
        tasks = [asyncio.ensure_future(self._drain(drain, items, results)) for _ in range(n_tasks)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:  # e.g. RewardWorkerError or cancellation: stop the other chunks too
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return results

    async def _run_inprocess(self, items: list[tuple]) -> list[tuple[list[tuple], float]]:
        if not self._warmed:
            for fn in self._fns:
                warm = getattr(getattr(fn, "func", fn), "__grove_warmup__", None)
                if warm is not None:
                    warm()
            self._warmed = True
        sc = self._scorer

        async def one(kind, fn_indices, kwargs):
            t0 = time.perf_counter()
            n_group = len(kwargs["responses"]) if kind == "group" else None
            out = []
            for i in fn_indices:
                if self._async[i]:
                    try:
                        out.append(await asyncio.wait_for(sc.call_async(i, kwargs, n_group), self.cfg.timeout_s))
                    except asyncio.TimeoutError:
                        out.append(("fail", "timeout", f"did not finish within timeout_s={self.cfg.timeout_s}"))
                else:
                    out.append(sc.call_sync(i, kwargs, n_group))
            return out, time.perf_counter() - t0

        return list(await asyncio.gather(*(one(*it) for it in items)))

    async def astart(self) -> None:
        """Start the isolated workers now instead of at the first score: each is a Python
        process importing the rewards, whose start-up would otherwise take CPU from the
        rollout in its first batches. Optional; in-process rewards run their warm-up hooks."""
        if self._closed:
            raise RuntimeError("RewardRunner is closed")
        if not self.cfg.isolated:
            await self._run_inprocess([])
            return
        self._bind_loop()
        slots = [await self._idle.get() for _ in range(self.cfg.num_workers)]  # no chunk runs meanwhile
        try:
            for slot in slots:
                await self._live_worker(slot)
        finally:
            for slot in slots:
                self._idle.put_nowait(slot)

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new loop (e.g. successive asyncio.run calls)
            self._loop = loop
            self._idle = asyncio.Queue()
            for slot in range(self.cfg.num_workers):
                self._idle.put_nowait(slot)

    async def _drain(self, drain: _Drain, items: list[tuple], results: list) -> None:
        """Take batches off the call's queue until it is empty: ``size`` items normally; in the
        suspect mode (sync rewards, after a timeout) all that remain, up to ``_PARALLEL_MAX``,
        run in parallel."""
        stalls = 0
        queue = drain.queue
        while queue:
            slot = await self._idle.get()
            try:
                if not queue:
                    return
                parallel = self._suspect and drain.parallel_ok and not self._concurrent
                take = min(len(queue), _PARALLEL_MAX if parallel else drain.size)
                idxs = [queue.popleft() for _ in range(take)]
                worker = await self._live_worker(slot)
                left, event = await self._exchange(slot, worker, idxs, items, results, parallel)
                if event == "timeout" and not self._concurrent:
                    self._suspect = True
                elif event == "clean":
                    self._suspect = False
                elif event == "broken":  # which item broke the worker is unknown: find it sequentially
                    drain.parallel_ok = False
            finally:
                self._idle.put_nowait(slot)
            stalls = stalls + 1 if left and len(left) == len(idxs) else 0
            if stalls >= 3:  # fresh workers keep failing before scoring anything: give up on these
                for i in left:
                    detail = "reward workers kept dying before scoring this sample"
                    results[i] = ([("fail", "crashed", detail)] * len(items[i][1]), 0.0)
                stalls = 0
                continue
            queue.extendleft(reversed(left))

    async def _live_worker(self, slot: int) -> _Worker:
        """The worker of a slot the caller holds: started if it is not, restarted if it died."""
        worker = self._workers[slot]
        if worker is None or worker.proc.poll() is not None:
            if worker is not None:
                worker.kill()
                self._restarts += 1
            worker = self._workers[slot] = await self._start_worker()
        return worker

    async def _start_worker(self) -> _Worker:
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        code = _WORKER_BOOT.format(ppid=os.getpid(), root=_REPO_ROOT, rfd=p2c_r, wfd=c2p_w)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", code], pass_fds=(p2c_r, c2p_w), stdin=subprocess.DEVNULL,
                cwd=self._cwd, start_new_session=True,
            )
        except BaseException:
            for fd in (p2c_w, c2p_r):
                os.close(fd)
            raise
        finally:
            os.close(p2c_r)
            os.close(c2p_w)
        worker = _Worker(proc, Connection(c2p_r, writable=False), Connection(p2c_w, readable=False))
        init = {
            "specs": self._specs, "groups": self._groups, "timeout_s": self.cfg.timeout_s,
            "max_result_bytes": self.cfg.max_result_bytes, "concurrent": self._concurrent,
        }
        try:
            worker.wconn.send(("init", init))
            msg = await self._recv(worker, self.cfg.start_timeout_s)
        except TimeoutError:
            worker.kill()
            raise RewardWorkerError(
                f"a reward worker was not ready within reward.start_timeout_s={self.cfg.start_timeout_s}s"
            ) from None
        except (EOFError, OSError):
            rc = worker.kill()
            raise RewardWorkerError(
                f"a reward worker exited during start-up ({_describe_exit(rc)}); see its stderr above"
            ) from None
        if msg[0] != "ready":
            worker.kill()
            raise RewardWorkerError(f"a reward worker could not load the rewards {self._names}:\n{msg[1]}")
        return worker

    async def _recv(self, worker: _Worker, timeout: float):
        """The next message from ``worker``; ``TimeoutError`` after ``timeout`` s, ``EOFError``
        if it died."""
        conn = worker.rconn
        if not conn.poll(0):
            loop = asyncio.get_running_loop()
            fut = loop.create_future()

            def wake(ok: bool) -> None:
                if not fut.done():
                    fut.set_result(ok)

            fd = conn.fileno()
            loop.add_reader(fd, wake, True)
            timer = loop.call_later(timeout, wake, False)
            try:
                if not await fut:
                    raise TimeoutError
            finally:
                loop.remove_reader(fd)
                timer.cancel()
        return conn.recv()

    def _send_batch(self, worker: _Worker, idxs: list[int], items: list[tuple], results: list,
                    parallel: bool = False) -> list[int]:
        """Send what pickles; mark the rest as failed. Returns the indices sent."""
        payload = [(i, *items[i]) for i in idxs]
        try:
            data = pickle.dumps(("batch", payload, parallel), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - find the samples whose fields do not pickle
            good = []
            for i in idxs:
                try:
                    pickle.dumps(items[i], protocol=pickle.HIGHEST_PROTOCOL)
                    good.append(i)
                except Exception as exc:  # noqa: BLE001
                    msg = f"the sample's fields cannot be sent to a worker process: {exc!r}"
                    results[i] = ([("fail", "exception", msg)] * len(items[i][1]), 0.0)
            idxs = good
            if not idxs:
                return []
            data = pickle.dumps(("batch", [(i, *items[i]) for i in idxs], parallel),
                                protocol=pickle.HIGHEST_PROTOCOL)
        worker.wconn.send_bytes(data)
        return idxs

    async def _exchange(self, slot: int, worker: _Worker, idxs: list[int], items: list[tuple],
                        results: list, parallel: bool = False) -> tuple[list[int], str | None]:
        """Run ``idxs`` on ``worker``; returns the indices still to run (after a kill) and what
        happened: ``"timeout"`` (a sample timed out), ``"clean"`` (a parallel batch without a
        timeout), ``"broken"`` (a parallel batch's worker died or wedged) or None."""
        try:
            idxs = self._send_batch(worker, idxs, items, results, parallel)
        except (BrokenPipeError, ConnectionError, OSError):
            # died while idle (e.g. killed from outside): not these samples' fault, retry them
            self._replace(slot)
            return idxs, None
        if not idxs:  # nothing could be sent (every sample's fields failed to pickle)
            return [], None
        pending = dict.fromkeys(idxs)
        if self._concurrent:
            timeout = self.cfg.timeout_s + 0.5
        elif parallel:
            # the worker times items out itself and sends a tick at least every timeout_s/4 or
            # 0.5 s: this only catches a worker wedged (e.g. C code holding the interpreter lock)
            timeout = 2 * self.cfg.timeout_s + 1.0
        else:
            timeout = self.cfg.timeout_s + 0.05
        timed_out = False
        try:
            try:
                ack = await self._recv(worker, timeout)
            except (TimeoutError, EOFError, OSError):
                ack = None
            if not ack or ack[0] != "ack":  # gone before taking the batch: not these samples' fault
                self._replace(slot)
                return idxs, None
            while pending:
                try:
                    msg = await self._recv(worker, timeout)
                except TimeoutError:
                    kind = "timeout"
                    detail = (f"did not finish within timeout_s={self.cfg.timeout_s}; its worker "
                              f"process was killed and replaced")
                except (EOFError, OSError):
                    kind = "crashed"
                    try:
                        rc = worker.proc.wait(timeout=1)
                    except subprocess.TimeoutExpired:
                        rc = None
                    detail = (f"the reward worker died while scoring this sample ({_describe_exit(rc)}); "
                              f"it was replaced")
                else:
                    if msg[0] == "tick":
                        continue
                    tag, item_id, out, seconds = msg
                    if item_id in pending:
                        results[item_id] = (out, seconds)
                        del pending[item_id]
                        timed_out = timed_out or tag == "timeout"
                    continue
                self._replace(slot)
                if parallel:
                    # Every pending sample was running: which one killed or wedged the worker is
                    # unknown. None is blamed; they go back, and the rest of this call runs
                    # sequentially, where the culprit is the sample that was running.
                    return list(pending), "broken"
                # Sync rewards run one sample at a time, in order: only the first pending sample
                # was running; the rest go to the new worker. Async rewards run together.
                guilty = list(pending) if self._concurrent else [next(iter(pending))]
                for i in guilty:
                    results[i] = ([("fail", kind, detail)] * len(items[i][1]), self.cfg.timeout_s)
                    del pending[i]
                return list(pending), ("timeout" if kind == "timeout" else None)
        except BaseException:  # cancelled mid-batch: the worker's state is unknown
            self._replace(slot)
            raise
        if parallel:
            if timed_out:  # its hung threads cannot be stopped: replace the process
                self._replace(slot)
                return [], "timeout"
            return [], "clean"
        return [], None

    def _replace(self, slot: int) -> None:
        worker = self._workers[slot]
        if worker is not None:
            worker.kill()
            self._workers[slot] = None
            self._restarts += 1


def _tail(detail: str) -> str:
    """The end of a failure's detail (where a traceback names the error), at most
    ``_DETAIL_CHARS`` characters."""
    return detail if len(detail) <= _DETAIL_CHARS else "..." + detail[-_DETAIL_CHARS:]


def _run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from synchronous code, even if this thread already runs an
    event loop (then on a helper thread, blocking the caller as a synchronous call does)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
