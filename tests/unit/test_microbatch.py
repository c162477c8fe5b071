"""Pieces of a batch: ranks' shares balanced by tokens, micro-batch plans every rank agrees
on, global loss denominators that make the pieces' losses add up to the batch loss, and
the output layer chunked over positions with flat memory and the unchunked gradient."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from algorithms import AGGREGATIONS, AlgorithmConfig, PolicyLossInputs, aggregate, compute_policy_loss
from algorithms.losses import importance_weights, loss_denominators
from trainer.batching import plan_update, split_by_tokens
from trainer.logprobs import token_logprobs

ROOT = Path(__file__).resolve().parents[2]
MODES = list(AGGREGATIONS)

# --- ranks' shares ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 200), min_size=1, max_size=60), st.integers(1, 8))
def test_shares_hold_every_row_once_balanced_by_tokens(lengths, parts):
    shares = split_by_tokens(lengths, parts)
    assert len(shares) == parts
    assert sorted(i for share in shares for i in share) == list(range(len(lengths)))  # every row exactly once
    assert shares == split_by_tokens(list(lengths), parts)  # deterministic
    assert all(share == sorted(share) for share in shares)
    loads = [sum(lengths[i] for i in share) for share in shares]
    # greedy longest-first: the heaviest rank exceeds the mean by less than one row
    assert max(loads) <= sum(lengths) / parts + max(lengths)
    if len(lengths) >= parts:
        assert all(shares)  # every rank has work


def test_shares_balance_tokens_not_rows():
    lengths = [100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    shares = split_by_tokens(lengths, 2)
    assert shares[0] == [0] and len(shares[1]) == 10  # one long row weighs as much as ten short ones


# --- micro-batch plans -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 60), st.integers(0, 30)), min_size=1, max_size=40),
       st.integers(1, 4), st.integers(0, 200), st.integers(8, 300), st.integers(1, 64))
def test_every_rank_plans_the_same_shape_and_every_row_runs_once(rows, world_size, overhead, cap, chunk):
    lengths = [n for n, _ in rows]
    scored = [min(s, n - 1) for n, s in rows]
    index = list(range(len(rows)))
    plans = [plan_update(index, lengths, scored, r, world_size, overhead, cap, chunk) for r in range(world_size)]
    assert len({len(p.micro_batches) for p in plans}) == 1  # ZeRO's collectives pair up
    assert all(p.head_chunks == plans[0].head_chunks for p in plans)
    mine = [i for p in plans for rows_ in p.micro_batches if rows_ is not None for i in rows_]
    assert sorted(mine) == index
    for p in plans:
        assert p.rows == index and p.split == (len(p.micro_batches) > 1 or world_size > 1)
        for rows_, chunks in zip(p.micro_batches, p.head_chunks):
            if rows_ is not None:
                assert len(rows_) * max(lengths[i] for i in rows_) <= cap or len(rows_) == 1
                assert chunks * chunk >= sum(scored[i] for i in rows_)  # no chunk over logits_chunk_tokens
    again = [plan_update(index, lengths, scored, r, world_size, overhead, cap, chunk) for r in range(world_size)]
    assert again == plans  # deterministic: the ranks agree without talking


def test_a_rank_without_rows_runs_stand_ins():
    plans = [plan_update([0], [10], [4], r, 2, 0, 100, 2) for r in range(2)]
    assert plans[0].micro_batches == [[0]] and plans[1].micro_batches == [None]
    assert plans[0].head_chunks == plans[1].head_chunks == [2]


# --- global denominators ---------------------------------------------------------------------


def random_pieces(seed: int, B: int = 9, T: int = 12):
    """A random (B, T) batch with ragged, right-padded masks and masked spans, and a random
    split of its rows into pieces, each cut to its own longest row."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    mask[torch.rand(B, T, generator=gen) < 0.15] = 0
    order = torch.randperm(B, generator=gen).tolist()
    cuts = sorted(torch.randperm(B - 1, generator=gen)[: int(torch.randint(1, 4, (1,), generator=gen))].add(1).tolist())
    pieces = [order[a:b] for a, b in zip([0, *cuts], [*cuts, B])]
    widths = [max(1, int(lengths[p].max())) for p in pieces]
    return gen, mask, pieces, widths


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(6))
def test_pieces_with_global_denominators_add_up_to_the_batch_loss_and_gradient(mode, seed):
    gen, mask, pieces, widths = random_pieces(seed)
    per_token = torch.randn(mask.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    longest = float(mask.shape[1])  # the Dr.GRPO length the whole batch would use
    whole = aggregate(per_token, mask, mode)
    (g_whole,) = torch.autograd.grad(whole, per_token)
    den = loss_denominators(mask, max_response_length=longest)
    parts = [aggregate(per_token[p, :w], mask[p, :w], mode, denominators=den) for p, w in zip(pieces, widths)]
    (g_parts,) = torch.autograd.grad(sum(parts), per_token)
    torch.testing.assert_close(sum(parts), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_parts, g_whole, rtol=1e-12, atol=1e-12)
    if len(pieces) > 1 and mode != "seq-mean-token-sum-norm":  # the pieces' own denominators would be wrong
        local = sum(aggregate(per_token[p, :w], mask[p, :w], mode) for p, w in zip(pieces, widths))
        assert not torch.allclose(local, whole)


def test_dr_grpo_length_comes_from_the_denominators_unless_the_constant_is_set():
    loss, mask = torch.ones(2, 5), torch.ones(2, 5)
    den = loss_denominators(mask, max_response_length=4)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", denominators=den).item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", 8.0, den).item() == pytest.approx(10 / 8)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / 5)  # no denominators: T


