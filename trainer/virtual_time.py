"""An asyncio event loop whose clock jumps to the next timer whenever nothing is ready.

The orchestrator reads time only through its event loop, so on this loop a simulated
minute of generation and training takes milliseconds: the unit tests drive it with fake
engines, and `scripts/simulate_scale.py` with engines modelled on measured curves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self._virtual_now = 0.0

    def time(self) -> float:
        return self._virtual_now

    def _run_once(self) -> None:
        if not self._ready and self._scheduled:
            self._virtual_now = max(self._virtual_now, self._scheduled[0]._when)
        super()._run_once()


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion in virtual time."""
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:  # whatever the simulated engines still run ends with the loop
        loop.run_until_complete(_cancel_the_rest())
        loop.close()


async def _cancel_the_rest() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
