"""Policy losses, aggregation, off-policy weights and config validation.

Reference values come from the plain per-token Python loops below, or by hand.
"""

import math

import pytest
import torch

from algorithms import (
    AGGREGATIONS,
    POLICY_LOSSES,
    AlgorithmConfig,
    PolicyLossInputs,
    aggregate,
    compute_policy_loss,
)
from algorithms.losses import importance_weights, kl_k3, loglinear_prox

MODES = list(AGGREGATIONS)
LOSSES = list(POLICY_LOSSES)


# --- independent loop implementations -----------------------------------------------------


def loop_aggregate(loss, mask, mode, constant=None):
    B, T = len(loss), len(loss[0])
    lens = [sum(mask[i]) for i in range(B)]
    sums = [sum(loss[i][t] for t in range(T) if mask[i][t]) for i in range(B)]
    nonempty = [i for i in range(B) if lens[i] > 0]
    if mode == "token-mean":
        return sum(sums) / max(sum(lens), 1)
    if mode == "seq-mean-token-mean":
        return sum(sums[i] / lens[i] for i in nonempty) / max(len(nonempty), 1)
    if mode == "seq-mean-token-sum":
        return sum(sums) / max(len(nonempty), 1)
    if mode == "seq-mean-token-sum-norm":
        return sum(sums) / (constant if constant is not None else T)
    raise AssertionError(mode)


def loop_clip(r, a, cl, ch, c):
    loss = max(-a * r, -a * min(max(r, 1 - cl), 1 + ch))
    if c is not None and a < 0:
        loss = min(loss, -a * c)
    return loss


def loop_token_losses(lp, old, adv, mask, kind="ppo_clip", cl=0.2, ch=0.2, c=None):
    """Per-token loss as nested lists; gspo uses the sequence ratio exp(mean log r), log capped at 10."""
    out = []
    for i in range(len(lp)):
        T, n = len(lp[i]), sum(mask[i])
        log_s = min(sum(lp[i][t] - old[i][t] for t in range(T) if mask[i][t]) / max(n, 1), 10.0)
        row = []
        for t in range(T):
            r = math.exp(lp[i][t] - old[i][t]) if kind == "ppo_clip" else math.exp(log_s)
            a = adv[i][t] if isinstance(adv[i], list) else adv[i]
            row.append(loop_clip(r, a, cl, ch, c))
        out.append(row)
    return out


def loop_loss(logprobs, old, adv, mask, *, kind="ppo_clip", clip=(0.2, 0.2), dual=None, mode="token-mean",
              weight=None):
    """The expected scalar loss, from tensors, through the loops above; weight: (B, T) nested list."""
    m = mask.tolist()
    per_token = loop_token_losses(logprobs.tolist(), old.tolist(), adv.tolist(), m, kind, *clip, dual)
    if weight is not None:
        per_token = [[w * x for w, x in zip(w_row, row)] for w_row, row in zip(weight, per_token)]
    return loop_aggregate(per_token, m, mode)


# --- fixtures ---------------------------------------------------------------------------


