"""Length-bucketed forward passes: the buckets are an optimal partition, and the bucketed
logprobs, entropies and gradients equal one padded pass over the same rows."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.batching import length_buckets
from trainer.logprobs import bucketed_token_logprobs, token_logprobs
from trainer.tiny_model import TinyModelSpec, build_char_tokenizer, build_tiny_model


def padded_cost(lengths: list[int], buckets: list[list[int]], overhead: int) -> int:
    return sum(overhead + len(rows) * max(lengths[i] for i in rows) for rows in buckets)


def brute_force_cost(lengths: list[int], overhead: int) -> int:
    """Least cost over every way to cut the sorted distinct lengths into contiguous runs."""
    distinct = sorted(set(lengths))
    best = None
    for cuts in itertools.product([False, True], repeat=len(distinct) - 1):
        buckets, current = [], [distinct[0]]
        for d, cut in zip(distinct[1:], cuts):
            if cut:
                buckets.append(current)
                current = []
            current.append(d)
        buckets.append(current)
        cost = sum(overhead + sum(lengths.count(d) for d in run) * max(run) for run in buckets)
        best = cost if best is None else min(best, cost)
    return best


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(0, 300))
def test_buckets_partition_the_rows_at_least_cost(lengths, overhead):
    buckets = length_buckets(lengths, overhead)
    assert sorted(i for rows in buckets for i in rows) == list(range(len(lengths)))
    assert all(rows for rows in buckets)
    # contiguous in length: no bucket's shortest row is shorter than an earlier bucket's longest
    spans = [(min(lengths[i] for i in rows), max(lengths[i] for i in rows)) for rows in buckets]
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
    if len(set(lengths)) <= 10:
        assert padded_cost(lengths, buckets, overhead) == brute_force_cost(lengths, overhead)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(0, 300), st.integers(1, 200))
def test_capped_buckets_partition_the_rows_within_the_cap(lengths, overhead, cap):
    buckets = length_buckets(lengths, overhead, max_tokens=cap)
    assert sorted(i for rows in buckets for i in rows) == list(range(len(lengths)))
    assert all(rows for rows in buckets)
    for rows in buckets:  # within the cap, or a single row longer than it
        assert len(rows) * max(lengths[i] for i in rows) <= cap or len(rows) == 1
    spans = [(min(lengths[i] for i in rows), max(lengths[i] for i in rows)) for rows in buckets]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # still sorted by length
    if cap >= len(lengths) * max(lengths):  # a cap that never binds changes nothing
        assert buckets == length_buckets(lengths, overhead)


def test_bucket_count_follows_the_overhead():
    lengths = [12] * 56 + [55] * 8
    assert len(length_buckets(lengths, 10**9)) == 1  # overhead dominates: one padded batch
    assert len(length_buckets(lengths, 128)) == 2  # the long group on its own
    assert len(length_buckets(list(range(1, 20)), 0)) == 19  # free passes: one per length
    assert [len(b) for b in length_buckets([12] * 56, 10**9, max_tokens=12 * 20)] == [18, 19, 19]  # near-equal


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_tiny_model(TinyModelSpec(), build_char_tokenizer()).float()


def right_padded(lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(2, 60, (n,), generator=gen)
        mask[row, :n] = 1
    return ids, mask


def test_bucketed_pass_equals_one_padded_pass(model):
    lengths = [14, 9, 50, 13, 12, 48, 11, 7]
    ids, mask = right_padded(lengths, 52)
    valid = torch.zeros((len(lengths), 51), dtype=torch.bool)
    for row, n in enumerate(lengths):
        valid[row, : n - 1] = True
    advantages = torch.linspace(-1, 1, len(lengths)).unsqueeze(-1)

    def loss_and_grads(fn, **kw):
        model.zero_grad()
        lp, ent = fn(model, ids, mask, 0.9, with_entropy=True, **kw)
        loss = -((lp * advantages)[valid].sum() + 0.01 * ent[valid].sum())
        loss.backward()
        return lp, ent, [p.grad.clone() for p in model.parameters()]

    lp_ref, ent_ref, grads_ref = loss_and_grads(token_logprobs)
    assert len(length_buckets(lengths, 0)) > 2  # the case below really splits
    lp, ent, grads = loss_and_grads(bucketed_token_logprobs, overhead_tokens=0)
    torch.testing.assert_close(lp[valid], lp_ref[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[valid], ent_ref[valid], atol=1e-5, rtol=1e-5)
    assert lp.shape == lp_ref.shape and bool((lp[~valid] == 0).all())  # nothing past a row's end
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    # without entropy, and the one-bucket fallback, give the same logprobs
    with torch.no_grad():
        plain = bucketed_token_logprobs(model, ids, mask, 0.9, overhead_tokens=0)
        single = bucketed_token_logprobs(model, ids, mask, 0.9, overhead_tokens=10**9)
    torch.testing.assert_close(plain[valid], lp_ref[valid].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, lp_ref.detach())


def test_a_packed_batch_follows_the_models_device():
    """The trainer moves the packed batch to `engine.device`: every tensor goes, none stays behind."""
    from buffer.types import FinishReason, Group, Trajectory
    from trainer.batching import pack_groups

    g = Group(group_id="g", prompt_id="p", prompt_text="", row={})
    for reward in (0.0, 1.0):
        t = Trajectory(prompt_id="p", group_id="g", prompt_ids=[3, 4])
        t.append_tokens([5, 6], [-0.1, -0.2], 0)
        t.reward, t.finish_reason = reward, FinishReason.STOP
        g.trajectories.append(t)
    batch = pack_groups([g], pad_id=0).to("meta")
    tensors = {k: v for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    assert len(tensors) == 8 and all(v.device.type == "meta" for v in tensors.values())
    assert batch.num_tokens == 4
