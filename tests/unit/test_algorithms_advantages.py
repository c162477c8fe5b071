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
        std = statistics.stdev(group) if len(group) > 1 else 0.0
        out.append((r - statistics.fmean(group)) / (std + eps))
    return out


def loop_mean_only(rewards, ids):
    return [r - statistics.fmean(_members(rewards, ids, g)) for r, g in zip(rewards, ids)]


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
    torch.testing.assert_close(group_normalized(rewards, ids), torch.zeros(6), atol=1e-6, rtol=0)
    # a single sample overall
    assert group_normalized(torch.tensor([5.0]), torch.tensor([0])).item() == 0.0


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