def make_batch(seed=0, B=4, T=6, dtype=torch.float64, spread=0.3):
    """Random batch with variable lengths, one fully masked row, mixed-sign advantages."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=dtype) * 2
    logprobs = (old + spread * torch.randn(B, T, generator=gen, dtype=dtype)).requires_grad_(True)
    lengths = torch.tensor([T, 2, 0, 4])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T) bool, right padded
    advantages = torch.tensor([1.0, -0.5, 0.8, -1.5], dtype=dtype)[:B]
    return logprobs, old, advantages, mask


# AlgorithmConfig() is Grove's GRPO recipe, off-policy correction included (decoupled PPO
# with token TIS). Tests of the surrogate, the aggregation, KL and entropy, and of one
# correction at a time, start from the plain loss instead.
NO_CORRECTION = {"decoupled": False, "tis": "none"}


def plain_cfg(**fields) -> AlgorithmConfig:
    """An AlgorithmConfig without off-policy correction, plus `fields`."""
    return AlgorithmConfig(**{**NO_CORRECTION, **fields})


def run(cfg, logprobs, old, adv, mask, **kw):
    inputs = PolicyLossInputs(logprobs=logprobs, old_logprobs=old, advantages=adv, loss_mask=mask, **kw)
    return compute_policy_loss(inputs, cfg)


# --- aggregation ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(3))
def test_aggregate_matches_loop(mode, seed):
    gen = torch.Generator().manual_seed(seed)
    loss = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=gen) < 0.6
    mask[1] = False  # a fully masked row
    expected = loop_aggregate(loss.tolist(), mask.tolist(), mode)
    assert aggregate(loss, mask, mode).item() == pytest.approx(expected)
    assert aggregate(loss, mask.double(), mode).item() == pytest.approx(expected)  # float mask
    expected = loop_aggregate(loss.tolist(), mask.tolist(), mode, 3.0)
    assert aggregate(loss, mask, mode, constant=3.0).item() == pytest.approx(expected)


def _sequence_weights(mode, lengths, T=8, constant=None):
    """Total gradient weight each sequence receives when every token's loss is 1."""
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    loss = torch.ones(len(lengths), T, dtype=torch.float64, requires_grad=True)
    aggregate(loss, mask, mode, constant).backward()
    assert (loss.grad[~mask] == 0).all()
    return (loss.grad * mask).sum(-1).tolist()


def test_token_mean_weights_sequences_by_length():
    # DAPO: every token weighs 1 / total tokens, so a 6-token sequence counts 3x a 2-token one.
    assert _sequence_weights("token-mean", [6, 2]) == pytest.approx([6 / 8, 2 / 8])


def test_seq_mean_token_mean_weights_sequences_equally():
    # GRPO: (1/G) sum_i (1/|o_i|) sum_t, every sequence weighs 1/G whatever its length.
    assert _sequence_weights("seq-mean-token-mean", [6, 2, 1]) == pytest.approx([1 / 3] * 3)


def test_seq_mean_token_sum_weights_tokens_by_one_over_g():
    assert _sequence_weights("seq-mean-token-sum", [6, 2]) == pytest.approx([6 / 2, 2 / 2])


def test_seq_mean_token_sum_norm_uses_a_constant_divisor():
    # Dr.GRPO: each token weighs 1/L_const, independent of the other sequences in the batch.
    assert _sequence_weights("seq-mean-token-sum-norm", [6, 2], T=8) == pytest.approx([6 / 8, 2 / 8])
    assert _sequence_weights("seq-mean-token-sum-norm", [6], T=8) == pytest.approx([6 / 8])
    assert _sequence_weights("seq-mean-token-sum-norm", [6, 2], constant=100.0) == pytest.approx([0.06, 0.02])


def test_seq_mean_token_sum_norm_is_not_divided_by_the_sequence_count():
    # Grove: sum_{i,t} l / L_const. verl (>= v0.7.1) also divides by the G non-empty
    # sequences, so Grove's value is G times verl's; the docstring says so.
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)  # one row empty
    grove = aggregate(loss, mask, "seq-mean-token-sum-norm", constant=10.0)
    assert grove.item() == pytest.approx((1 + 2 + 3 + 5 + 6) / 10)
    verl_style = (loss * mask).sum(-1).sum() / (mask.sum(-1) > 0).sum() / 10.0
    assert grove.item() == pytest.approx(2 * verl_style.item())
    doubled = aggregate(torch.cat([loss, loss]), torch.cat([mask, mask]), "seq-mean-token-sum-norm", constant=10.0)
    assert doubled.item() == pytest.approx(2 * grove.item())


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_all_masked_is_zero_and_differentiable(mode):
    loss = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = aggregate(loss, torch.zeros(2, 3, dtype=torch.bool), mode)
    out.backward()
    assert out.item() == 0.0 and (loss.grad == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_gradcheck(mode):
    loss = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: aggregate(x, mask, mode), (loss,))


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match="'nope' is not one of"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "nope")


