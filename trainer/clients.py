"""The engines as the orchestrator sees them: Ray actors behind `trainer.interfaces`, and
the weight transports.

A Ray ObjectRef is awaitable, so each method issues its actor call at once and returns
the ref: calls reach an actor in the order they are made, and the orchestrator awaits
only what it needs. Only this module and the launcher touch Ray.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any

from buffer.plugins import load_plugin
from buffer.prompts import PromptItem
from buffer.types import Group
from trainer.interfaces import RolloutClient, StepHandle, WeightTransport


class RayRolloutClient:
    """A `rollout.worker.RolloutWorker` in a Ray actor."""

    def __init__(self, name: str, actor: Any) -> None:
        self.name = name
        self.actor = actor

    def submit(self, items: list[PromptItem]) -> Awaitable[int]:
        return self.actor.submit.remote(items)

    def resume(self, groups: list[Group], not_before: int) -> Awaitable[int]:
        return self.actor.resume.remote(groups, not_before)

    def interrupt(self) -> Awaitable[list[str]]:
        return self.actor.interrupt_groups.remote()

    def collect(self, min_groups: int, timeout_s: float) -> Awaitable[Any]:
        return self.actor.collect.remote(min_groups=min_groups, timeout_s=timeout_s)

    def update_weights(self, weights: Any, version: int) -> Awaitable[dict]:
        return self.actor.update_weights.remote(weights, version)

    def health(self) -> Awaitable[dict[str, float]]:
        return self.actor.stats.remote()

    def evaluate(self, rows: list[dict]) -> Awaitable[dict[str, float]]:
        return self.actor.evaluate.remote(rows)

    def stop(self) -> Awaitable[int]:
        return self.actor.stop_generation.remote()


class RayTrainerClient:
    """A `trainer.policy_trainer.Trainer` in a Ray actor."""

    def __init__(self, name: str, actor: Any) -> None:
        self.name = name
        self.actor = actor

    def train_step(self, groups: list[Group]) -> StepHandle:
        # one actor call with two results: the weights ref goes straight to the rollout
        # workers, so they leave the trainer the moment the step ends, not after a round
        # trip through the orchestrator
        metrics, weights = self.actor.train_step_and_export.options(num_returns=2).remote(groups)
        return StepHandle(metrics=metrics, weights=weights)

    def save(self, path: str) -> Awaitable[None]:
        return self.actor.save_pretrained.remote(path)


class ObjectStoreTransport:
    """`object_store`: the trainer's safetensors blob through Ray's object store, the same
    reference to every worker (Ray copies it once per node). Simple and cross-node; the
    whole model travels every step."""

    name = "object_store"

    def push(self, weights: Any, version: int, clients: Sequence[RolloutClient]) -> list[Awaitable[dict]]:
        return [client.update_weights(weights, version) for client in clients]


WEIGHT_TRANSPORTS = {"object_store": ObjectStoreTransport}


def build_transport(spec: str, cwd: str | None = None) -> WeightTransport:
    """The transport `weight_sync.transport` names: a registered name or a dotted path."""
    transport = load_plugin("weight_sync.transport", spec, WEIGHT_TRANSPORTS, cwd)()
    if not callable(getattr(transport, "push", None)):
        raise ValueError(f"weight_sync.transport={spec!r} has no push(weights, version, clients) method")
    return transport
