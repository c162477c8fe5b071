"""Segment advantages for tree rollouts: one advantage per tree node, spread over its tokens.

A tree group is one prompt's tree of token segments (nodes). Each leaf is a trajectory whose
response is its root-to-leaf path and which carries one reward. The inputs are plain data:

    leaf_node_ids[i][t]  the node that token t of leaf i belongs to (the leaf's path, in order;
                         a node's tokens are contiguous, and a node shared by several leaves
                         holds the same number of tokens in each);
    parents[n]           the parent of node n; the root's parent is -1. The root may hold no
                         tokens (rollout/tree.py's root is the prompt), and `parents` may name
                         nodes no leaf reaches (pruned branches): those get no value.
    rewards[i]           the reward of leaf i.

Why per node: a sparse leaf reward says nothing about which segment earned it; comparing the
mean reward below a segment with its parent's (TreeRL) or with the other segments at its depth
(BranchGRPO) does, at no cost beyond the tree the rollout already built.

The trainer calls `tree_advantages(estimator, leaf_node_ids, rewards, parents)` once per tree
group and gets per-token advantages and a per-token keep mask (multiply it into the loss mask).
Adding an estimator: write `fn(tree, rewards, eps) -> per-token advantages` and add a
`TreeAdvantage` to `TREE_ADVANTAGES`; say there whether shared prefixes are trained once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Optional, Sequence

import torch

from algorithms.advantages import group_normalized

NO_PARENT = -1  # the root's entry in `parents`


@dataclass(frozen=True)
class Tree:
    """A validated tree group (`build_tree`): what every estimator reads."""

    root: int
    parents: dict[int, int]
    depth: dict[int, int]  # every node of `parents`; the root is at depth 0
    paths: list[list[int]]  # per leaf: root .. last node, token-less ancestors included
    below: dict[int, list[int]]  # node -> indices of the leaves below it (nodes with >= 1 only)
    runs: list[list[tuple[int, int]]]  # per leaf: (node, its token count), in token order


Runs = list[list[tuple[int, int]]]


def _runs(leaf_node_ids: Sequence[Sequence[int]]) -> Runs:
    """Each leaf's node ids as (node, count) runs: per-token work then costs per run, not per token."""
    return [[(int(n), len(list(g))) for n, g in groupby(ids)] for ids in leaf_node_ids]


def node_depths(parents: dict[int, int]) -> dict[int, int]:
    """depth(root) = 0, depth(n) = depth(parent(n)) + 1, for every node of `parents`.

    Raises on a parent with no entry, no root or several, and a cycle, naming the node.
    """
    roots = sorted(n for n, p in parents.items() if p == NO_PARENT)
    if len(roots) != 1:
        raise ValueError(f"tree parents must have exactly one root (parent -1), found {len(roots)}: {roots}")
    depth: dict[int, int] = {roots[0]: 0}
    for start in parents:
        chain: list[int] = []
        node = start
        while node not in depth:
            if node in chain:
                cycle = chain[chain.index(node):] + [node]
                raise ValueError(f"tree parents has a cycle: {' -> '.join(map(str, cycle))}")
            chain.append(node)
            parent = parents[node]
            if parent not in parents:
                raise ValueError(f"tree node {node}'s parent {parent} has no entry in parents")
            node = parent
        for n in reversed(chain):
            depth[n] = depth[parents[n]] + 1
    return depth