# --- policy losses against loops --------------------------------------------------------


@pytest.mark.parametrize("kind", ["ppo_clip", "gspo"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_policy_loss_matches_loop(kind, mode, dual_clip):
    logprobs, old, adv, mask = make_batch(seed=3, spread=0.5)
    cfg = plain_cfg(policy_loss=kind, loss_agg=mode, clip_low=0.2, clip_high=0.28, dual_clip=dual_clip)
    expected = loop_loss(logprobs, old, adv, mask, kind=kind, clip=(0.2, 0.28), dual=dual_clip, mode=mode)
    assert run(cfg, logprobs, old, adv, mask).loss.item() == pytest.approx(expected)


def test_ppo_clip_flags_match_loop():
    logprobs, old, adv, mask = make_batch(seed=5, spread=0.8)
    cfg = plain_cfg(clip_low=0.2, clip_high=0.28, dual_clip=2.0)
    m = run(cfg, logprobs, old, adv, mask).metrics
    low = high = dual = n = 0
    ratios = []
    for i in range(4):
        for t in range(6):
            if mask[i, t]:
                r, a = math.exp(logprobs[i, t].item() - old[i, t].item()), adv[i].item()
                ratios.append(r)
                n += 1
                low += a < 0 and r < 0.8
                high += a > 0 and r > 1.28
                dual += a < 0 and r > 2.0
    assert high > 0 and low > 0 and dual > 0  # the batch exercises every branch
    assert m["clip_frac_low"] == pytest.approx(low / n)
    assert m["clip_frac_high"] == pytest.approx(high / n)
    assert m["dual_clip_frac"] == pytest.approx(dual / n)
    assert m["ratio_mean"] == pytest.approx(sum(ratios) / n)
    assert m["ratio_max"] == pytest.approx(max(ratios))


def test_clipped_tokens_get_no_gradient():
    old = torch.zeros(1, 3, dtype=torch.float64)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 5.0]], dtype=torch.float64)).requires_grad_(True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    cfg = plain_cfg(dual_clip=3.0, loss_agg="seq-mean-token-sum")
    # A > 0, r = 1.5 > 1.2: clipped high
    run(cfg, logprobs, old, torch.tensor([1.0]), mask).loss.backward()
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 1] != 0 and logprobs.grad[0, 2] == 0
    # A < 0: r = 0.5 < 0.8 is clipped low; r = 5 > c = 3 is dual clipped, loss = -A * c = 3
    logprobs.grad = None
    out = run(cfg, logprobs, old, torch.tensor([-1.0]), mask)
    out.loss.backward()
    assert logprobs.grad[0, 0] != 0 and logprobs.grad[0, 1] == 0 and logprobs.grad[0, 2] == 0
    assert out.loss.item() == pytest.approx(1.5 + 0.8 + 3.0)


def test_gspo_ratio_is_capped_at_exp10():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logprobs = torch.full((1, 2), 50.0, dtype=torch.float64)
    cfg = plain_cfg(policy_loss="gspo", clip_high=1e9)  # no clipping: loss = -A * s
    out = run(cfg, logprobs, old, torch.tensor([1.0]), torch.ones(1, 2))
    assert out.loss.item() == pytest.approx(-math.exp(10))


def test_gspo_token_equals_gspo_in_value_and_gradient():
    logprobs, old, adv, mask = make_batch(seed=7, spread=0.05)
    results = []
    for kind in ("gspo", "gspo_token"):
        lp = logprobs.detach().clone().requires_grad_(True)
        cfg = plain_cfg(policy_loss=kind, clip_low=0.03, clip_high=0.04, loss_agg="seq-mean-token-mean")
        out = run(cfg, lp, old, adv, mask)
        out.loss.backward()
        results.append((out.loss.item(), lp.grad, out.metrics))
    (l1, g1, m1), (l2, g2, m2) = results
    assert l1 == pytest.approx(l2)
    torch.testing.assert_close(g1, g2)
    assert m1["clip_frac_high"] == m2["clip_frac_high"] and m1["clip_frac_low"] == m2["clip_frac_low"]


