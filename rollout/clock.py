"""How busy the rollout engine is: the time it had work, and its requests × seconds.

The worker reports both per step: busy time gives the rollout's idle ratio, and
request-seconds over wall time give the mean number of requests decoding at once. While
the engine is held (a weight load, an APRIL batch boundary) neither clock runs: held
requests wait, they do not decode.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class BusyClock:
    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self._now = now
        self.active = 0  # requests the engine is running
        self.held = False
        self._busy_since: float | None = None
        self._busy_s = 0.0
        self._request_s = 0.0
        self._since = now()

    def _count_requests(self, until: float | None = None) -> float:
        now = self._now() if until is None else max(until, self._since)
        if not self.held:
            self._request_s += self.active * (now - self._since)
        self._since = now
        return now

    def request_started(self) -> None:
        now = self._count_requests()
        if self.active == 0 and not self.held:
            self._busy_since = now
        self.active += 1

    def request_ended(self) -> None:
        now = self._count_requests()
        self.active -= 1
        if self.active == 0 and self._busy_since is not None:
            self._busy_s += now - self._busy_since
            self._busy_since = None

    def hold(self, since: float) -> None:
        """The engine has been held since `since`: both clocks stop there."""
        self._count_requests(until=since)
        self.held = True
        if self._busy_since is not None:
            self._busy_s += max(0.0, since - self._busy_since)
            self._busy_since = None

    def release(self) -> None:
        now = self._count_requests()
        self.held = False
        if self.active and self._busy_since is None:
            self._busy_since = now

    def read(self) -> tuple[float, float]:
        """(busy seconds, request-seconds) so far."""
        now = self._count_requests()
        busy = self._busy_s + (now - self._busy_since if self._busy_since is not None else 0.0)
        return busy, self._request_s
