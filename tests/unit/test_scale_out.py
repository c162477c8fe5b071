"""Scale-out wiring without engines: placement bundles, the config's resource checks, the
multi-rank trainer client and broadcast transport over fake rank actors, and the
broadcast sender's bucket reading on a plain torch module."""

from __future__ import annotations

import asyncio

import pytest
import torch

from rollout.broadcast import plan_of, plan_from_json
from rollout.config import RolloutConfig
from trainer.config import ClusterConfig, GroveConfig
from trainer.placement import Placement, bundle, bundles, demand, shortfall
from trainer.policy_trainer import TrainerConfig


def config(workers: int = 2, ranks: int = 2, **cluster) -> GroveConfig:
    return GroveConfig(rollout=RolloutConfig(num_workers=workers), trainer=TrainerConfig(world_size=ranks),
                       cluster=ClusterConfig(**cluster))


# --- placement --------------------------------------------------------------------------


def test_one_bundle_per_rank_and_per_worker_sized_by_the_profile():
    cfg = config(workers=3, ranks=2, trainer_cpus=2, trainer_gpus=1, rollout_cpus=1, rollout_gpus=0.5)
    trainer, rollout = bundles(cfg)
    assert trainer == [{"CPU": 2.0, "GPU": 1.0}] * 2 and rollout == [{"CPU": 1.0, "GPU": 0.5}] * 3
    assert demand(trainer, rollout) == {"CPU": 7.0, "GPU": 3.5}
    assert bundle(1, 0) == {"CPU": 1.0} and bundle(0, 1) == {"GPU": 1.0}  # Ray refuses zero entries
    assert shortfall({"CPU": 7.0, "GPU": 3.5}, {"CPU": 8.0, "GPU": 2.0}) == {"GPU": 1.5}
    assert shortfall({"CPU": 2.0}, {"CPU": 2.0}) == {}
    # without a placement group (actors built by hand): just the resources
    assert Placement(None, None, trainer[0], rollout[0]).trainer_options(1) == {"num_cpus": 2.0, "num_gpus": 1.0}


def test_the_local_cpu_check_counts_every_rank_and_names_the_fix():
    with pytest.raises(ValueError, match=r"trainer.world_size=2 x cluster.trainer_cpus=1.0.*"
                                         r"cluster.rollout_cpus=0.5 and cluster.trainer_cpus=0.5"):
        config(workers=2, ranks=2, num_cpus=2)
    config(workers=2, ranks=2, num_cpus=2, rollout_cpus=0.5, trainer_cpus=0.5)
    config(workers=2, ranks=2, num_cpus=2, address="auto")  # a cluster's CPUs are Ray's to count, at start


@pytest.mark.parametrize("bad, match", [(dict(trainer_placement="pack"), "trainer_placement"),
                                        (dict(rollout_cpus=0, rollout_gpus=0), "rollout_cpus=0"),
                                        (dict(placement_timeout_s=0), "placement_timeout_s")])
def test_bad_cluster_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        ClusterConfig(**bad)


# --- the multi-rank client, over fake rank actors ------------------------------------------


class Call:
    """A fake actor method: `.remote(...)` records the call and returns what `reply` gives."""

    def __init__(self, log: list, name: str, reply) -> None:
        self.log, self.name, self.reply, self.returns = log, name, reply, 1

    def options(self, num_returns: int = 1):
        self.returns = num_returns
        return self

    def remote(self, *args):
        self.log.append((self.name, args))
        out = self.reply(*args)
        return tuple(asyncio.ensure_future(o) for o in out) if self.returns > 1 else asyncio.ensure_future(out)


class FakeRank:
    def __init__(self, rank: int, fail: str | None = None, hang: bool = False) -> None:
        self.log: list = []
        self.rank, self.fail, self.hang = rank, fail, hang

    async def _answer(self, value):
        if self.hang:
            await asyncio.sleep(3600)  # a peer of a failed rank: stuck in a collective
        if self.fail:
            raise RuntimeError(self.fail)
        return value

    def __getattr__(self, name: str) -> Call:
        if name == "train_step_and_export":
            return Call(self.log, name, lambda batch: (self._answer({"rank": self.rank}),
                                                       self._answer(f"weights of rank {self.rank}")))
        return Call(self.log, name, lambda *args: self._answer((name, self.rank)))


@pytest.fixture
def no_object_store(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "put", lambda value: ("ref", value))