@pytest.mark.parametrize("kind", LOSSES)
def test_on_policy_loss_is_minus_mean_advantage(kind):
    logprobs, _, adv, mask = make_batch(seed=1)
    old = logprobs.detach().clone()  # ratio = 1 everywhere
    lengths = mask.sum(-1).double()
    # seq-mean-token-mean: -mean_i A_i over non-empty sequences; gradient -A_i / (G |o_i|) per token
    out = run(plain_cfg(policy_loss=kind, loss_agg="seq-mean-token-mean"), logprobs, old, adv, mask)
    out.loss.backward()
    nonempty = lengths > 0
    assert out.loss.item() == pytest.approx(-adv[nonempty].mean().item())
    expected_grad = (-adv / (nonempty.sum() * lengths.clamp(min=1)))[:, None] * mask
    torch.testing.assert_close(logprobs.grad, expected_grad)
    assert out.metrics["ratio_mean"] == pytest.approx(1.0) and out.metrics["approx_kl"] == pytest.approx(0.0)
    # token-mean: -sum_i A_i |o_i| / sum_i |o_i|
    out = run(plain_cfg(policy_loss=kind), logprobs, old, adv, mask)
    assert out.loss.item() == pytest.approx(-(adv * lengths).sum().item() / lengths.sum().item())


def test_per_token_advantages():
    logprobs, old, _, mask = make_batch(seed=2)
    adv = torch.randn(4, 6, dtype=torch.float64)
    out = run(plain_cfg(), logprobs, old, adv, mask)
    assert out.loss.item() == pytest.approx(loop_loss(logprobs, old, adv, mask))


# --- gradcheck --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_gradcheck(kind, mode):
    logprobs, old, adv, mask = make_batch(seed=11, B=4, T=5)
    ref = old - 0.1
    entropy = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)
    clip = (0.2, 0.28) if kind == "ppo_clip" else (0.03, 0.04)
    cfg = plain_cfg(
        policy_loss=kind, loss_agg=mode, clip_low=clip[0], clip_high=clip[1], dual_clip=3.0, kl_coef=0.1,
        entropy_coef=0.01,
    )

    def f(lp, ent):
        return run(cfg, lp, old, adv, mask, ref_logprobs=ref, entropy=ent).loss

    assert torch.autograd.gradcheck(f, (logprobs, entropy))


# --- KL and entropy ---------------------------------------------------------------------


def test_kl_k3_values():
    lp = torch.tensor([-1.0, -2.0, 0.0, -100.0], dtype=torch.float64)
    ref = torch.tensor([-1.0, -1.0, -3.0, 0.0], dtype=torch.float64)
    x = [0.0, 1.0, -3.0, 20.0]  # ref - lp, the last clamped from 100 to 20
    expected = torch.tensor([math.exp(v) - v - 1 for v in x], dtype=torch.float64)
    torch.testing.assert_close(kl_k3(lp, ref), expected)
    assert (kl_k3(torch.randn(50), torch.randn(50)) >= 0).all()


def test_kl_and_entropy_terms():
    logprobs, old, adv, mask = make_batch(seed=4)
    ref = old + 0.2
    entropy = torch.rand(4, 6, dtype=torch.float64, requires_grad=True)
    base = run(plain_cfg(), logprobs, old, adv, mask).loss
    cfg = plain_cfg(kl_coef=0.3, entropy_coef=0.05)
    out = run(cfg, logprobs, old, adv, mask, ref_logprobs=ref, entropy=entropy)
    kl = aggregate(kl_k3(logprobs, ref), mask, "token-mean")
    ent = aggregate(entropy, mask, "token-mean")
    assert out.loss.item() == pytest.approx((base + 0.3 * kl - 0.05 * ent).item())
    assert out.metrics["kl"] == pytest.approx(kl.item())
    assert out.metrics["entropy"] == pytest.approx(ent.item())
    out.loss.backward()
    torch.testing.assert_close(entropy.grad, -0.05 * mask.double() / mask.sum())  # the bonus raises entropy


