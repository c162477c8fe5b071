"""The small interfaces the orchestrator reaches the engines through.

Every method *issues* its call when invoked and returns an awaitable of the result, so
calls reach an engine in the order the orchestrator makes them, and the orchestrator
decides when (and whether) to wait. Ray actor handles fit this directly (an ObjectRef
is awaitable: `trainer/clients.py`); the unit tests implement the same Protocols with
in-process fakes in virtual time. A failed call raises from its awaitable, and the
orchestrator turns that into a `RemoteCallError` naming the engine and the call.
"""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from buffer.prompts import PromptItem
from buffer.types import Group


class RolloutClient(Protocol):
    """One rollout worker (`rollout.worker.RolloutWorker`). `name` labels it in errors and metrics."""

    name: str

    def submit(self, items: list[PromptItem]) -> Awaitable[int]:
        """Start one episode per prompt item; called when admission opens."""

    def resume(self, groups: list[Group], not_before: int) -> Awaitable[int]:
        """Continue partial groups on weights of version `not_before` or newer."""

    def interrupt(self) -> Awaitable[list[str]]:
        """APRIL, at a batch boundary: stop what is generating; returns the ids of the
        groups stopped (held in the engine, or coming back partial)."""

    def collect(self, min_groups: int, timeout_s: float) -> Awaitable[Any]:
        """Finished, dropped and partial groups (a `rollout.worker.Collected`); one
        call is always outstanding per worker."""

    def update_weights(self, weights: Any, version: int) -> Awaitable[dict]:
        """Apply version `version`'s weights (None: relabel only); called by the
        transport, in version order. Returns timings and the worker's stats."""

    def health(self) -> Awaitable[dict[str, float]]:
        """The worker's counters (`RolloutWorker.stats`); also how the orchestrator checks
        that a worker is alive."""

    def evaluate(self, rows: list[dict]) -> Awaitable[dict[str, float]]:
        """Greedy held-out accuracy on `rows`."""

    def stop(self) -> Awaitable[int]:
        """Cancel every episode in flight (at the end of a run); returns how many."""


@dataclass
class StepHandle:
    """A train step under way: its metrics, and its exported weights in whatever form the
    weight transport carries (an object-store reference; None when the step skipped)."""

    metrics: Awaitable[dict[str, float]]
    weights: Any


class TrainerClient(Protocol):
    """The trainer: one process, or `trainer.world_size` ranks behind one client, which
    sends every call to every rank and fails it when any rank fails, naming the rank."""

    name: str

    def train_step(self, groups: list[Group]) -> StepHandle:
        """One optimizer step (version + 1) on these groups, and its weights exported
        (rank 0's export: the other ranks train their share and join the gathers)."""

    def save(self, path: str) -> Awaitable[None]:
        """Write the policy as an HF model folder."""


class RolloutFactory(Protocol):
    """Starts a rollout worker to replace one that died."""

    def restart(self, index: int) -> Awaitable[RolloutClient]:
        """A new worker in slot `index`, started and already holding the trainer's newest
        weights (labelled with their version), ready for `submit`."""


class WeightTransport(Protocol):
    """How version v's weights reach every rollout engine."""

    name: str

    def push(self, weights: Any, version: int, clients: Sequence[RolloutClient]) -> list[Awaitable[dict]]:
        """Start sending `weights` (a `StepHandle.weights`) as `version` to every client;
        one awaitable per client, in the order of `clients`."""


class EngineDied(RuntimeError):
    """The engine behind a client is gone (its process died, was killed, ran out of
    memory): a client raises this from any call to it, so the orchestrator can replace it."""


class RemoteCallError(RuntimeError):
    """A call to an engine failed: which engine, which call, and the remote error."""

    def __init__(self, engine: str, call: str, error: BaseException) -> None:
        self.engine, self.call, self.error = engine, call, error
        super().__init__(f"{engine}: {call} failed: {describe_error(error)}")


def describe_error(error: BaseException) -> str:
    """The error with its (remote) traceback: Ray puts the remote traceback, or why the
    actor died, in the message of the error it raises; a local error gets its own."""
    if isinstance(error, RemoteCallError):
        return str(error)
    text = f"{type(error).__name__}: {error}"
    from_ray = type(error).__module__.startswith("ray.")
    if not from_ray and error.__traceback__ is not None and "Traceback" not in text:
        text += "\n" + "".join(traceback.format_exception(error)).rstrip()
    return text[-6000:]