def test_every_rank_trains_the_same_batch_and_rank_0s_results_are_the_steps(no_object_store):
    from trainer.clients import RayTrainerClient

    async def main():
        ranks = [FakeRank(0), FakeRank(1), FakeRank(2)]
        client = RayTrainerClient("trainer", ranks)
        step = client.train_step(["group"])
        assert await step.metrics == {"rank": 0}
        assert await step.weights == "weights of rank 0"
        assert [r.log for r in ranks] == [[("train_step_and_export", (("ref", ["group"]),))]] * 3  # one put
        assert await client.save("/x") == ("save_pretrained", 0)
        assert await client.export_versioned() == ("export_versioned", 0)
        assert all(r.log[-2][0] == "save_pretrained" and r.log[-1][0] == "export_versioned" for r in ranks)

    asyncio.run(main())


def test_a_failed_rank_fails_the_step_at_once_naming_the_rank(no_object_store):
    from trainer.clients import RankFailed, RayTrainerClient

    async def main():
        client = RayTrainerClient("trainer", [FakeRank(0, hang=True), FakeRank(1, fail="CUDA out of memory")])
        with pytest.raises(RankFailed, match=r"trainer rank 1 failed: RuntimeError: CUDA out of memory"):
            await asyncio.wait_for(client.train_step(["group"]).metrics, 5)  # rank 0 never answers

    asyncio.run(main())


def test_one_rank_keeps_the_single_trainer_names(no_object_store):
    from trainer.clients import RayTrainerClient

    async def main():
        client = RayTrainerClient("trainer", FakeRank(0, fail="boom"))
        assert client.rank_names == ["trainer"]
        with pytest.raises(RuntimeError, match="boom"):
            await client.train_step(["group"]).metrics

    asyncio.run(main())


def test_broadcast_sends_from_every_rank_with_rank_0s_ticket():
    from trainer.clients import BroadcastTransport

    class Client:
        name = "rollout worker 0"

        async def update_weights(self, weights, version):
            return {"version": version, "got": weights}

    async def main():
        ranks = [FakeRank(0), FakeRank(1)]
        (result,) = await asyncio.gather(*BroadcastTransport(ranks).push("ticket", 5, [Client()]))
        assert result["got"] == "ticket" and result["weight_sync_send"] == ("broadcast_send", 0)
        assert [r.log for r in ranks] == [[("broadcast_send", ("ticket",))]] * 2
        failing = [FakeRank(0), FakeRank(1, fail="gather failed")]
        with pytest.raises(RuntimeError, match="trainer rank 1 failed"):
            await asyncio.gather(*BroadcastTransport(failing).push("ticket", 6, [Client()]))

    asyncio.run(main())


# --- the sender's view of the weights -------------------------------------------------------


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict(
            {"q_proj": torch.nn.Linear(8, 8), "k_proj": torch.nn.Linear(8, 8), "v_proj": torch.nn.Linear(8, 8)})
            for _ in range(3))
        self.norm = torch.nn.LayerNorm(8)
        self.register_buffer("scale", torch.ones(8))
        self.register_buffer("cache", torch.zeros(4), persistent=False)
        self.head = self.layers[0]["q_proj"]  # a shared module: state_dict names it twice


class Sender:
    def __new__(cls, rank: int, module: torch.nn.Module):
        from trainer.broadcast_sender import BroadcastSender

        sender = type("FakeTrainer", (BroadcastSender,), {})()
        sender.rank, sender.engine = rank, type("Engine", (), {"module": module})()
        return sender


def test_the_sender_reads_state_dicts_names_in_order_and_plans_as_the_blob_path():
    module = Model()
    sender = Sender(1, module)  # not rank 0: plans without joining a group
    assert list(sender._checkpoint_tensors()) == list(module.state_dict())
    plan = plan_from_json(sender.broadcast_open("127.0.0.1", 0, 2, "gloo", 1 / 1024, 10, delta=True))
    assert plan == plan_of(module.state_dict(), 1024)
    assert sender.broadcast_ticket(1) is None  # only rank 0 has a ticket


def test_delta_tickets_name_exactly_the_buckets_that_changed():
    module = Model()
    sender = Sender(1, module)
    plan = plan_from_json(sender.broadcast_open("127.0.0.1", 0, 2, "gloo", 1 / 1024, 10, delta=True))
    sender.rank = 0
    first = sender.broadcast_ticket(1)
    assert first["complete"] and first["buckets"] == list(range(len(plan)))
    assert sender.broadcast_ticket(2)["buckets"] == [] and sender.broadcast_ticket(2)["bytes"] == 0
    with torch.no_grad():
        module.layers[2]["k_proj"].weight[0, 0] += 1.0
    changed = sender.broadcast_ticket(3)
    (index,) = changed["buckets"]
    assert "layers.2.k_proj.weight" in plan[index].names and changed["bytes"] == plan[index].nbytes