def build_tree(leaf_node_ids: Sequence[Sequence[int]], parents: dict[int, int]) -> Tree:
    """Check the leaves against `parents` and index the tree; each error names its culprit.

    A leaf's path is its last node's ancestors (so a token-less root is on every path); its
    nodes must appear along that path, in order, each in one contiguous run.
    """
    if not leaf_node_ids:
        raise ValueError("a tree group needs at least one leaf, got none")
    parents = {int(n): int(p) for n, p in parents.items()}
    depth = node_depths(parents)
    all_runs = _runs(leaf_node_ids)
    paths: list[list[int]] = []
    tokens: dict[int, tuple[int, int]] = {}  # node -> (its token count, the first leaf whose path has it)
    for i, runs in enumerate(all_runs):
        if not runs:
            raise ValueError(f"tree leaf {i} has no tokens (empty node_ids)")
        for n, _ in runs:
            if n not in parents:
                raise ValueError(f"tree leaf {i}: node {n} has no entry in parents")
        path = [runs[-1][0]]
        while parents[path[-1]] != NO_PARENT:
            path.append(parents[path[-1]])
        path.reverse()
        where = {n: k for k, n in enumerate(path)}
        order = [where.get(n, -1) for n, _ in runs]
        if -1 in order or any(a >= b for a, b in zip(order, order[1:])):
            raise ValueError(
                f"tree leaf {i}: its nodes {[n for n, _ in runs]} (in token order) are not one contiguous run "
                f"each along the root-to-leaf path {path} that parents gives")
        count = dict(runs)
        for n in path:
            k = count.get(n, 0)
            seen = tokens.setdefault(n, (k, i))
            if seen[0] != k:
                raise ValueError(
                    f"tree node {n} has {seen[0]} tokens in leaf {seen[1]} but {k} in leaf {i}: a shared node "
                    "must hold the same tokens in every leaf")
        paths.append(path)
    below: dict[int, list[int]] = {}
    for i, path in enumerate(paths):
        for n in path:
            below.setdefault(n, []).append(i)
    root = paths[0][0]
    return Tree(root, parents, depth, paths, below, all_runs)


def _rewards(rewards: Sequence[float], num_leaves: int) -> list[float]:
    if len(rewards) != num_leaves:
        raise ValueError(f"tree group has {num_leaves} leaves but {len(rewards)} rewards")
    out = []
    for i, r in enumerate(rewards):
        if r is None or not math.isfinite(float(r)):
            raise ValueError(f"tree leaf {i}'s reward is {r!r}: every leaf needs a finite reward")
        out.append(float(r))
    return out


def _mean(values: list[float]) -> float:
    """Mean that is exactly the common value when all are equal (a plain sum/len of 0.7s is not),
    so a subtree whose leaves all scored the same yields advantages of exactly 0."""
    lo, hi = min(values), max(values)
    return lo if lo == hi else math.fsum(values) / len(values)


def _leaves_below(tree: Tree) -> dict[int, int]:
    return {n: len(ls) for n, ls in tree.below.items()}


def _node_values(tree: Tree, rewards: list[float]) -> dict[int, float]:
    return {n: _mean([rewards[i] for i in ls]) for n, ls in tree.below.items()}


def leaves_below(leaf_node_ids: Sequence[Sequence[int]], parents: dict[int, int]) -> dict[int, int]:
    """L(n) = the number of leaves whose path contains n; only nodes with L(n) >= 1 appear."""
    return _leaves_below(build_tree(leaf_node_ids, parents))


def node_values(leaf_node_ids: Sequence[Sequence[int]], rewards: Sequence[float],
                parents: dict[int, int]) -> dict[int, float]:
    """V(n) = (1/L(n)) sum_{leaves l below n} R_l: the reward expected after reaching n.

    (TreeRL's value; BranchGRPO's node reward.) Only nodes with a leaf below appear.
    """
    tree = build_tree(leaf_node_ids, parents)
    return _node_values(tree, _rewards(rewards, len(tree.paths)))


# ---------------------------------------------------------------------------------------
# Per-node estimators. Each takes a validated Tree and returns {node: advantage} for every
# node with a leaf below it.
# ---------------------------------------------------------------------------------------


def _treerl(tree: Tree, rewards: list[float]) -> dict[int, float]:
    values, counts = _node_values(tree, rewards), _leaves_below(tree)
    v_root = values[tree.root]
    adv = {}
    for n, v in values.items():
        if n == tree.root:
            adv[n] = 0.0
            continue
        adv[n] = ((v - v_root) + (v - values[tree.parents[n]])) / math.sqrt(counts[n])
    return adv


def treerl_advantages(leaf_node_ids: Sequence[Sequence[int]], rewards: Sequence[float],
                      parents: dict[int, int]) -> dict[int, float]:
    """TreeRL (arXiv 2506.11902, THUDM/TreeRL): global plus local advantage, reweighted.

        A(n) = [(V(n) - V(root)) + (V(n) - V(parent(n)))] / sqrt(L(n)),   A(root) = 0.

    V(n) - V(root) says how much better than the prompt's average n leads; V(n) - V(parent)
    how much better than the alternatives at its branch point. 1/sqrt(L) keeps early
    segments, shared by many leaves, from dominating. The root gets 0: every leaf shares
    it, so it has nothing to compare with (the formula's parent term is undefined there).
    """
    tree = build_tree(leaf_node_ids, parents)
    return _treerl(tree, _rewards(rewards, len(tree.paths)))


