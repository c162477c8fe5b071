"""The tree workflow's bookkeeping, on a deterministic fake engine context: every leaf is
its root-to-leaf path, shared nodes hold the same tokens, forced tokens carry their
sampling logprob and version, and the budget and pruning hold."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from buffer.prompts import PromptItem
from buffer.types import FinishReason, Group, Trajectory
from rollout.tree import ROOT, TreeWorkflow, edit_distance


class FakeCtx:
    """Generates tokens from a seeded rule of the context so far, with top-2 logprobs: the
    sampled token is the likeliest at most positions and the second at some."""

    def __init__(self, length: int = 12, vocab: int = 9, seed: int = 0) -> None:
        self.tokenizer = type("Tok", (), {"decode": staticmethod(lambda ids, skip_special_tokens=True: str(ids))})()
        self.partial = None
        self.max_tokens = length
        self.prompt_tokens = self.cached_prompt_tokens = 0
        self.length, self.vocab, self.seed = length, vocab, seed
        self.version = 3
        self.scored = 0

    def new_group(self, item: PromptItem) -> Group:
        g = Group(item.group_id, item.prompt_id, item.prompt, item.row, start_version=item.start_version)
        g.trajectories = [Trajectory(item.prompt_id, item.group_id, [1, 2]) for _ in range(item.n_samples)]
        return g

    def dist(self, context: list[int]) -> list[tuple[int, float]]:
        rng = random.Random(hash((self.seed, tuple(context))))
        a, b = rng.sample(range(2, self.vocab), 2)
        p1 = rng.uniform(0.4, 0.6)
        return [(a, math.log(p1)), (b, math.log(p1 - rng.uniform(0.0, 0.3)))]

    async def agenerate(self, traj, max_tokens=None, *, min_tokens=0, temperature=None, top_logprobs=0, tops=None):
        limit = min(max_tokens or self.length, self.length)
        while traj.num_response_tokens < limit:
            await asyncio.sleep(0)
            top = self.dist(traj.prompt_ids + traj.response_ids)
            token, lp = top[0] if random.Random(traj.num_response_tokens).random() < 0.8 else top[1]
            traj.append_tokens([token], [lp], self.version)
            if tops is not None:
                tops.append(top)
        traj.finish_reason = FinishReason.LENGTH
        return traj

    async def ascore(self, group):
        self.scored += 1
        for t in group.trajectories:
            t.reward = float(len(t.response_ids) % 2)
        return True


def path(node: int, parents: dict[int, int]) -> list[int]:
    out = []
    while node != -1:
        out.append(node)
        node = parents[node]
    return out[::-1]


def run(workflow: TreeWorkflow, n: int, **ctx_kwargs) -> tuple[Group, FakeCtx]:
    ctx = FakeCtx(**ctx_kwargs)
    item = PromptItem("p", "1+1=", {}, n, group_id="g", start_version=3)
    return asyncio.run(workflow.arun_episode(ctx, item)), ctx


@pytest.mark.parametrize("rule", ["latr", "surprisal"])
@pytest.mark.parametrize("seed", range(6))
def test_every_leaf_is_its_root_to_leaf_path_and_shared_nodes_agree(rule, seed):
    group, ctx = run(TreeWorkflow(rule=rule, tau_abs=0.05, tau_rel=0.5, lookahead=0, rounds=3), 8, seed=seed)
    parents = group.tree_parents
    assert parents[ROOT] == -1 and 2 <= len(group.trajectories) <= 8
    tokens_of: dict[tuple[int, int], int] = {}  # (node, position) -> token, across leaves
    for leaf in group.trajectories:
        assert len(leaf.node_ids) == leaf.num_response_tokens == ctx.length
        order = [n for i, n in enumerate(leaf.node_ids) if i == 0 or leaf.node_ids[i - 1] != n]
        assert path(order[-1], parents)[1:] == order  # the leaf's nodes, in order, are a root path
        for position, (node, token) in enumerate(zip(leaf.node_ids, leaf.response_ids)):
            assert tokens_of.setdefault((node, position), token) == token  # shared nodes agree
    assert group.stats["tree/leaves"] == len(group.trajectories) and ctx.scored == 1


def test_a_forced_token_carries_its_sampling_logprob_and_version():
    group, ctx = run(TreeWorkflow(rule="surprisal", top_n=2, lookahead=0, rounds=1), 3)
    root = group.trajectories[0]
    for child in group.trajectories[1:]:
        p = next(i for i, (a, b) in enumerate(zip(child.response_ids, root.response_ids)) if a != b)
        top = ctx.dist(root.prompt_ids + root.response_ids[:p])
        assert (child.response_ids[p], child.behaviour_logprobs[p]) in top  # the other top-2 token
        assert child.response_ids[:p] == root.response_ids[:p]
        assert child.behaviour_logprobs[:p] == root.behaviour_logprobs[:p]
        assert child.versions[p] == root.versions[p]
        assert child.node_ids[p] != root.node_ids[p] and parents_share(group, child.node_ids[p], root.node_ids[p])


def parents_share(group: Group, a: int, b: int) -> bool:
    return group.tree_parents[a] == group.tree_parents[b]


def test_the_mix_sets_how_many_leaves_are_independent_samples():
    group, _ = run(TreeWorkflow(mix=0.0, lookahead=0), 6)
    assert len(group.trajectories) == 6 and group.stats["tree/branch_points"] == 0
    assert all(group.tree_parents[t.node_ids[0]] == ROOT for t in group.trajectories)
    schedule = TreeWorkflow(mix=1.0, mix_schedule=[[0, 1.0], [100, 0.5], [200, 0.25]])
    assert [schedule.mix_at(v) for v in (0, 150, 250)] == [1.0, 0.5, 0.25]


def test_pruning_drops_children_that_repeat_their_sibling_and_counts_them():
    """Over a two-token vocabulary continuations look alike: at prune_distance 1 nearly every
    child is pruned after its lookahead; at 0 none is. Pruned children are not leaves."""
    pruned, _ = run(TreeWorkflow(rule="surprisal", top_n=3, lookahead=4, prune_distance=1.0, rounds=1), 4, vocab=4)
    stats = pruned.stats
    assert stats["tree/pruned"] > 0
    assert len(pruned.trajectories) == 1 + stats["tree/branch_points"] - stats["tree/pruned"]
    kept, _ = run(TreeWorkflow(rule="surprisal", top_n=3, lookahead=4, prune_distance=0.0, rounds=1), 4, vocab=4)
    assert kept.stats["tree/pruned"] == 0 and len(kept.trajectories) == 1 + kept.stats["tree/branch_points"]


def test_edit_distance_is_normalised():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0.0
    assert edit_distance([1, 2, 3], [4, 5, 6]) == 1.0
    assert edit_distance([1, 2, 3, 4], [1, 2, 4]) == 0.25
