"""A reward worker process: resolves the reward specs once, then scores batches on request.

Started by :class:`rewards.runner.RewardRunner` as ``python -c '...main(rfd, wfd)'`` with two
pipe descriptors carrying length-prefixed pickles (``multiprocessing.connection``). Protocol:

* parent -> ``("init", {"specs": [...], "timeout_s": ..., "max_result_bytes": ...})``;
  worker -> ``("ready", pid)`` or ``("init_error", text)``.
* parent -> ``("batch", [(item_id, kind, fn_indices, kwargs), ...], parallel)`` with
  ``kind`` in ``"sample"`` / ``"group"``; worker -> ``("ack", n)`` (so a worker that died
  before taking the batch is not blamed on its first sample), then one
  ``("result", item_id, outcome, seconds)`` per item,
  in order when every reward is sync, in completion order otherwise. ``outcome`` is a list,
  one entry per function: ``("ok", score, info)`` or ``("fail", kind, detail)``; for a group
  function, ``("group", [entry per response])``.
* ``parallel`` (sync rewards only; the runner sets it after a timeout): every item runs in a
  thread of its own and the worker times items out itself, sending
  ``("timeout", item_id, outcome, seconds)`` for each, and ``("tick",)`` now and then while
  items are still running, so the parent can tell a busy worker from a wedged one. The
  hung threads cannot be stopped: the parent replaces a worker after a batch with a timeout.
* parent -> ``("stop",)``.

A reward that hangs (in the normal, sequential mode), crashes the interpreter or calls
``os._exit`` is the parent's problem: it kills this process (its whole process group) and
starts another.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pickle
import queue
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable

from rewards.api import ParamInfo, RewardFailure, RewardSpec, normalize_result

_TRACE_CHARS = 4000


def _trace(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return text[-_TRACE_CHARS:]


class Scorer:
    """Calls resolved reward functions and turns every outcome into a picklable entry.

    Used by the worker process and, for ``isolated=False``, by the runner in-process.
    """

    def __init__(self, fns: list[Callable], groups: list[bool], max_result_bytes: int):
        self.fns = fns
        self.groups = groups
        self.params = [ParamInfo.of(fn) for fn in fns]
        self.max_result_bytes = max_result_bytes

    def _check_size(self, entry: tuple) -> tuple:
        if entry[0] == "ok" or entry[0] == "group":
            size = len(pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL))
            if size > self.max_result_bytes:
                return ("fail", "oversized",
                        f"result is {size} bytes pickled, over max_result_bytes={self.max_result_bytes}")
        return entry

    def finish(self, i: int, value: Any, n_group: int | None) -> tuple:
        """Normalise a raw return value of function ``i``."""
        try:
            if n_group is None:
                score, info = normalize_result(value)
                return self._check_size(("ok", score, info))
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise RewardFailure("not_a_number", f"a group reward must return a list of scores, got {type(value).__name__}")
            if len(value) != n_group:
                raise RewardFailure("not_a_number", f"group reward returned {len(value)} scores for {n_group} responses")
            entries = []
            for v in value:
                try:
                    score, info = normalize_result(v)
                    entries.append(("ok", score, info))
                except RewardFailure as f:
                    entries.append(("fail", f.kind, f.detail))
            return self._check_size(("group", entries))
        except RewardFailure as f:
            return ("fail", f.kind, f.detail)
        except Exception as exc:  # noqa: BLE001 - e.g. a __float__ that raises
            return ("fail", "exception", _trace(exc))

    def call_sync(self, i: int, kwargs: dict, n_group: int | None) -> tuple:
        try:
            value = self.fns[i](**self.params[i].select(kwargs))
            if inspect.isawaitable(value):
                value = asyncio.run(value)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - every error is a marked failure
            return ("fail", "exception", _trace(exc))
        return self.finish(i, value, n_group)

    async def call_async(self, i: int, kwargs: dict, n_group: int | None) -> tuple:
        try:
            value = self.fns[i](**self.params[i].select(kwargs))
            if inspect.isawaitable(value):
                value = await value
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            return ("fail", "exception", _trace(exc))
        return self.finish(i, value, n_group)

    def run_item_sync(self, kind: str, fn_indices: list[int], kwargs: dict) -> list[tuple]:
        n = len(kwargs["responses"]) if kind == "group" else None
        return [self.call_sync(i, kwargs, n) for i in fn_indices]

    async def run_item_async(self, kind: str, fn_indices: list[int], kwargs: dict) -> list[tuple]:
        n = len(kwargs["responses"]) if kind == "group" else None
        return [await self.call_async(i, kwargs, n) for i in fn_indices]


def _thread_cpu_clock(native_id: int) -> int:
    """Linux's CPU-time clock of any thread of this process (``MAKE_THREAD_CPUCLOCK(tid,
    CPUCLOCK_SCHED)``). Unlike ``pthread_getcpuclockid`` it is safe to read after the thread
    has ended: ``clock_gettime`` then fails with ``EINVAL``."""
    return ((~native_id) << 3) | 6


def _thread_cpu(native_id: int | None) -> float | None:
    if native_id is None:
        return None
    try:
        return time.clock_gettime(_thread_cpu_clock(native_id))
    except (OSError, OverflowError, ValueError, AttributeError):
        return None


def _thread_cpu_works() -> bool:
    own = _thread_cpu(threading.get_native_id())
    return own is not None and abs(own - time.thread_time()) < 0.05


class _Running:
    __slots__ = ("tid", "cpu", "own", "fair", "t0", "n_fns")

    def __init__(self, tid: int | None, t0: float, n_fns: int):
        self.tid = tid
        self.cpu = _thread_cpu(tid) or 0.0
        self.own = 0.0  # CPU time the item's thread used
        self.fair = 0.0  # wall time it could have run: not counting other items' CPU time
        self.t0 = t0
        self.n_fns = n_fns


def run_parallel(scorer: Scorer, items: list, timeout_s: float, send: Callable[[tuple], None],
                 measure_cpu: bool | None = None) -> int:
    """Run each sync item in a thread of its own; send every outcome as it comes.

    An item times out once it has had ``timeout_s`` seconds to run: wall time since its
    thread started, minus the CPU time the other items' threads used meanwhile (they share
    one interpreter lock, so many slow but healthy items running together do not time each
    other out; threads already timed out still count, as they may still be running), or once
    its own thread used ``timeout_s`` of CPU time. Without per-thread CPU clocks (non-Linux)
    it is the plain wall time. Returns the number of items timed out; their threads are left
    running (the caller must replace this process).
    """
    if measure_cpu is None:
        measure_cpu = _thread_cpu_works()
    done: queue.SimpleQueue = queue.SimpleQueue()

    def target(item_id: int, kind: str, fn_indices: list[int], kwargs: dict, t0: float) -> None:
        try:
            out = scorer.run_item_sync(kind, fn_indices, kwargs)
        except BaseException as exc:  # noqa: BLE001 - never leave an item unanswered
            out = [("fail", "exception", _trace(exc))] * len(fn_indices)
        done.put((item_id, out, time.perf_counter() - t0))

    active: dict[int, _Running] = {}
    abandoned: list[_Running] = []  # timed out, maybe still running
    check = min(0.05, timeout_s / 20)
    heartbeat = max(check, min(0.5, timeout_s / 4))
    last_send = time.perf_counter()
    for item_id, kind, fn_indices, kwargs in items:
        t0 = time.perf_counter()
        th = threading.Thread(target=target, args=(item_id, kind, fn_indices, kwargs, t0),
                              name=f"grove-reward-{item_id}", daemon=True)
        th.start()  # slow when busy items hold the interpreter lock: keep the parent informed
        active[item_id] = _Running(th.native_id if measure_cpu else None, t0, len(fn_indices))
        if time.perf_counter() - last_send >= heartbeat:
            send(("tick",))
            last_send = time.perf_counter()
    last_check = time.perf_counter()
    timed_out = 0
    while active:
        try:
            msg = done.get(timeout=check)
        except queue.Empty:
            msg = None
        while msg is not None:
            item_id, out, seconds = msg
            if active.pop(item_id, None) is not None:
                send(("result", item_id, out, seconds))
                last_send = time.perf_counter()
            try:
                msg = done.get_nowait()
            except queue.Empty:
                msg = None
        now = time.perf_counter()
        dt = now - last_check
        if active and dt >= check:
            last_check = now
            deltas = {}
            for item_id, r in active.items():
                cpu = _thread_cpu(r.tid)
                if cpu is None:
                    deltas[item_id] = 0.0
                else:
                    deltas[item_id] = max(0.0, cpu - r.cpu)
                    r.cpu = cpu
            total = sum(deltas.values())
            for r in abandoned:
                cpu = _thread_cpu(r.tid)
                if cpu is not None:
                    total += max(0.0, cpu - r.cpu)
                    r.cpu = cpu
            for item_id in list(active):
                r, d = active[item_id], deltas[item_id]
                r.own += d
                r.fair += dt - min(dt, max(0.0, total - d))
                if r.fair >= timeout_s or r.own >= timeout_s:
                    del active[item_id]
                    abandoned.append(r)
                    timed_out += 1
                    detail = (f"did not finish within timeout_s={timeout_s} (run in a thread, as the "
                              f"runner does after a timeout); its worker process was killed and replaced")
                    send(("timeout", item_id, [("fail", "timeout", detail)] * r.n_fns, now - r.t0))
                    last_send = now
        if active and now - last_send >= heartbeat:
            send(("tick",))
            last_send = now
    return timed_out


def main(rfd: int, wfd: int) -> None:
    rconn = Connection(rfd, writable=False)
    wconn = Connection(wfd, readable=False)
    msg = rconn.recv()
    assert msg[0] == "init", msg
    cfg = msg[1]
    try:
        specs: list[RewardSpec] = cfg["specs"]
        fns = [s.resolve() for s in specs]
        for fn in fns:
            target = fn.func if hasattr(fn, "func") else fn
            warm = getattr(target, "__grove_warmup__", None)
            if warm is not None:
                warm()
        scorer = Scorer(fns, cfg["groups"], cfg["max_result_bytes"])
    except BaseException as exc:  # noqa: BLE001 - report why this worker cannot start
        wconn.send(("init_error", _trace(exc)))
        return
    concurrent = cfg["concurrent"]
    timeout_s = cfg["timeout_s"]
    loop = asyncio.new_event_loop() if concurrent else None
    wconn.send(("ready", os.getpid()))

    async def one(item):
        item_id, kind, fn_indices, kwargs = item
        t0 = time.perf_counter()
        try:
            out = await asyncio.wait_for(scorer.run_item_async(kind, fn_indices, kwargs), timeout_s)
        except asyncio.TimeoutError:
            out = [("fail", "timeout", f"did not finish within timeout_s={timeout_s}")] * len(fn_indices)
        wconn.send(("result", item_id, out, time.perf_counter() - t0))

    async def run_concurrently(items):
        await asyncio.gather(*(one(item) for item in items))

    while True:
        try:
            msg = rconn.recv()
        except EOFError:
            return
        if msg[0] == "stop":
            return
        items = msg[1]
        parallel = len(msg) > 2 and msg[2]
        wconn.send(("ack", len(items)))
        if concurrent:
            loop.run_until_complete(run_concurrently(items))
            continue
        if parallel:
            run_parallel(scorer, items, timeout_s, wconn.send)
            continue
        for item_id, kind, fn_indices, kwargs in items:
            t0 = time.perf_counter()
            out = scorer.run_item_sync(kind, fn_indices, kwargs)
            wconn.send(("result", item_id, out, time.perf_counter() - t0))


if __name__ == "__main__":  # pragma: no cover - started by the runner with -c
    main(int(sys.argv[1]), int(sys.argv[2]))