def test_an_aggregation_without_denominators_is_refused_when_split(monkeypatch):
    monkeypatch.setitem(AGGREGATIONS, "custom", lambda loss, mask, constant: (loss * mask).sum())
    assert aggregate(torch.ones(1, 2), torch.ones(1, 2), "custom").item() == 2.0
    with pytest.raises(ValueError, match="takes no `denominators`"):
        aggregate(torch.ones(1, 2), torch.ones(1, 2), "custom", denominators=loss_denominators(torch.ones(1, 2)))


POLICIES = [
    {},  # GRPO: token-mean, decoupled with token TIS
    dict(policy_loss="gspo", loss_agg="seq-mean-token-mean", clip_low=0.1, clip_high=0.1),
    dict(loss_agg="seq-mean-token-sum", tis="sequence", entropy_coef=0.01, kl_coef=0.05),
    dict(loss_agg="seq-mean-token-sum-norm", advantage="mean_only", rejection="token", rejection_low=0.6,
         rejection_high=1.6),
    dict(loss_agg="token-mean", rejection="sequence", rejection_low=0.7, rejection_high=1.4, dual_clip=3.0),
]


@pytest.mark.parametrize("fields", POLICIES)
@pytest.mark.parametrize("seed", range(3))
def test_micro_batched_policy_loss_equals_the_full_batch_loss(fields, seed):
    """The trainer's recipe: denominators from the whole batch's mask (after rejection),
    then compute_policy_loss per piece; the pieces' sum equals the one-piece loss, in value
    and gradient, for every aggregation mode."""
    cfg = AlgorithmConfig(**fields)
    gen, mask, pieces, widths = random_pieces(seed)
    B, T = mask.shape
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    behav = old + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    logprobs = (old + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_(True)
    entropy = torch.rand(B, T, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = old + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)

    def loss(rows, width, den=None):
        cut = (rows, slice(0, width))
        inputs = PolicyLossInputs(logprobs=logprobs[cut], old_logprobs=old[cut], advantages=adv[rows],
                                  loss_mask=mask[cut], behav_logprobs=behav[cut], ref_logprobs=ref[cut],
                                  entropy=entropy[cut])
        return compute_policy_loss(inputs, cfg, den).loss

    everything = list(range(B))
    _, keep, _ = importance_weights(old, behav, mask, decoupled=cfg.decoupled, tis=cfg.tis, tis_cap=cfg.tis_cap,
                                    rejection=cfg.rejection, rejection_low=cfg.rejection_low,
                                    rejection_high=cfg.rejection_high)
    den = loss_denominators(mask * keep, max_response_length=T)
    whole = loss(everything, T, den)
    assert whole.item() == pytest.approx(loss(everything, T).item(), rel=1e-12)  # one piece: the plain loss
    g_whole = torch.autograd.grad(whole, (logprobs, entropy), allow_unused=True, materialize_grads=True)
    parts = sum(loss(p, w, den) for p, w in zip(pieces, widths))
    g_parts = torch.autograd.grad(parts, (logprobs, entropy), allow_unused=True, materialize_grads=True)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-10, abs=1e-12)
    for a, b in zip(g_parts, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- the output layer in chunks ----------------------------------------------------------------


def big_vocab_model(vocab: int = 100_000):
    """A Qwen2 with a real-size vocabulary and a toy body: the output layer dominates."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).float()


def rows(batch: int, length: int, vocab: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0  # a shorter row, right padded
    positions = torch.zeros((batch, length - 1), dtype=torch.bool)
    positions[:, length // 3:] = True  # the "response"
    positions &= mask[:, 1:].bool()
    weights = torch.randn(batch, length - 1, generator=gen)
    return ids, mask, positions, weights


def unchunked(model, ids, mask, temperature):
    """The plain computation: every position's full-vocabulary fp32 log-softmax at once."""
    logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / temperature, -1)
    return logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1), -(logprobs.exp() * logprobs).sum(-1)


