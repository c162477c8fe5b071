"""Segment advantages for tree rollouts (algorithms/tree.py), on trees computed by hand."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from algorithms import AlgorithmConfig, PolicyLossInputs, compute_policy_loss
from algorithms.tree import (
    TREE_ADVANTAGES,
    depth_advantages,
    leaf_advantages,
    leaves_below,
    node_depths,
    node_values,
    shared_prefix_mask,
    token_advantages,
    tree_advantages,
    treerl_advantages,
)

# The hand tree: root 0 (2 tokens) has children 1 (3 tokens) and 2 (2 tokens); node 2 has
# children 3 (1 token) and 4 (2 tokens). Leaves: 0-1, 0-2-3, 0-2-4, rewards [1, 0, 1].
#
#              0  V=2/3 L=3
#            /   \
#   V=1 L=1 1     2  V=1/2 L=2
#                / \
#       V=0 L=1 3   4  V=1 L=1
PARENTS = {0: -1, 1: 0, 2: 0, 3: 2, 4: 2}
LEAVES = [[0, 0, 1, 1, 1], [0, 0, 2, 2, 3], [0, 0, 2, 2, 4, 4]]
REWARDS = [1.0, 0.0, 1.0]
EPS = 1e-6


def test_node_values_leaf_counts_and_depths_by_hand():
    assert node_values(LEAVES, REWARDS, PARENTS) == pytest.approx({0: 2 / 3, 1: 1.0, 2: 0.5, 3: 0.0, 4: 1.0})
    assert leaves_below(LEAVES, PARENTS) == {0: 3, 1: 1, 2: 2, 3: 1, 4: 1}
    assert node_depths(PARENTS) == {0: 0, 1: 1, 2: 1, 3: 2, 4: 2}


def test_treerl_by_hand():
    # A(n) = [(V(n) - V(root)) + (V(n) - V(parent))] / sqrt(L(n)); A(root) = 0
    expected = {
        0: 0.0,
        1: ((1 - 2 / 3) + (1 - 2 / 3)) / 1,  # 2/3
        2: ((0.5 - 2 / 3) + (0.5 - 2 / 3)) / math.sqrt(2),  # -1/(3 sqrt 2) = -0.2357
        3: ((0 - 2 / 3) + (0 - 0.5)) / 1,  # -7/6
        4: ((1 - 2 / 3) + (1 - 0.5)) / 1,  # 5/6
    }
    adv = treerl_advantages(LEAVES, REWARDS, PARENTS)
    assert adv == pytest.approx(expected)
    assert adv[1] == pytest.approx(2 / 3) and adv[3] == pytest.approx(-7 / 6) and adv[4] == pytest.approx(5 / 6)
    assert adv[0] == 0.0


def test_depth_by_hand():
    # depth 0: {0} alone -> 0. depth 1: R = {1: 1, 2: 0.5}, mu = 0.75, unbiased sigma =
    # sqrt((0.25^2 + 0.25^2) / 1) = 1/(2 sqrt 2) -> A = +-0.25 / sigma = +-1/sqrt 2.
    # depth 2: R = {3: 0, 4: 1}, mu = 0.5, sigma = sqrt(0.5) -> A = -+1/sqrt 2.
    s1, s2 = 1 / (2 * math.sqrt(2)), math.sqrt(0.5)
    expected = {0: 0.0, 1: 0.25 / (s1 + EPS), 2: -0.25 / (s1 + EPS), 3: -0.5 / (s2 + EPS), 4: 0.5 / (s2 + EPS)}
    adv = depth_advantages(LEAVES, REWARDS, PARENTS, eps=EPS)
    assert adv == pytest.approx(expected, rel=1e-12)
    assert adv[1] == pytest.approx(1 / math.sqrt(2), rel=1e-5) and adv[0] == 0.0


def test_leaf_grpo_by_hand():
    # mean 2/3, unbiased var ((1/3)^2 + (2/3)^2 + (1/3)^2) / 2 = 1/3, std 1/sqrt 3
    std = 1 / math.sqrt(3)
    expected = [(1 / 3) / (std + EPS), (-2 / 3) / (std + EPS), (1 / 3) / (std + EPS)]
    assert leaf_advantages(REWARDS, EPS) == pytest.approx(expected, rel=1e-12)
    adv, mask = tree_advantages("leaf", LEAVES, REWARDS, PARENTS, EPS)
    for row, a, ids in zip(adv, expected, LEAVES):
        assert row == pytest.approx([a] * len(ids), rel=1e-12)  # the leaf's advantage on every token
    assert mask == [[1] * len(ids) for ids in LEAVES]  # each leaf is its own sample: no mask
    assert TREE_ADVANTAGES["leaf"].masks_shared_prefixes is False


def test_shared_prefix_mask_keeps_every_node_once():
    mask = shared_prefix_mask(LEAVES)
    assert mask == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]]  # root kept in leaf 0 only
    kept = Counter(n for ids, m in zip(LEAVES, mask) for n, k in zip(ids, m) if k)
    for ids in LEAVES:
        for node, count in Counter(ids).items():
            assert kept[node] == count  # each node's tokens exactly once across the group


@pytest.mark.parametrize("name", ["treerl", "depth"])
def test_segment_estimators_put_each_node_advantage_on_its_tokens_and_mask(name):
    adv, mask = tree_advantages(name, LEAVES, REWARDS, PARENTS, EPS)
    node_adv = {"treerl": treerl_advantages, "depth": depth_advantages}[name](LEAVES, REWARDS, PARENTS)
    assert adv == [[node_adv[n] for n in ids] for ids in LEAVES] == token_advantages(LEAVES, node_adv)
    assert mask == shared_prefix_mask(LEAVES) and TREE_ADVANTAGES[name].masks_shared_prefixes


@pytest.mark.parametrize("name", sorted(TREE_ADVANTAGES))
@pytest.mark.parametrize("reward", [0.0, 1.0, 0.7, 0.1])
def test_all_equal_rewards_give_exactly_zero(name, reward):
    adv, _ = tree_advantages(name, LEAVES, [reward] * 3, PARENTS)  # (3 * 0.7) / 3 != 0.7 in floats
    assert all(a == 0.0 for row in adv for a in row)
    leaves = [[0, 1], [0, 2], [0, 3, 5], [0, 3, 6], [0, 3, 7]]
    parents = {0: -1, 1: 0, 2: 0, 3: 0, 5: 3, 6: 3, 7: 3}
    adv, _ = tree_advantages(name, leaves, [reward] * 5, parents)
    assert all(a == 0.0 for row in adv for a in row)


@pytest.mark.parametrize("name", sorted(TREE_ADVANTAGES))
def test_a_single_leaf_gets_zero_and_keeps_every_token(name):
    adv, mask = tree_advantages(name, [[0, 0, 1, 1]], [1.0], {0: -1, 1: 0})
    assert adv == [[0.0] * 4] and mask == [[1] * 4]


def test_token_less_root_and_pruned_nodes_as_the_rollout_makes_them():
    """rollout/tree.py: root 0 holds no tokens (the prompt), independent samples hang off it,
    and a pruned child stays in parents with no leaf below: it gets no value."""
    parents = {0: -1, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}  # 5 was pruned
    leaves = [[1, 1, 3, 3], [1, 1, 4], [2, 2, 2]]
    rewards = [1.0, 0.0, 0.0]
    assert node_values(leaves, rewards, parents) == pytest.approx({0: 1 / 3, 1: 0.5, 2: 0.0, 3: 1.0, 4: 0.0})
    assert 5 not in leaves_below(leaves, parents)
    adv = treerl_advantages(leaves, rewards, parents)
    assert adv[1] == pytest.approx(2 * (0.5 - 1 / 3) / math.sqrt(2))
    assert adv[3] == pytest.approx((1 - 1 / 3) + (1 - 0.5)) and 5 not in adv
    depth = depth_advantages(leaves, rewards, parents)  # depth 1: {1: 0.5, 2: 0}; depth 2: {3: 1, 4: 0}
    assert depth[1] == pytest.approx(1 / math.sqrt(2), rel=1e-5) and depth[2] == pytest.approx(-depth[1])
    assert shared_prefix_mask(leaves) == [[1, 1, 1, 1], [0, 0, 1], [1, 1, 1]]


@pytest.mark.parametrize("leaves, rewards, parents, match", [
    ([[0, 9]], [1.0], {0: -1}, "node 9 has no entry in parents"),
    ([[0], []], [1.0, 0.0], {0: -1}, "leaf 1 has no tokens"),
    ([[0, 1], [0, 2]], [1.0], {0: -1, 1: 0, 2: 0}, "2 leaves but 1 rewards"),
    ([[1, 2]], [1.0], {0: -1, 1: 2, 2: 1}, "cycle: 1 -> 2 -> 1"),
    ([[0, 1]], [1.0], {0: -1, 1: 7}, "node 1's parent 7 has no entry"),
    ([[0, 1]], [1.0], {0: -1, 1: -1}, "exactly one root"),
    ([[0, 1, 0]], [1.0], {0: -1, 1: 0}, "leaf 0: its nodes"),
    ([[0, 2]], [1.0], {0: -1, 1: 0, 2: 0, 3: 1}, None),  # fine: a sibling path
    ([[1, 0]], [1.0], {0: -1, 1: 0}, "leaf 0: its nodes"),
    ([[0, 0, 1], [0, 2]], [1.0, 0.0], {0: -1, 1: 0, 2: 0}, "node 0 has 2 tokens in leaf 0 but 1 in leaf 1"),
    ([[0, 1], [0, 2]], [1.0, float("nan")], {0: -1, 1: 0, 2: 0}, "leaf 1's reward is nan"),
    ([[0, 1]], [None], {0: -1, 1: 0}, "leaf 0's reward is None"),
    ([], [], {0: -1}, "at least one leaf"),
], ids=["unknown-node", "empty-leaf", "lengths", "cycle", "missing-parent", "two-roots", "split-node", "ok",
        "out-of-order", "token-counts", "nan-reward", "none-reward", "no-leaves"])
def test_bad_inputs_raise_naming_the_culprit(leaves, rewards, parents, match):
    if match is None:
        tree_advantages("treerl", leaves, rewards, parents)
        return
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        tree_advantages("treerl", leaves, rewards, parents)


def test_unknown_estimator_and_ambiguous_token_advantages_raise():
    with pytest.raises(ValueError, match="'gae' is not one of"):
        tree_advantages("gae", LEAVES, REWARDS, PARENTS)
    with pytest.raises(ValueError, match="exactly one of"):
        token_advantages(LEAVES)
    with pytest.raises(ValueError, match="node 4 has no advantage"):
        token_advantages(LEAVES, {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0})


def _pad(rows: list[list[float]], length: int) -> torch.Tensor:
    return torch.tensor([row + [0] * (length - len(row)) for row in rows], dtype=torch.float32)


@pytest.mark.parametrize("name", ["treerl", "depth"])
def test_per_token_advantages_and_mask_compose_with_compute_policy_loss(name):
    adv, mask = tree_advantages(name, LEAVES, REWARDS, PARENTS)
    T = max(map(len, LEAVES)) + 2  # padding too
    advantages, loss_mask = _pad(adv, T), _pad(mask, T)
    torch.manual_seed(0)
    logprobs = (-torch.rand(len(LEAVES), T)).requires_grad_()
    old = logprobs.detach() + 0.01 * torch.randn(len(LEAVES), T)
    cfg = AlgorithmConfig(decoupled=False, tis="none")
    out = compute_policy_loss(PolicyLossInputs(logprobs, old, advantages, loss_mask), cfg)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grad = logprobs.grad
    assert torch.all(grad[loss_mask == 0] == 0)
    trained = (loss_mask == 1) & (advantages != 0)  # the root's tokens have A = 0
    assert trained.any() and torch.all(grad[trained] != 0)
    # token-mean divides by the tree's distinct tokens: 2 + 3 + 2 + 1 + 2
    assert loss_mask.sum().item() == 10
