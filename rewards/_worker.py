"""A reward worker process: resolves the reward specs once, then scores batches on request.

Started by :class:`rewards.runner.RewardRunner` as ``python -c '...main(rfd, wfd)'`` with two
pipe descriptors carrying length-prefixed pickles (``multiprocessing.connection``). Protocol:

* parent -> ``("init", {"specs": [...], "timeout_s": ..., "max_result_bytes": ...})``;
  worker -> ``("ready", pid)`` or ``("init_error", text)``.
* parent -> ``("batch", [(item_id, kind, fn_indices, kwargs), ...])`` with ``kind`` in
  ``"sample"`` / ``"group"``; worker -> ``("ack", n)`` (so a worker that died before taking
  the batch is not blamed on its first sample), then one
  ``("result", item_id, outcome, seconds)`` per item,
  in order when every reward is sync, in completion order otherwise. ``outcome`` is a list,
  one entry per function: ``("ok", score, info)`` or ``("fail", kind, detail)``; for a group
  function, ``("group", [entry per response])``.
* parent -> ``("stop",)``.

A reward that hangs, crashes the interpreter or calls ``os._exit`` is the parent's problem: it
kills this process (its whole process group) and starts another.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pickle
import sys
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
        wconn.send(("ack", len(items)))
        if concurrent:
            loop.run_until_complete(run_concurrently(items))
            continue
        for item_id, kind, fn_indices, kwargs in items:
            t0 = time.perf_counter()
            out = scorer.run_item_sync(kind, fn_indices, kwargs)
            wconn.send(("result", item_id, out, time.perf_counter() - t0))


if __name__ == "__main__":  # pragma: no cover - started by the runner with -c
    main(int(sys.argv[1]), int(sys.argv[2]))
