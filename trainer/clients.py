"""The engines as the orchestrator sees them: Ray actors behind `trainer.interfaces`, and
the weight transports.

A Ray ObjectRef is awaitable, so each method issues its actor call at once and returns
the ref: calls reach an actor in the order they are made, and the orchestrator awaits
only what it needs. Only this module and the launcher touch Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from buffer.plugins import load_plugin
from buffer.prompts import PromptItem
from buffer.types import Group
from trainer.interfaces import EngineDied, RolloutClient, StepHandle, WeightTransport, describe_error


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
    """Replaces a dead rollout worker: kills what is left of its actor, starts a new one
    (in the dead one's placement bundle), and loads the trainer's newest weights into it,
    labelled with their version."""

    def __init__(self, start_actor: Callable[[int], Any], trainer: "RayTrainerClient", actors: list[Any],
                 prompt_key: str = "prompt") -> None:
        self.start_actor = start_actor
        self.trainer = trainer
        self.actors = actors  # by worker index; the launcher shuts down whatever is here at the end
        self.prompt_key = prompt_key

    def restart(self, index: int) -> Awaitable[RolloutClient]:
        return self._restart(index)

    async def _restart(self, index: int) -> RolloutClient:
        import ray

        ray.kill(self.actors[index], no_restart=True)
        actor = self.actors[index] = self.start_actor(index)
        name = f"rollout worker {index}"
        await _alive(actor.astart.remote(), name)
        version, payload = await self.trainer.export_versioned()  # after any step under way
        if version > 0:
            await _alive(actor.update_weights.remote(payload, version), name)
        return RayRolloutClient(name, actor, self.prompt_key)


async def all_ranks(refs: Sequence[Any], names: Sequence[str]) -> list[Any]:
    """Every rank's result, in rank order; the first failure raises at once, naming its
    rank (the other ranks may never finish: a peer of a failed rank waits in a collective)."""
    if len(refs) == 1:
        return [await _alive(refs[0], names[0])]
    futures = [asyncio.ensure_future(_named(ref, name)) for ref, name in zip(refs, names)]
    try:
        done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
        for future in futures:  # in rank order: the lowest failed rank names the fault
            if future in done and future.exception() is not None:
                raise future.exception()
        return [future.result() for future in futures]
    finally:
        for future in futures:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved: nothing left for asyncio to log


async def _named(ref: Any, name: str) -> Any:
    try:
        return await _alive(ref, name)
    except EngineDied:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the rank's name
        raise RankFailed(f"{name} failed: {describe_error(err)}") from err


class RankFailed(RuntimeError):
    """One trainer rank's call failed; the message names the rank and has its traceback."""


class RayTrainerClient:
    """The `trainer.policy_trainer.Trainer` ranks, one Ray actor each. Every call goes to
    every rank with the same arguments (each rank trains its share of the batch; under
    ZeRO-3 exports and saves gather the parameters, a collective); rank 0's results are
    the step's. Any rank's failure fails the call, naming the rank."""

    def __init__(self, name: str, actors: Any) -> None:
        self.name = name
        self.actors = list(actors) if isinstance(actors, (list, tuple)) else [actors]
        self.actor = self.actors[0]  # rank 0
        many = len(self.actors) > 1
        self.rank_names = [f"{name} rank {r}" if many else name for r in range(len(self.actors))]

    def train_step(self, groups: list[Group]) -> StepHandle:
        # one actor call with two results: the weights ref goes straight to the rollout
        # workers, so they leave the trainer the moment the step ends, not after a round
        # trip through the orchestrator
        import ray

        batch = ray.put(groups)  # once, whatever the number of ranks
        calls = [a.train_step_and_export.options(num_returns=2).remote(batch) for a in self.actors]
        return StepHandle(metrics=self._rank0(all_ranks([m for m, _ in calls], self.rank_names)), weights=calls[0][1])

    def save(self, path: str) -> Awaitable[None]:
        return self._rank0(all_ranks([a.save_pretrained.remote(path) for a in self.actors], self.rank_names))

    def export_versioned(self) -> Awaitable[tuple[int, Any]]:
        """Rank 0's (version, weights blob), every rank taking part."""
        return self._rank0(all_ranks([a.export_versioned.remote() for a in self.actors], self.rank_names))

    @staticmethod
    async def _rank0(results: Awaitable[list[Any]]) -> Any:
        return (await results)[0]


class ObjectStoreTransport:
    """`object_store`: the trainer's safetensors blob through Ray's object store, the same
    reference to every worker (Ray copies it once per node). Simple and cross-node; the
    whole model travels every step."""

    name = "object_store"

    def push(self, weights: Any, version: int, clients: Sequence[RolloutClient]) -> list[Awaitable[dict]]:
        return [client.update_weights(weights, version) for client in clients]


class BroadcastTransport:
    """`broadcast`: buckets over a torch.distributed group between trainer rank 0 and every
    engine's model worker (gloo on CPU, NCCL on GPU; rollout/broadcast.py). The step's
    export is a ticket; rank 0 streams the buckets it names while each engine receives
    them inside its weight load. Every trainer rank runs the send (under ZeRO-3 each
    bucket's parameters are gathered first, a collective); the engines wait on all of
    them, so any rank's failure surfaces. The launcher forms the group at start-up."""

    name = "broadcast"

    def __init__(self, trainer_actors: Any = None) -> None:
        self.trainers = RayTrainerClient("trainer", trainer_actors) if trainer_actors is not None else None

    def push(self, weights: Any, version: int, clients: Sequence[RolloutClient]) -> list[Awaitable[dict]]:
        # runs once the step has ended (each rank's calls run in order); `weights` is rank 0's ticket
        senders = asyncio.ensure_future(all_ranks([a.broadcast_send.remote(weights) for a in self.trainers.actors],
                                                  self.trainers.rank_names))
        return [self._with_sender(client.update_weights(weights, version), senders) for client in clients]

    @staticmethod
    async def _with_sender(update: Awaitable[dict], senders: Awaitable[list]) -> dict:
        result = await update
        result["weight_sync_send"] = (await senders)[0]  # rank 0's timings; any rank's failure surfaces too
        return result


WEIGHT_TRANSPORTS = {"object_store": ObjectStoreTransport, "broadcast": BroadcastTransport}


def build_transport(spec: str, cwd: str | None = None, trainer_actors: Any = None) -> WeightTransport:
    """The transport `weight_sync.transport` names: a registered name or a dotted path.
    `trainer_actors`: the trainer ranks' actors (rank 0 first), for `broadcast`."""
    factory = load_plugin("weight_sync.transport", spec, WEIGHT_TRANSPORTS, cwd)
    transport = factory(trainer_actors) if factory is BroadcastTransport else factory()
    if not callable(getattr(transport, "push", None)):
        raise ValueError(f"weight_sync.transport={spec!r} has no push(weights, version, clients) method")
    return transport
