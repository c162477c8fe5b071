"""The broadcast transport's wire: bucket plans, and a real gloo group between processes."""

from __future__ import annotations

import multiprocessing as mp
import socket

import pytest
import torch

from rollout.broadcast import (digest, flatten, fusion_unit, open_group, plan_buckets, plan_from_json,
                               plan_of, plan_to_json, receive, send, unflatten)


def layer_state(layers: int = 3, hidden: int = 16) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(50, hidden)}
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            state[f"model.layers.{i}.self_attn.{proj}.weight" if proj[0] in "qkvo"
                  else f"model.layers.{i}.mlp.{proj}.weight"] = torch.randn(hidden, hidden)
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(hidden).to(torch.bfloat16)
    return state


def test_buckets_respect_the_cap_keep_fused_units_together_and_one_dtype_each():
    state = layer_state()
    unit_bytes = 3 * 16 * 16 * 4  # q, k, v of one layer
    plan = plan_of(state, bucket_bytes=unit_bytes)
    assert sorted(n for b in plan for n in b.names) == sorted(state)
    for bucket in plan:
        assert len({str(state[n].dtype) for n in bucket.names}) == 1
        units = {fusion_unit(n) for n in bucket.names}
        assert bucket.nbytes <= unit_bytes or len(units) == 1  # only a unit larger than the cap is alone
    for i in range(3):  # q/k/v of a layer always share a bucket, as gate/up do
        qkv = [next(j for j, b in enumerate(plan) if f"model.layers.{i}.self_attn.{p}.weight" in b.names)
               for p in ("q_proj", "k_proj", "v_proj")]
        gate_up = [next(j for j, b in enumerate(plan) if f"model.layers.{i}.mlp.{p}.weight" in b.names)
                   for p in ("gate_proj", "up_proj")]
        assert len(set(qkv)) == 1 and len(set(gate_up)) == 1
    big = [b for b in plan if b.nbytes > unit_bytes]  # the embedding (3200 B) alone is over the cap
    assert [b.names for b in big] == [["model.embed_tokens.weight"]]
    assert len(plan_of(state, bucket_bytes=10**9)) == 2  # one per dtype when the cap allows


def test_a_bucket_round_trips_and_its_digest_tracks_its_bytes():
    state = layer_state(1)
    (bucket, *_) = plan_of(state, bucket_bytes=10**9)
    flat = flatten(bucket, state)
    back = dict(unflatten(bucket, flat))
    assert all(torch.equal(back[n], state[n]) for n in bucket.names)
    before = digest(flat)
    state[bucket.names[0]][0, 0] += 1.0
    assert digest(flatten(bucket, state)) != before
    assert plan_from_json(plan_to_json([bucket]))[0] == bucket
    with pytest.raises(ValueError):
        plan_buckets([("x", [2], "float32")], 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _receiver(port: int, rank: int, which: list[int], out) -> None:
    state = layer_state()
    plan = plan_of(state, bucket_bytes=3 * 16 * 16 * 4)
    group = open_group("127.0.0.1", port, rank, 3, "gloo", 30)
    got = {}
    peak = 0
    for pairs in receive(group, plan, which):
        peak = max(peak, sum(t.numel() * t.element_size() for _, t in pairs))
        got.update({n: t.clone() for n, t in pairs})
    out.put((rank, {n: t.tolist() for n, t in got.items()}, peak))


def test_two_receivers_get_every_sent_bucket_one_bucket_at_a_time():
    state = layer_state()
    for tensor in state.values():
        tensor.mul_(2)  # the sender's weights differ from what the receivers start from
    plan = plan_of(state, bucket_bytes=3 * 16 * 16 * 4)
    which = [i for i in range(len(plan)) if i % 2 == 0]  # a delta: every other bucket
    port = _free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(port, r, which, out)) for r in (1, 2)]
    for p in procs:
        p.start()
    group = open_group("127.0.0.1", port, 0, 3, "gloo", 30)
    sent = send(group, plan, state, which)
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    expected = {n for i in which for n in plan[i].names}
    assert sent == sum(plan[i].nbytes for i in which)
    for rank, got, peak in results:
        assert set(got) == expected
        assert all(torch.equal(torch.tensor(got[n], dtype=state[n].dtype), state[n]) for n in expected)
        assert peak <= max(plan[i].nbytes for i in which)  # one bucket at a time