# --- off-policy correction --------------------------------------------------------------


def test_token_tis_caps_the_weight():
    logprobs, old, adv, mask = make_batch(seed=6)
    behav = old - torch.linspace(-1.5, 1.5, 24, dtype=torch.float64).reshape(4, 6)  # rho from e^-1.5 to e^1.5
    cfg = plain_cfg(tis="token", tis_cap=2.0)
    out = run(cfg, logprobs, old, adv, mask, behav_logprobs=behav)
    rho = (old - behav).exp().tolist()
    weight = [[min(r, 2.0) for r in row] for row in rho]
    assert out.loss.item() == pytest.approx(loop_loss(logprobs, old, adv, mask, weight=weight))
    capped = [rho[i][t] > 2.0 for i in range(4) for t in range(6) if mask[i, t]]
    assert out.metrics["is_clipped_frac"] == pytest.approx(sum(capped) / len(capped)) and any(capped)
    assert out.metrics["is_weight_max"] == pytest.approx(2.0)


def test_sequence_tis_uses_the_capped_product():
    logprobs, old, adv, mask = make_batch(seed=6)
    log_rho = [-0.3, 0.4, 0.0, 0.05]  # per token, constant within each sequence
    behav = old - torch.tensor(log_rho, dtype=torch.float64)[:, None]
    out = run(plain_cfg(tis="sequence", tis_cap=2.0), logprobs, old, adv, mask, behav_logprobs=behav)
    lengths = mask.sum(-1).tolist()
    seq_w = [min(math.exp(x * n), 2.0) for x, n in zip(log_rho, lengths)]  # min(prod_t rho_t, C)
    assert seq_w[1] == 2.0 and seq_w[0] < 1 and 1 < seq_w[3] < 2
    weight = [[w] * 6 for w in seq_w]
    assert out.loss.item() == pytest.approx(loop_loss(logprobs, old, adv, mask, weight=weight))


def test_decoupled_weight_is_constant_and_uncapped():
    logprobs, prox, adv, mask = make_batch(seed=8)
    prox.requires_grad_(True)
    behav = (prox.detach() - 1.0).requires_grad_(True)  # w = e^1 > 2, uncapped without TIS
    out = run(plain_cfg(decoupled=True), logprobs, prox, adv, mask, behav_logprobs=behav)
    out.loss.backward()
    assert prox.grad is None and behav.grad is None  # no gradient into pi_prox or pi_behav
    assert out.metrics["is_weight_mean"] == pytest.approx(math.e)
    # gradient = w * the plain PPO gradient with ratio pi_theta / pi_prox
    lp = logprobs.detach().clone().requires_grad_(True)
    run(plain_cfg(), lp, prox.detach(), adv, mask).loss.backward()
    torch.testing.assert_close(logprobs.grad, math.e * lp.grad)
    expected = loop_loss(logprobs, prox.detach(), adv, mask, weight=[[math.e] * 6] * 4)
    assert out.loss.item() == pytest.approx(expected)


