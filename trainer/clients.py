"""The engines as the orchestrator sees them: Ray actors behind `trainer.interfaces`, and
the weight transports.

A Ray ObjectRef is awaitable, so each method issues its actor call at once and returns
the ref: calls reach an actor in the order they are made, and the orchestrator awaits
only what it needs. Only this module and the launcher touch Ray.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any

from collections.abc import Callable

from buffer.plugins import load_plugin
from buffer.prompts import PromptItem
from buffer.types import Group
from trainer.interfaces import EngineDied, RolloutClient, StepHandle, WeightTransport


async def _alive(ref: Any, name: str) -> Any:
    """The call's result; the actor's death (killed, out of memory, crashed) as EngineDied."""
    import ray

    try:
        return await ref
    except ray.exceptions.RayActorError as err:
        raise EngineDied(f"{name}'s actor is gone: {err}") from err


class RayRolloutClient:
    """A `rollout.worker.RolloutWorker` in a Ray actor."""

    def __init__(self, name: str, actor: Any, prompt_key: str = "prompt") -> None:
        self.name = name
        self.actor = actor
        self.prompt_key = prompt_key  # the dataset field evaluation reads the prompt from

    def submit(self, items: list[PromptItem]) -> Awaitable[int]:
        return _alive(self.actor.submit.remote(items), self.name)

    def resume(self, groups: list[Group], not_before: int) -> Awaitable[int]:
        return _alive(self.actor.resume.remote(groups, not_before), self.name)

    def interrupt(self) -> Awaitable[list[str]]:
        return _alive(self.actor.interrupt_groups.remote(), self.name)

    def collect(self, min_groups: int, timeout_s: float) -> Awaitable[Any]:
        return _alive(self.actor.collect.remote(min_groups=min_groups, timeout_s=timeout_s), self.name)

    def update_weights(self, weights: Any, version: int) -> Awaitable[dict]:
        return _alive(self.actor.update_weights.remote(weights, version), self.name)

    def health(self) -> Awaitable[dict[str, float]]:
        return _alive(self.actor.stats.remote(), self.name)

    def evaluate(self, rows: list[dict]) -> Awaitable[dict[str, float]]:
        return _alive(self.actor.evaluate.remote(rows, self.prompt_key), self.name)

    def stop(self) -> Awaitable[int]:
        return _alive(self.actor.stop_generation.remote(), self.name)


class RayRolloutFactory:
    """Replaces a dead rollout worker: kills what is left of its actor, starts a new one,
    and loads the trainer's newest weights into it, labelled with their version."""

    def __init__(self, start_actor: Callable[[], Any], trainer_actor: Any, actors: list[Any],
                 prompt_key: str = "prompt") -> None:
        self.start_actor = start_actor
        self.trainer = trainer_actor
        self.actors = actors  # by worker index; the launcher shuts down whatever is here at the end
        self.prompt_key = prompt_key

    def restart(self, index: int) -> Awaitable[RolloutClient]:
        return self._restart(index)

    async def _restart(self, index: int) -> RolloutClient:
        import ray

        ray.kill(self.actors[index], no_restart=True)
        actor = self.actors[index] = self.start_actor()
        name = f"rollout worker {index}"
        await _alive(actor.astart.remote(), name)
        version, payload = await self.trainer.export_versioned.remote()  # after any step under way
        if version > 0:
            await _alive(actor.update_weights.remote(payload, version), name)
        return RayRolloutClient(name, actor, self.prompt_key)


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


class BroadcastTransport:
    """`broadcast`: buckets over a torch.distributed group between the trainer and every
    engine's model worker (gloo on CPU, NCCL on GPU; rollout/broadcast.py). The step's
    export is a ticket; the trainer streams the buckets it names while each engine
    receives them inside its weight load. The launcher forms the group at start-up."""

    name = "broadcast"

    def __init__(self, trainer_actor: Any = None) -> None:
        self.trainer = trainer_actor

    def push(self, weights: Any, version: int, clients: Sequence[RolloutClient]) -> list[Awaitable[dict]]:
        sender = self.trainer.broadcast_send.remote(weights)  # runs once the step has ended
        return [self._with_sender(client.update_weights(weights, version), sender) for client in clients]

    @staticmethod
    async def _with_sender(update: Awaitable[dict], sender: Any) -> dict:
        result = await update
        result["weight_sync_send"] = await sender  # the sender's own failure surfaces too
        return result


WEIGHT_TRANSPORTS = {"object_store": ObjectStoreTransport, "broadcast": BroadcastTransport}


def build_transport(spec: str, cwd: str | None = None, trainer_actor: Any = None) -> WeightTransport:
    """The transport `weight_sync.transport` names: a registered name or a dotted path."""
    factory = load_plugin("weight_sync.transport", spec, WEIGHT_TRANSPORTS, cwd)
    transport = factory(trainer_actor) if factory is BroadcastTransport else factory()
    if not callable(getattr(transport, "push", None)):
        raise ValueError(f"weight_sync.transport={spec!r} has no push(weights, version, clients) method")
    return transport
