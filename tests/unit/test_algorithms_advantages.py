"""Advantage estimators against hand values and a plain per-group loop."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from algorithms import ADVANTAGE_ESTIMATORS, AlgorithmConfig, compute_advantages
from algorithms.advantages import group_normalized, mean_only, novelty_sharpen


# --- independent loop implementations -----------------------------------------------------


def _members(values, ids, g):
    return [v for v, i in zip(values, ids) if i == g]


def loop_group_norm(rewards, ids, eps):
    out = []
    for r, g in zip(rewards, ids):
        group = _members(rewards, ids, g)
        if len(set(group)) == 1:  # singleton or all-equal: no signal
            out.append(0.0)
            continue
        out.append((r - statistics.fmean(group)) / (statistics.stdev(group) + eps))
    return out


def loop_mean_only(rewards, ids):
    out = []
    for r, g in zip(rewards, ids):
        group = _members(rewards, ids, g)
        out.append(0.0 if len(set(group)) == 1 else r - statistics.fmean(group))
    return out


def loop_novelty(adv, s, ids, lam, kappa):
    out = []
    for a, si, g in zip(adv, s, ids):
        if a > 0:
            eta = math.exp(si - statistics.fmean(_members(s, ids, g)))
            a = a + min(max(lam * (1 - eta), 0.0), kappa * a)
        out.append(a)
    return out


def _random_batch(seed, n=40, num_groups=7):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([-5, 0, 3, 17, 1000, 2, 9])[:num_groups]  # arbitrary, unsorted labels
    ids = labels[torch.randint(0, num_groups, (n,), generator=gen)]  # variable group sizes
    rewards = torch.randint(0, 3, (n,), generator=gen).double() + 0.1 * torch.randn(n, generator=gen).double()
    return rewards, ids


# --- group_normalized -------------------------------------------------------------------


def test_group_norm_hand_values():
    # group 4: rewards 1,0,0,0 -> mean 0.25, unbiased std 0.5; group 9: 2, 4 -> mean 3, std sqrt(2)
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.0, 4.0, 0.0])
    ids = torch.tensor([4, 4, 9, 4, 9, 4])
    adv = group_normalized(rewards, ids, eps=0.0)
    s2 = math.sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -1 / s2, -0.5, 1 / s2, -0.5]))


@pytest.mark.parametrize("seed", range(5))
def test_group_norm_matches_loop(seed):
    rewards, ids = _random_batch(seed)
    expected = loop_group_norm(rewards.tolist(), ids.tolist(), 1e-6)
    torch.testing.assert_close(group_normalized(rewards, ids, 1e-6), torch.tensor(expected).to(rewards))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.floats(-5, 5, width=32)), min_size=1, max_size=20))
def test_group_norm_property(pairs):
    ids = [g for g, _ in pairs]
    rewards = [r for _, r in pairs]
    adv = group_normalized(torch.tensor(rewards, dtype=torch.float64), torch.tensor(ids), 1e-6)
    torch.testing.assert_close(adv, torch.tensor(loop_group_norm(rewards, ids, 1e-6), dtype=torch.float64))


def test_group_norm_degenerate_groups_get_zero():
    rewards = torch.tensor([0.7, 0.3, 0.3, 0.3, 1.0, 1.0])
    ids = torch.tensor([1, 2, 2, 2, 3, 3])  # singleton, all-equal, all-equal
    assert torch.equal(group_normalized(rewards, ids), torch.zeros(6))
    # a single sample overall
    assert group_normalized(torch.tensor([5.0]), torch.tensor([0])).item() == 0.0


# --- all-equal groups: exactly 0 in every dtype --------------------------------------------
# The mean of equal rewards that are not dyadic fractions is rounded, so rewards - mean is a
# few ulps, not 0; group_norm divides that by std + eps ~ eps (eight float32 0.7s gave ~0.056,
# sixteen ~0.1, bfloat16 ~1). The trainer builds rewards in float32.

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NON_DYADIC = [0.7, 0.1, 1 / 3, 0.3, -0.7, 2.2]
ESTIMATORS = {"group_norm": group_normalized, "mean_only": mean_only}
# Tolerance of a not-all-equal group against the float64 loop: the statistics are computed
# in the rewards' dtype, so half-precision types round visibly.
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-5, torch.float64: 1e-9}


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", [2, 3, 7, 8, 16, 64])
@pytest.mark.parametrize("value", NON_DYADIC)
def test_all_equal_group_is_exactly_zero(estimator, dtype, size, value):
    rewards = torch.full((size,), value, dtype=dtype)
    adv = ESTIMATORS[estimator](rewards, torch.full((size,), 42))
    assert adv.dtype == dtype
    assert torch.equal(adv, torch.zeros(size, dtype=dtype)), adv


def _mixed_batch(dtype, seed):
    """Equal and non-equal groups of sizes 7, 8, 16, 64, interleaved, unsorted sparse labels."""
    gen = torch.Generator().manual_seed(seed)
    labels, values, flat = [], [], []
    for k, (size, value) in enumerate(zip([7, 8, 16, 64], [0.7, 0.1, 1 / 3, 0.3])):
        labels += [1000 - 97 * k] * size  # all equal, non-dyadic
        values += [value] * size
        labels += [-3 + 41 * k] * size  # varied: 0/1 plus non-dyadic noise
        values += (torch.randint(0, 2, (size,), generator=gen) + 0.3 * torch.rand(size, generator=gen)).tolist()
        flat += [1000 - 97 * k]
    perm = torch.randperm(len(labels), generator=gen)
    ids = torch.tensor(labels)[perm]
    rewards = torch.tensor(values, dtype=torch.float64).to(dtype)[perm]
    return rewards, ids, torch.isin(ids, torch.tensor(flat))


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(3))
def test_mixed_batch_zeroes_equal_groups_and_keeps_the_others(estimator, dtype, seed):
    rewards, ids, flat = _mixed_batch(dtype, seed)
    adv = ESTIMATORS[estimator](rewards, ids)
    assert adv.dtype == dtype
    assert torch.equal(adv[flat], torch.zeros(int(flat.sum()), dtype=dtype))
    assert (adv[~flat] != 0).any()
    exact = rewards.double().tolist()  # the loop sees the same (rounded) rewards, in float64
    if estimator == "group_norm":
        expected = loop_group_norm(exact, ids.tolist(), 1e-6)
    else:
        expected = loop_mean_only(exact, ids.tolist())
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(adv.double(), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_trainer_float32_rewards_all_equal_give_zero(name):
    # as the trainer calls it: float32 rewards, one group per prompt, through the registry
    rewards = torch.tensor([0.7] * 8 + [0.1] * 16 + [0.0, 1.0, 0.7, 0.7], dtype=torch.float32)
    ids = torch.tensor([5] * 8 + [2] * 16 + [9] * 4)
    adv = compute_advantages(rewards, ids, AlgorithmConfig(advantage=name))
    assert torch.equal(adv[:24], torch.zeros(24))
    assert (adv[24:] != 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_novelty_sharpen_keeps_all_equal_groups_at_zero(dtype):
    rewards, ids, flat = _mixed_batch(dtype, 0)
    adv = group_normalized(rewards, ids)
    s = -torch.rand(len(rewards), generator=torch.Generator().manual_seed(1)).to(dtype) * 3  # novel and not
    out = novelty_sharpen(adv, s, ids, lam=100.0, kappa=0.5)  # a bonus as large as allowed
    assert torch.equal(out[flat], torch.zeros(int(flat.sum()), dtype=dtype))
    assert (out[~flat] >= adv[~flat]).all()


def test_group_norm_keeps_dtype_and_is_scale_invariant():
    rewards, ids = _random_batch(0)
    a = group_normalized(rewards.float(), ids, eps=0.0)
    assert a.dtype == torch.float32
    scaled = group_normalized(rewards.float() * 10 + 3, ids, eps=0.0)
    torch.testing.assert_close(scaled, a, atol=1e-5, rtol=1e-5)


# --- mean_only --------------------------------------------------------------------------


def test_mean_only_hand_values():
    adv = mean_only(torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0]), torch.tensor([0, 0, 0, 0, 1]))
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0]))


@pytest.mark.parametrize("seed", range(5))
def test_mean_only_matches_loop_and_sums_to_zero(seed):
    rewards, ids = _random_batch(seed)
    adv = mean_only(rewards, ids)
    expected = loop_mean_only(rewards.tolist(), ids.tolist())
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    for g in ids.unique():
        assert abs(adv[ids == g].sum().item()) < 1e-9


# --- novelty sharpening -----------------------------------------------------------------


def test_novelty_hand_values():
    adv = torch.tensor([1.0, 1.0, -1.0, 0.5])
    s = torch.tensor([-2.0, -1.0, -3.0, -2.0])  # group mean -2.0
    out = novelty_sharpen(adv, s, torch.zeros(4, dtype=torch.long), lam=1.0, kappa=0.5)
    # i=0: eta=1 -> bonus 0; i=1: eta=e -> 1-eta<0 -> 0; i=2: A<0 unchanged; i=3: eta=1 -> 0
    torch.testing.assert_close(out, adv)
    s = torch.tensor([-3.0, -1.0, -2.0, -2.0])  # i=0 is novel: eta=e^-1
    out = novelty_sharpen(adv, s, torch.zeros(4, dtype=torch.long), lam=1.0, kappa=0.5)
    expected_bonus = min(1 - math.exp(-1.0), 0.5 * 1.0)
    torch.testing.assert_close(out, torch.tensor([1.0 + expected_bonus, 1.0, -1.0, 0.5]))
    # kappa caps the bonus at kappa * A
    out = novelty_sharpen(adv, s, torch.zeros(4, dtype=torch.long), lam=100.0, kappa=0.5)
    assert out[0].item() == pytest.approx(1.5)


@pytest.mark.parametrize("seed", range(4))
def test_novelty_matches_loop(seed):
    rewards, ids = _random_batch(seed)
    adv = group_normalized(rewards, ids)
    s = -torch.rand(len(rewards), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    out = novelty_sharpen(adv, s, ids, lam=2.0, kappa=0.3)
    expected = loop_novelty(adv.tolist(), s.tolist(), ids.tolist(), 2.0, 0.3)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(out[adv <= 0], adv[adv <= 0])  # only correct (A > 0) responses move
    bonus = out - adv
    assert (bonus >= 0).all() and (bonus <= 0.3 * adv.clamp(min=0) + 1e-12).all()


# --- compute_advantages -----------------------------------------------------------------


def test_registry_matches_config_choices():
    for name in ADVANTAGE_ESTIMATORS:
        AlgorithmConfig(advantage=name)


def test_compute_advantages_dispatch():
    rewards, ids = _random_batch(1)
    grpo, dr_grpo = AlgorithmConfig(), AlgorithmConfig(advantage="mean_only")
    torch.testing.assert_close(compute_advantages(rewards, ids, grpo), group_normalized(rewards, ids))
    torch.testing.assert_close(compute_advantages(rewards, ids, dr_grpo), mean_only(rewards, ids))


def test_compute_advantages_novelty():
    rewards, ids = _random_batch(2)
    s = -torch.rand(len(rewards), dtype=torch.float64)
    cfg = AlgorithmConfig(novelty_sharpening=True, novelty_lambda=0.7, novelty_kappa=0.2)
    expected = novelty_sharpen(group_normalized(rewards, ids), s, ids, 0.7, 0.2)
    torch.testing.assert_close(compute_advantages(rewards, ids, cfg, seq_mean_logprobs=s), expected)
    with pytest.raises(ValueError, match="seq_mean_logprobs"):
        compute_advantages(rewards, ids, cfg)


def test_compute_advantages_no_grad_and_shape_check():
    rewards = torch.tensor([1.0, 0.0], requires_grad=True)
    assert not compute_advantages(rewards, torch.tensor([0, 0]), AlgorithmConfig()).requires_grad
    with pytest.raises(ValueError, match="must both be"):
        compute_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long), AlgorithmConfig())