def test_decoupled_with_tis_caps_instead_of_multiplying():
    logprobs, prox, adv, mask = make_batch(seed=8)
    behav = prox - 1.0
    cfg = AlgorithmConfig(decoupled=True, tis="token", tis_cap=2.0)
    assert cfg == AlgorithmConfig()  # Grove's default correction
    out = run(cfg, logprobs, prox, adv, mask, behav_logprobs=behav)
    assert out.loss.item() == pytest.approx(loop_loss(logprobs, prox, adv, mask, weight=[[2.0] * 6] * 4))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rejection_masks_out_of_range(level):
    logprobs, old, adv, mask = make_batch(seed=9)
    shift = torch.zeros(4, 6, dtype=torch.float64)
    shift[0, 1] = 2.0  # one token of sequence 0 with rho = e^2 > 2
    behav = old - shift
    cfg = plain_cfg(rejection=level, rejection_low=0.5, rejection_high=2.0)
    out = run(cfg, logprobs, old, adv, mask, behav_logprobs=behav)
    keep = mask.clone()
    if level == "token":
        keep[0, 1] = False
    # sequence level: the geometric mean over 6 tokens, e^(2/6) = 1.40, is inside [0.5, 2]: all kept
    assert out.loss.item() == pytest.approx(loop_loss(logprobs, old, adv, keep))
    assert out.metrics["rejected_frac"] == pytest.approx((mask.sum() - keep.sum()).item() / mask.sum().item())


def test_sequence_rejection_drops_the_whole_sequence():
    logprobs, old, adv, mask = make_batch(seed=9)
    behav = old + torch.tensor([[0.0], [1.0], [0.0], [0.0]], dtype=torch.float64)  # seq 1 geo mean e^-1 < 0.5
    cfg = plain_cfg(rejection="sequence", loss_agg="seq-mean-token-mean")
    out = run(cfg, logprobs, old, adv, mask, behav_logprobs=behav)
    keep = mask.clone()
    keep[1] = False
    assert out.loss.item() == pytest.approx(loop_loss(logprobs, old, adv, keep, mode="seq-mean-token-mean"))
    assert out.metrics["rejected_frac"] == pytest.approx(2 / 12)


def test_rejection_bounds_ignored_when_rejection_is_off():
    old = torch.zeros(2, 3)
    w, keep, m = importance_weights(
        old, old.clone(), torch.ones(2, 3), tis="token", rejection_low=1.5, rejection_high=3.0
    )
    assert (keep == 1).all() and m["rejected_frac"] == 0.0 and (w == 1).all()


def test_importance_weights_off_is_identity():
    mask = torch.ones(2, 3)
    w, keep, m = importance_weights(torch.zeros(2, 3), None, mask)
    assert torch.equal(w, mask) and torch.equal(keep, mask) and m["is_weight_mean"] == 1.0


def test_mismatch_kl_metric():
    logprobs, old, adv, mask = make_batch(seed=1)
    out = run(plain_cfg(), logprobs, old, adv, mask, behav_logprobs=old.clone())
    assert out.metrics["mismatch_kl"] == pytest.approx(0.0)
    out = run(plain_cfg(), logprobs, old, adv, mask, behav_logprobs=old - 0.5)
    assert out.metrics["mismatch_kl"] == pytest.approx(math.exp(0.5) - 0.5 - 1)


# --- log-linear proximal approximation --------------------------------------------------


