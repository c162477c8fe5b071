"""D³S (arXiv 2509.22115): the sample level (`sampling=d3s`'s trim, buffer/d3s.py) and the
token level (|A|·H through the loss, algorithms/d3s.py), against hand-computed cases; the
schedules; determinism; the sampler's state round trip; micro-batching stays exact; and the
orchestrator's trim hook keeps the ledger balanced."""

from __future__ import annotations

import json

import pytest
import torch

from algorithms import AlgorithmConfig, PolicyLossInputs, compute_policy_loss
from algorithms.d3s import d3s_token_keep_fraction, d3s_token_weights, d3s_top_tokens
from algorithms.losses import importance_weights, loss_denominators
from buffer.d3s import D3sSampler, d3s_keep_count, d3s_trim_indices
from buffer.sampling import DapoFilter, SamplingConfig, build_sampler
from buffer.types import FinishReason, Group, Trajectory
from tests.unit.test_microbatch import random_pieces

ROWS = [{"prompt_id": f"p{i}", "prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(50)]


def group(rewards, group_id="g", **kwargs) -> Group:
    trajs = [Trajectory(prompt_id="p0", group_id=group_id, prompt_ids=[1], response_ids=[2, 3],
                        behaviour_logprobs=[-1.0, -1.0], versions=[0, 0], loss_mask=[1, 1], reward=r,
                        finish_reason=FinishReason.STOP, uid=f"{group_id}-{i}") for i, r in enumerate(rewards)]
    return Group(group_id=group_id, prompt_id="p0", prompt_text="0+1=", row=ROWS[0], trajectories=trajs, **kwargs)


# --- sample level ------------------------------------------------------------------------------


def test_keep_count_rounds_up_within_min_keep_and_n():
    assert d3s_keep_count(8, 0.5, 2) == 4
    assert d3s_keep_count(5, 0.3, 2) == 2 and d3s_keep_count(7, 0.5, 2) == 4  # 1.5 and 3.5: halves up
    assert d3s_keep_count(8, 0.5025, 2) == 4  # the nearest: a schedule just past 0.5 does not jump to 5
    assert d3s_keep_count(10, 0.1, 2) == 2  # 1, raised to min_keep
    assert d3s_keep_count(3, 0.5, 2) == 2 and d3s_keep_count(2, 0.5, 4) == 2  # never more than n
    assert d3s_keep_count(256, 1.0, 2) == 256


def test_trim_keeps_the_max_variance_subset_by_hand():
    # rewards sorted: 0.0(0) 0.15(5) 0.2(1) 0.5(4) 0.9(2) 1.0(3); the k = 3 candidates are
    # the i smallest + the 3 - i largest: i=0 {.5,.9,1} var .0467, i=1 {0,.9,1} var .2022,
    # i=2 {0,.15,1} var .1939, i=3 {0,.15,.2} var .0072 -> i = 1: indices 0, 2, 3
    rewards = [0.0, 0.2, 0.9, 1.0, 0.5, 0.15]
    assert d3s_trim_indices(rewards, 3) == [0, 2, 3]
    for seed in range(5):  # no ties: the tie-breaking shuffle changes nothing
        assert d3s_trim_indices(rewards, 3, tie_seed=seed) == [0, 2, 3]
    sampler = D3sSampler(ROWS, 6, keep_start=0.5, relax_steps=10)
    trimmed = sampler.trim(group(rewards), version=0)
    assert [t.uid for t in trimmed.trajectories] == ["g-0", "g-2", "g-3"]
    assert trimmed.group_id == "g" and trimmed.start_version == 0
    assert sampler.counts == {"groups_trimmed": 1, "samples_trimmed": 3, "samples_kept": 3, "groups_untrimmed": 0}
    m = sampler.metrics()
    assert m["sampling/d3s_samples_trimmed"] == 3.0 and m["sampling/d3s_trimmed_share"] == 0.5
    # Var(kept) - Var(all) = 0.6067/3 - (2.1225/6 - (2.75/6)^2) = 0.20222 - 0.14368
    assert m["sampling/d3s_reward_var_gain"] == pytest.approx(0.2022222 - 0.1436806, abs=1e-6)


def test_binary_rewards_keep_every_success_and_as_many_failures():
    rewards = [1.0, 0, 0, 0, 0, 0, 0, 1.0]  # 2 of 8 solved, k = 4: both successes + 2 failures (var 1/4)
    kept = [d3s_trim_indices(rewards, 4, tie_seed=s) for s in range(40)]
    assert all(0 in k and 7 in k and len(k) == 4 for k in kept)
    assert len({tuple(k) for k in kept}) > 3  # which failures are kept follows the seed, not the order
    sampler = D3sSampler(ROWS, 8, seed=3)
    first = sampler.trim(group(rewards, "abc"), 0)
    again = D3sSampler(ROWS, 8, seed=3).trim(group(rewards, "abc"), 0)
    assert [t.uid for t in first.trajectories] == [t.uid for t in again.trajectories]  # deterministic


def test_schedule_relaxes_to_keep_end_and_then_leaves_groups_whole():
    sampler = D3sSampler(ROWS, 8, keep_start=0.25, keep_end=1.0, relax_steps=100)
    assert [sampler.keep_fraction(v) for v in (0, 50, 100, 400)] == [0.25, 0.625, 1.0, 1.0]
    g = group([1.0, 0, 0, 1.0, 0.5, 0, 1.0, 0])
    assert sampler.trim(g, 0).num_samples == 2
    assert sampler.trim(g, 50).num_samples == 5  # 0.625 x 8
    assert sampler.trim(g, 100) is g
    assert sampler.metrics()["sampling/d3s_keep_fraction"] == 1.0


def test_tree_groups_failed_rewards_and_small_groups_pass_untrimmed():
    sampler = D3sSampler(ROWS, 4, keep_start=0.5)
    tree = group([1.0, 0.0, 0.0, 1.0], tree_parents={1: -1, 2: 1})
    failed = group([1.0, None, 0.0, 1.0])
    small = group([1.0, 0.0])
    assert sampler.trim(tree, 0) is tree and sampler.trim(failed, 0) is failed and sampler.trim(small, 0) is small
    assert sampler.counts["groups_untrimmed"] == 3 and sampler.counts["samples_trimmed"] == 0


def test_state_round_trips_exactly_through_json():
    sampler = D3sSampler(ROWS, 4, seed=7, keep_start=0.5, relax_steps=20)
    items = sampler.next(3, 0)
    sampler.observe([group([1.0, 0, 0, 1.0], items[0].group_id)])
    sampler.trim(group([1.0, 0, 0.5, 1.0], "x"), 4)
    state = json.loads(json.dumps(sampler.state_dict()))
    again = D3sSampler(ROWS, 4, seed=7, keep_start=0.5, relax_steps=20)
    again.load_state_dict(state)
    assert again.state_dict() == sampler.state_dict() and again.metrics() == sampler.metrics()
    assert [i.prompt_id for i in again.next(5, 1)] == [i.prompt_id for i in sampler.next(5, 1)]
    g = group([0.1, 0.9, 0.3, 0.7], "y")
    assert [t.uid for t in again.trim(g, 5).trajectories] == [t.uid for t in sampler.trim(g, 5).trajectories]


def test_build_sampler_names_d3s_and_dapo_filter_forwards_trim():
    sampler = build_sampler(SamplingConfig("d3s", {"keep_start": 0.5}), ROWS, 4, 0, "prompt")
    assert isinstance(sampler, D3sSampler)
    wrapped = build_sampler(SamplingConfig("d3s", {"keep_start": 0.5}), ROWS, 4, 0, "prompt", dynamic_sampling=True)
    assert isinstance(wrapped, DapoFilter) and wrapped.trim(group([1.0, 0, 0, 0.5]), 0).num_samples == 2


@pytest.mark.parametrize("kwargs,field", [({"keep_start": 0.0}, "keep_start"), ({"keep_end": 1.5}, "keep_end"),
                                          ({"relax_steps": 0}, "relax_steps"), ({"min_keep": 1}, "min_keep")])
def test_bad_sampler_kwargs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"sampling.kwargs.{field}="):
        D3sSampler(ROWS, 4, **kwargs)


# --- token level -------------------------------------------------------------------------------


def test_top_tokens_by_hand_per_sequence_and_per_micro_batch():
    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    # row 0: 4 trained, keep 2: 3 and the first 2; row 1: 5 trained, keep ⌊2.5 + ½⌋ = 3: 9 and the first two 5s
    assert d3s_top_tokens(scores, mask, 0.5).tolist() == [[True, False, True, False, False],
                                                           [True, True, False, False, True]]
    # across rows: 9 trained, keep ⌊4.5 + ½⌋ = 5: 9, the three 5s, then 3
    assert d3s_top_tokens(scores, mask, 0.5, "micro_batch").tolist() == [[True, False, False, False, False],
                                                                         [True, True, True, False, True]]
    assert d3s_top_tokens(scores, mask, 1.0).tolist() == (mask > 0).tolist()
    one = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # a row with one trained token keeps it; none keeps none
    assert d3s_top_tokens(torch.tensor([[0.1, 0.2, 5.0], [1.0, 1.0, 1.0]]), one, 0.1).tolist() == [
        [False, True, False], [False, False, False]]
    with pytest.raises(ValueError, match="d3s_token_scope='batch'"):
        d3s_top_tokens(scores, mask, 0.5, "batch")


def test_token_weights_score_by_advantage_times_entropy_and_rescale_rows():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.3, 0.2, 0.8, 0.4]])
    mask = torch.ones(2, 4)
    adv = torch.tensor([2.0, -0.5])  # |A|H: row 0 [.2 1.8 1. .4], row 1 [.15 .1 .4 .2]
    w, m = d3s_token_weights(adv, entropy, mask, 0.5, "micro_batch", rescale=False)
    assert w.tolist() == [[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]]  # top 4 of 8: 1.8, 1.0, .4, .4 (row 0 first)
    assert m == {"d3s_token_keep_frac": 0.5, "d3s_token_keep_target": 0.5}
    w, _ = d3s_token_weights(adv, entropy, mask, 0.5, "sequence", rescale=True)
    assert w.tolist() == [[0.0, 2.0, 2.0, 0.0], [0.0, 0.0, 2.0, 2.0]]  # each row keeps its weight, 4
    w, _ = d3s_token_weights(adv, entropy, mask, 0.25, "micro_batch", rescale=True)
    assert w.tolist() == [[0.0, 4.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # 8 / 2


def test_token_schedule_relaxes_linearly():
    assert [d3s_token_keep_fraction(v, 0.5, 1.0, 100) for v in (0, 20, 100, 300)] == [0.5, 0.6, 1.0, 1.0]
    assert d3s_token_keep_fraction(0, 0.5, 0.9, 0) == 0.9  # nothing to relax over: the end share


def loss_inputs(seed=0, B=3, T=6, version=0):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64)
    logprobs = (old + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_(True)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 4:] = 0
    return PolicyLossInputs(logprobs=logprobs, old_logprobs=old, advantages=torch.tensor([1.0, -2.0, 0.5]),
                            loss_mask=mask, behav_logprobs=old.clone(),
                            entropy=torch.rand(B, T, generator=gen, dtype=torch.float64), current_version=version)


def test_loss_weights_the_kept_tokens_and_relaxes_to_the_plain_loss():
    """Without rescaling, D³S is the plain loss with the dropped tokens masked out and the
    batch's denominators kept (here token-mean over all 16 trained tokens)."""
    cfg = AlgorithmConfig(d3s_token_keep_start=0.5, d3s_relax_steps=10, d3s_token_rescale=False)
    plain_cfg = AlgorithmConfig()
    inputs = loss_inputs()
    out = compute_policy_loss(inputs, cfg)
    keep = d3s_top_tokens(inputs.advantages[:, None].abs() * inputs.entropy, inputs.loss_mask, 0.5)
    assert keep.sum(-1).tolist() == [2, 3, 3]  # half of 4, 6 and 6 trained tokens
    masked = PolicyLossInputs(**{**vars(inputs), "loss_mask": keep.double()})
    expected = compute_policy_loss(masked, plain_cfg, loss_denominators(inputs.loss_mask)).loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert out.metrics["d3s_token_keep_frac"] == pytest.approx(8 / 16) and out.metrics["d3s_token_keep_target"] == 0.5
    late = loss_inputs(version=10)
    assert compute_policy_loss(late, cfg).loss.item() == pytest.approx(
        compute_policy_loss(late, plain_cfg).loss.item(), rel=1e-12)
    assert "d3s_token_keep_frac" not in compute_policy_loss(inputs, plain_cfg).metrics


@pytest.mark.parametrize("missing,message", [("entropy", "PolicyLossInputs.entropy is required when algorithm.d3s"),
                                             ("current_version", "PolicyLossInputs.current_version is required")])
def test_loss_without_entropy_or_version_names_what_is_missing(missing, message):
    inputs = loss_inputs()
    setattr(inputs, missing, None)
    with pytest.raises(ValueError, match=message):
        compute_policy_loss(inputs, AlgorithmConfig(d3s_token_keep_start=0.5))


@pytest.mark.parametrize("fields,message", [
    (dict(d3s_token_keep_start=0.0), "algorithm.d3s_token_keep_start=0.0 must be in"),
    (dict(d3s_token_keep_end=1.2), "algorithm.d3s_token_keep_end=1.2 must be in"),
    (dict(d3s_relax_steps=0), "algorithm.d3s_relax_steps=0 must be >= 1"),
    (dict(d3s_token_scope="group"), "algorithm.d3s_token_scope='group' is not one of"),
])
def test_bad_token_fields_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        AlgorithmConfig(**fields)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_micro_batched_d3s_loss_equals_the_full_batch_loss(mode, rescale, seed):
    """Per-sequence selection and weights are row-local: with the batch's denominators the
    pieces' losses and gradients add up to the one-piece loss, however the rows are split."""
    cfg = AlgorithmConfig(loss_agg=mode, d3s_token_keep_start=0.4, d3s_relax_steps=50, d3s_token_rescale=rescale)
    gen, mask, pieces, widths = random_pieces(seed)
    B, T = mask.shape
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    behav = old + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    logprobs = (old + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_(True)
    entropy = torch.rand(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)

    def loss(rows, width, den):
        cut = (rows, slice(0, width))
        return compute_policy_loss(PolicyLossInputs(logprobs=logprobs[cut], old_logprobs=old[cut], advantages=adv[rows],
                                                    loss_mask=mask[cut], behav_logprobs=behav[cut],
                                                    entropy=entropy[cut], current_version=7), cfg, den).loss

    _, keep, _ = importance_weights(old, behav, mask, decoupled=True, tis="token", tis_cap=2.0)
    den = loss_denominators(mask * keep, max_response_length=T)
    whole = loss(list(range(B)), T, den)
    (g_whole,) = torch.autograd.grad(whole, logprobs)
    parts = sum(loss(p, w, den) for p, w in zip(pieces, widths))
    (g_parts,) = torch.autograd.grad(parts, logprobs)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(g_parts, g_whole, rtol=1e-10, atol=1e-12)


# --- the orchestrator's trim hook --------------------------------------------------------------


def test_orchestrator_trains_trimmed_groups_and_the_ledger_balances():
    from tests.unit.test_orchestrator import ROWS as ORCH_ROWS
    from tests.unit.test_orchestrator import make
    from tests.unit.fakes import run_virtual

    sampler = D3sSampler(ORCH_ROWS, 4, seed=0, keep_start=0.5, keep_end=0.5)  # constant: 2 of 4
    orch, _, trainer, logger = make(eta=1, n=4, sampler=sampler, steps=8)
    summary = run_virtual(orch.run())
    assert summary["lost"] == 0 and trainer.max_group_size == 2  # 0.5 x 4 of every group
    assert summary["samples_trimmed"] == sampler.counts["samples_trimmed"] == 2 * summary["consumed"]
    steps = [m for _, m in logger.logs if "train/loss" in m]
    assert [m["sampling/d3s_samples_trimmed"] > 0 for m in steps] == [True] * 8
    assert all(m["batch/samples_per_group_max"] == 2 for m in steps)
    assert all(m["ledger/samples_trimmed"] > 0 for m in steps)