def _depth(tree: Tree, rewards: list[float], eps: float) -> dict[int, float]:
    values = _node_values(tree, rewards)
    by_depth: dict[int, list[int]] = {}
    for n in values:
        by_depth.setdefault(tree.depth[n], []).append(n)
    adv = {}
    for nodes in by_depth.values():
        r = [values[n] for n in nodes]
        mu = _mean(r)
        sigma = math.sqrt(math.fsum((x - mu) ** 2 for x in r) / (len(r) - 1)) if len(r) > 1 else 0.0
        flat = len(r) == 1 or min(r) == max(r) or sigma < 1e-6
        for n, x in zip(nodes, r):
            adv[n] = 0.0 if flat else (x - mu) / (sigma + eps)
    return adv


def depth_advantages(leaf_node_ids: Sequence[Sequence[int]], rewards: Sequence[float],
                     parents: dict[int, int], eps: float = 1e-6) -> dict[int, float]:
    """BranchGRPO depth-wise advantage (arXiv 2509.06040; its train_branchgrpo_flux.py):

        R(n) = V(n),   A(n) = (R(n) - mu_d) / (sigma_d + eps)   over the nodes at depth d,

    and A = 0 where depth d holds one node, or sigma_d < 1e-6 (all equal). sigma_d is the
    unbiased (n - 1) std, as BranchGRPO's `rewards.std()` and Grove's GRPO. Nodes with no leaf
    below (pruned) take no part. Depth counts segments from the root, so with a token-less
    root the independent samples' first segments are depth 1.
    """
    tree = build_tree(leaf_node_ids, parents)
    return _depth(tree, _rewards(rewards, len(tree.paths)), eps)


def leaf_advantages(rewards: Sequence[float], eps: float = 1e-6) -> list[float]:
    """Plain GRPO over the leaves (the baseline): A_l = (R_l - mean) / (std + eps).

    `algorithms.advantages.group_normalized` with one group: unbiased std, exactly 0 when all
    rewards are equal or there is one leaf. Every token of leaf l gets A_l.
    """
    r = torch.tensor(_rewards(rewards, len(rewards)), dtype=torch.float64)
    return group_normalized(r, torch.zeros(len(r), dtype=torch.long), eps).tolist()


# ---------------------------------------------------------------------------------------
# Per token.
# ---------------------------------------------------------------------------------------


def token_advantages(leaf_node_ids: Sequence[Sequence[int]], node_adv: Optional[dict[int, float]] = None, *,
                     leaf_adv: Optional[Sequence[float]] = None) -> list[list[float]]:
    """A[i][t] = node_adv[leaf_node_ids[i][t]] (a segment's advantage on each of its tokens),
    or, given leaf_adv instead, A[i][t] = leaf_adv[i] (one advantage per leaf)."""
    if (node_adv is None) == (leaf_adv is None):
        raise ValueError("token_advantages takes exactly one of node_adv (per node) and leaf_adv (per leaf)")
    if leaf_adv is not None:
        if len(leaf_adv) != len(leaf_node_ids):
            raise ValueError(f"tree group has {len(leaf_node_ids)} leaves but {len(leaf_adv)} leaf advantages")
        return [[float(a)] * len(ids) for ids, a in zip(leaf_node_ids, leaf_adv)]
    return _expand(_runs(leaf_node_ids), node_adv)


def _expand(runs: Runs, node_adv: dict[int, float]) -> list[list[float]]:
    out = []
    for i, leaf in enumerate(runs):
        row: list[float] = []
        for n, count in leaf:
            if n not in node_adv:
                raise ValueError(f"tree leaf {i}: node {n} has no advantage in node_adv")
            row.extend([node_adv[n]] * count)
        out.append(row)
    return out


def shared_prefix_mask(leaf_node_ids: Sequence[Sequence[int]],
                       loss_masks: Optional[Sequence[Sequence[int]]] = None) -> list[list[int]]:
    """1 on the first copy (leaves in order) of each shared token, 0 on its other copies.

    A node shared by k leaves is one decision, sampled once; training all k copies would count
    it k times. Masking (rather than scaling each copy by 1/k) keeps the loss a sum of 0/1-masked
    terms that every aggregation already handles; summed over the group, each node's tokens
    enter the loss exactly once, so token-mean divides by the tree's distinct tokens. The mask
    is a keep mask: multiply it into the trajectory's loss mask.

    With `loss_masks` (each leaf's own loss mask), a token is kept in the first leaf whose copy
    of it is trained (loss mask 1): a copy masked in one leaf (e.g. by
    `rollout.on_update=interrupt_newest`, which masks per leaf) does not take the others'
    place, so every token some leaf trains is trained exactly once. Copies are matched by
    (node, offset in the node).
    """
    return _mask(_runs(leaf_node_ids), _loss_masks(loss_masks, leaf_node_ids))