def test_loglinear_prox_hand_values():
    behav = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    current = torch.tensor([[-2.0, -2.0, -2.0, -2.0, -2.0]], dtype=torch.float64, requires_grad=True)
    versions = torch.tensor([[10, 9, 7, 11, -1]])  # v_prox = 10, v_current = 11
    out = loglinear_prox(behav, current, versions, v_prox=10, v_current=11)
    # alpha: (10-10)/1 = 0, (10-9)/2 = 0.5, 3/4, v_behav >= v_current -> 0, no version -> 0
    alpha = torch.tensor([[0.0, 0.5, 0.75, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out, behav + alpha * (current.detach() - behav))
    assert not out.requires_grad


def test_loglinear_mode_equals_recompute_with_the_approximation():
    logprobs, _, adv, mask = make_batch(seed=10)
    behav = logprobs.detach() - 0.3
    versions = torch.tensor([5, 4, 3, 2]).repeat_interleave(6).reshape(4, 6)
    cfg = AlgorithmConfig(decoupled=True, prox_mode="loglinear", tis="token")
    out = run(cfg, logprobs, None, adv, mask, behav_logprobs=behav, versions=versions, current_version=5)
    prox = loglinear_prox(behav, logprobs.detach(), versions, v_prox=5, v_current=6)
    recompute = AlgorithmConfig(decoupled=True, tis="token")
    expected = run(recompute, logprobs, prox, adv, mask, behav_logprobs=behav)
    assert out.loss.item() == pytest.approx(expected.loss.item())
    with pytest.raises(ValueError, match="versions is required"):
        run(cfg, logprobs, None, adv, mask, behav_logprobs=behav, current_version=5)


# --- missing inputs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, match",
    [
        (plain_cfg(kl_coef=0.1), "ref_logprobs is required"),
        (plain_cfg(entropy_coef=0.1), "entropy is required"),
        (plain_cfg(tis="token"), "behav_logprobs"),
        (plain_cfg(decoupled=True), "behav_logprobs"),
        (AlgorithmConfig(), "behav_logprobs"),  # the default recipe corrects, so it needs them
    ],
)
def test_missing_inputs_are_named(cfg, match):
    logprobs, old, adv, mask = make_batch()
    with pytest.raises(ValueError, match=match):
        run(cfg, logprobs, old, adv, mask)


def test_old_logprobs_required_outside_loglinear():
    logprobs, _, adv, mask = make_batch()
    with pytest.raises(ValueError, match="old_logprobs is required"):
        run(AlgorithmConfig(), logprobs, None, adv, mask)


# --- config -----------------------------------------------------------------------------


def test_default_config_is_grpo():
    cfg = AlgorithmConfig()
    assert (cfg.advantage, cfg.policy_loss, cfg.clip_low) == ("group_norm", "ppo_clip", 0.2)
    assert not cfg.needs_reference and AlgorithmConfig(kl_coef=0.001).needs_reference
    # Grove's GRPO trains asynchronously, so its default carries the off-policy correction
    assert (cfg.decoupled, cfg.prox_mode, cfg.tis, cfg.tis_cap) == (True, "recompute", "token", 2.0)
    assert cfg.needs_behav_logprobs and not plain_cfg().needs_behav_logprobs


def test_registries_are_accepted_by_config():
    for name in POLICY_LOSSES:
        AlgorithmConfig(policy_loss=name)
    for mode in AGGREGATIONS:
        AlgorithmConfig(loss_agg=mode)


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("advantage", "ppo", "is not one of ['group_norm', 'mean_only']"),
        ("policy_loss", "dpo", "is not one of ['ppo_clip', 'gspo', 'gspo_token']"),
        ("loss_agg", "foo", "is not one of ['token-mean', "),
        ("prox_mode", "linear", "is not one of ['recompute', 'loglinear']"),
        ("tis", "seq", "is not one of ['none', 'token', 'sequence']"),
        ("rejection", "all", "is not one of ['none', 'token', 'sequence']"),
        ("adv_eps", 0.0, "must be > 0"),
        ("novelty_lambda", -1.0, "must be >= 0"),
        ("novelty_kappa", -0.1, "must be >= 0"),
        ("clip_low", 1.0, "must be in [0, 1)"),
        ("clip_high", -0.1, "must be >= 0"),
        ("dual_clip", 0.9, "must be > 1"),
        ("loss_agg_constant", 0.0, "must be > 0"),
        ("kl_coef", -0.001, "must be >= 0"),
        ("entropy_coef", -1.0, "must be >= 0"),
        ("tis_cap", 0.0, "must be > 0"),
        ("rejection_low", -0.5, "must be >= 0"),
        ("rejection_high", 0.4, "must be > algorithm.rejection_low=0.5"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_message(field, value, fragment):
    with pytest.raises(ValueError) as err:
        AlgorithmConfig(**{field: value})
    message = str(err.value)
    assert f"algorithm.{field}={value!r}" in message and fragment in message


def test_config_loglinear_needs_decoupled():
    with pytest.raises(ValueError, match="set algorithm.decoupled=true"):
        AlgorithmConfig(prox_mode="loglinear", decoupled=False)
    AlgorithmConfig(prox_mode="loglinear")  # decoupled is on by default