def test_chunked_logprobs_and_gradients_equal_the_unchunked_ones():
    model = big_vocab_model(50_000)
    ids, mask, positions, weights = rows(3, 40, 50_000)

    def loss_and_grads(fn):
        model.zero_grad()
        lp, ent = fn()
        loss = ((lp * weights)[positions].sum() + 0.1 * ent[positions].sum())
        loss.backward()
        return lp.detach(), ent.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    lp0, ent0, loss0, g0 = loss_and_grads(lambda: unchunked(model, ids, mask, 0.8))
    lp1, ent1, loss1, g1 = loss_and_grads(lambda: token_logprobs(model, ids, mask, 0.8, with_entropy=True,
                                                                 positions=positions, num_chunks=7))
    torch.testing.assert_close(lp1[positions], lp0[positions], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent1[positions], ent0[positions], rtol=1e-5, atol=1e-5)
    assert bool((lp1[~positions] == 0).all() and (ent1[~positions] == 0).all())  # unscored positions hold 0
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    for name in g0:
        scale = float(g0[name].abs().max())
        assert float((g1[name] - g0[name]).abs().max()) <= 1e-5 * scale + 1e-8, name
    # more chunks than positions (ranks run equal chunk counts): empty chunks are harmless
    few = torch.zeros_like(positions)
    few[1, -2:] = True
    lp2 = token_logprobs(model, ids, mask, 0.8, positions=few, num_chunks=5)
    torch.testing.assert_close(lp2[few], lp0[few], rtol=1e-5, atol=1e-5)


def peak_memory_report() -> dict[str, float]:
    """Run in a fresh process (see the test below): the peak extra resident memory of one
    forward + backward, chunked and not, at a batch and at twice it."""
    import ctypes

    # Every allocation over 64 KiB gets its own mmap, returned to the system when freed
    # (glibc would otherwise raise this threshold and keep freed blocks in its heap), so
    # the resident set follows live tensor memory. The kernel's high-water mark of the
    # resident set (VmHWM) is reset before each measurement (clear_refs 5).
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD

    def status(key: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    torch.set_num_threads(1)
    vocab = 100_000
    model = big_vocab_model(vocab)
    out = {}
    for batch in (4, 8, 4):  # the first batch of 4 warms up (parameter gradients exist from then on)
        ids, mask, positions, weights = rows(batch, 80, vocab)
        chunks = max(1, int(positions.sum()) // 32)  # ~32 positions a chunk
        for name, fn in (("chunked", lambda: token_logprobs(model, ids, mask, 1.0, True, positions, chunks)),
                         ("unchunked", lambda: unchunked(model, ids, mask, 1.0))):
            model.zero_grad(set_to_none=False)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = status("VmRSS:")
            lp, ent = fn()
            ((lp * weights)[positions].sum() + 0.1 * ent[positions].sum()).backward()
            del lp, ent
            out[f"{name}_{batch}"] = (status("VmHWM:") - base) / 2**20
        out["positions_%d" % batch] = int(positions.sum())
    return out


def test_peak_memory_of_the_chunked_output_layer_stays_flat_when_the_batch_doubles():
    """Measured in a fresh process: resident-set high-water mark (kernel VmHWM, reset per
    measurement), with every large allocation mmapped so that freed tensors leave the
    resident set. The unchunked fp32 logits (positions x 100k vocabulary x 4 bytes, ~4
    copies) grow with the batch; the chunked ones stay one chunk."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident set")
    proc = subprocess.run([sys.executable, "-m", "tests.unit.test_microbatch"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)
    logits_mib = report["positions_8"] * 100_000 * 4 / 2**20  # one fp32 copy of the doubled batch's logits
    grown_unchunked = report["unchunked_8"] - report["unchunked_4"]
    grown_chunked = report["chunked_8"] - report["chunked_4"]
    assert grown_unchunked > 0.5 * logits_mib  # the probe sees the logits
    assert grown_chunked < 0.1 * grown_unchunked and grown_chunked < 16  # MiB: flat
    assert report["chunked_8"] < 0.25 * report["unchunked_8"]


if __name__ == "__main__":  # the peak-memory probe, in a process of its own
    print(json.dumps(peak_memory_report()))