def _loss_masks(loss_masks: Optional[Sequence[Sequence[int]]],
                leaf_node_ids: Sequence[Sequence[int]]) -> Optional[list[list[int]]]:
    if loss_masks is None:
        return None
    if len(loss_masks) != len(leaf_node_ids):
        raise ValueError(f"tree group has {len(leaf_node_ids)} leaves but {len(loss_masks)} loss masks")
    for i, (m, ids) in enumerate(zip(loss_masks, leaf_node_ids)):
        if len(m) != len(ids):
            raise ValueError(f"tree leaf {i} has {len(ids)} node ids but a loss mask of {len(m)} tokens")
    return [[1 if x else 0 for x in m] for m in loss_masks]


def _mask(runs: Runs, loss_masks: Optional[list[list[int]]] = None) -> list[list[int]]:
    kept: set[tuple[int, int]] = set()  # (node, offset in the node) already trained once
    mask = []
    for i, leaf in enumerate(runs):
        row: list[int] = []
        for n, count in leaf:
            for k in range(count):
                trained = loss_masks is None or loss_masks[i][len(row)]
                row.append(1 if trained and (n, k) not in kept else 0)
                if trained:
                    kept.add((n, k))
        mask.append(row)
    return mask


def _per_leaf(tree: Tree, rewards: list[float], eps: float) -> list[list[float]]:
    return [[a] * sum(c for _, c in leaf) for leaf, a in zip(tree.runs, leaf_advantages(rewards, eps))]


def _per_node(fn: Callable[[Tree, list[float], float], dict[int, float]]
              ) -> Callable[[Tree, list[float], float], list[list[float]]]:
    return lambda tree, rewards, eps: _expand(tree.runs, fn(tree, rewards, eps))


@dataclass(frozen=True)
class TreeAdvantage:
    """A registered estimator: per-token advantages of one tree group, and whether the trainer
    trains each shared node once (`shared_prefix_mask`) or every leaf whole."""

    per_token: Callable[[Tree, list[float], float], list[list[float]]]  # (tree, rewards, eps)
    masks_shared_prefixes: bool
    source: str


TREE_ADVANTAGES: dict[str, TreeAdvantage] = {
    "treerl": TreeAdvantage(_per_node(lambda tree, r, eps: _treerl(tree, r)), True, "TreeRL, arXiv 2506.11902"),
    "depth": TreeAdvantage(_per_node(_depth), True, "BranchGRPO, arXiv 2509.06040"),
    # Each leaf is an independent GRPO sample: its shared prefix is trained in every leaf.
    "leaf": TreeAdvantage(_per_leaf, False, "GRPO over the leaves, arXiv 2402.03300"),
}


def tree_advantages(estimator: str, leaf_node_ids: Sequence[Sequence[int]], rewards: Sequence[float],
                    parents: dict[int, int], eps: float = 1e-6,
                    loss_masks: Optional[Sequence[Sequence[int]]] = None
                    ) -> tuple[list[list[float]], list[list[int]]]:
    """One tree group's per-token advantages and per-token keep mask (`algorithm.tree_advantage`).

    estimator: a key of TREE_ADVANTAGES. The mask is `shared_prefix_mask(leaf_node_ids,
    loss_masks)` when the estimator trains shared prefixes once, else all ones. Both are lists
    shaped like leaf_node_ids.
    """
    if estimator not in TREE_ADVANTAGES:
        raise ValueError(f"tree advantage {estimator!r} is not one of {list(TREE_ADVANTAGES)}")
    tree = build_tree(leaf_node_ids, parents)
    spec = TREE_ADVANTAGES[estimator]
    adv = spec.per_token(tree, _rewards(rewards, len(tree.paths)), eps)
    masks = _loss_masks(loss_masks, leaf_node_ids)
    if spec.masks_shared_prefixes:
        mask = _mask(tree.runs, masks)
    else:
        mask = [[1] * sum(c for _, c in leaf) for leaf in tree.runs]
    return adv, mask
