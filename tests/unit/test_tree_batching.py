"""Tree groups in the trainer's batch: per-token segment advantages and the shared-prefix
keep mask packed beside ordinary groups, through micro-batches and rank shares, failing
closed on a malformed tree."""

from __future__ import annotations

import pytest
import torch

from algorithms import AlgorithmConfig, PolicyLossInputs, compute_advantages, compute_policy_loss
from algorithms.losses import loss_denominators
from algorithms.tree import tree_advantages
from buffer.types import FinishReason, Group, Trajectory
from trainer.batching import batch_statistics, pack_groups, plan_update, row_advantages

PARENTS = {0: -1, 1: 0, 2: 1, 3: 1, 4: 0}  # node 1 is shared by leaves 0 and 1
LEAVES = [  # (response ids, node ids, reward)
    ([5, 6, 7, 8], [1, 1, 2, 2], 1.0),
    ([5, 6, 9, 10, 11], [1, 1, 3, 3, 3], 0.0),
    ([12, 13], [4, 4], 0.5),
]
DISTINCT = 2 + 2 + 3 + 2  # node 1's tokens count once


def traj(group_id: str, prompt: list[int], response: list[int], reward: float, nodes=(), version: int = 0):
    t = Trajectory(prompt_id=group_id, group_id=group_id, prompt_ids=list(prompt))
    t.append_tokens(list(response), [-0.1 - 0.01 * i for i in range(len(response))], version)
    t.node_ids = list(nodes)
    t.reward, t.finish_reason = reward, FinishReason.STOP
    return t


def tree_group(group_id: str = "tree", prompt=(3, 4)) -> Group:
    g = Group(group_id=group_id, prompt_id=group_id, prompt_text="", row={}, tree_parents=dict(PARENTS))
    g.trajectories = [traj(group_id, list(prompt), r, w, n) for r, n, w in LEAVES]
    return g


def plain_group(group_id: str = "plain", prompt=(3, 4, 5)) -> Group:
    g = Group(group_id=group_id, prompt_id=group_id, prompt_text="", row={})
    g.trajectories = [traj(group_id, list(prompt), [7] * n, float(n % 2)) for n in (1, 3, 6, 2)]
    return g


def test_tree_rows_get_their_nodes_advantages_and_train_each_shared_token_once():
    batch = pack_groups([plain_group(), tree_group()], pad_id=0, tree_advantage="treerl")
    adv, keep = tree_advantages("treerl", [n for _, n, _ in LEAVES], [w for *_, w in LEAVES], PARENTS)
    assert batch.tree_rows.tolist() == [False] * 4 + [True] * 3
    for k, (response, _, _) in enumerate(LEAVES):
        row, span = 4 + k, slice(1, 1 + len(response))  # prompt of 2: the response starts at position 1
        assert batch.token_advantages[row, span].tolist() == pytest.approx(adv[k])
        assert batch.loss_mask[row, span].tolist() == keep[k]
        assert batch.loss_mask[row].sum() == sum(keep[k])  # nothing outside the response
    assert batch.loss_mask[4:].sum() == DISTINCT and batch.tree_masked_tokens == 2
    assert batch.num_tokens == 12 + DISTINCT  # the plain group's 1+3+6+2 tokens, the tree's distinct ones
    stats = batch_statistics(batch, row_advantages(batch, compute_advantages(
        batch.rewards, batch.group_index, AlgorithmConfig())), version=0)
    assert stats["train/tree_leaves"] == 3 and stats["train/tree_masked_tokens"] == 2


def test_ordinary_groups_pack_and_advance_exactly_as_before():
    alone = pack_groups([plain_group()], pad_id=0)
    assert alone.token_advantages is None and alone.tree_rows is None and alone.tree_masked_tokens == 0
    seq = compute_advantages(alone.rewards, alone.group_index, AlgorithmConfig())
    assert row_advantages(alone, seq) is seq  # one advantage per row: the unchanged path
    mixed = pack_groups([plain_group(), tree_group()], pad_id=0, tree_advantage="depth")
    per_token = row_advantages(mixed, compute_advantages(mixed.rewards, mixed.group_index, AlgorithmConfig()))
    width = alone.loss_mask.shape[1]
    assert torch.equal(mixed.loss_mask[:4, :width], alone.loss_mask)
    assert torch.equal(per_token[:4], seq[:, None].expand(4, per_token.shape[1]))


def test_leaf_estimator_trains_every_leaf_whole_and_matches_plain_grpo():
    """`leaf` is GRPO over the leaves: the per-token path gives the per-sequence path's loss."""
    tree = pack_groups([tree_group()], pad_id=0, tree_advantage="leaf")
    stripped = tree_group()
    stripped.tree_parents = {}
    for t in stripped.trajectories:
        t.node_ids = []
    flat = pack_groups([stripped], pad_id=0)
    assert torch.equal(tree.loss_mask, flat.loss_mask) and tree.tree_masked_tokens == 0
    cfg = AlgorithmConfig(decoupled=False, tis="none")
    logprobs = torch.randn(flat.loss_mask.shape, generator=torch.Generator().manual_seed(0)) * 0.1 - 1
    losses = []
    for batch in (tree, flat):
        adv = row_advantages(batch, compute_advantages(batch.rewards, batch.group_index, cfg))
        losses.append(compute_policy_loss(PolicyLossInputs(logprobs, batch.behaviour_logprobs, adv, batch.loss_mask),
                                          cfg).loss)
    torch.testing.assert_close(losses[0], losses[1])


def test_a_token_masked_in_one_leaf_is_trained_in_another():
    """interrupt_newest masks per leaf: a shared token masked in its first leaf is kept in the next."""
    g = tree_group()
    g.trajectories[0].loss_mask[0] = 0
    batch = pack_groups([g], pad_id=0, tree_advantage="treerl")
    assert batch.loss_mask[0, 1:5].tolist() == [0, 1, 1, 1]
    assert batch.loss_mask[1, 1:6].tolist() == [1, 0, 1, 1, 1]  # its copy of node 1's first token
    assert batch.num_tokens == DISTINCT


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_per_token_advantages_split_over_micro_batches_and_ranks_add_up_to_the_batch_loss(mode, world_size):
    """Sliced as the trainer slices them (rows, cut to each micro-batch's width): the
    pieces' losses with the whole batch's denominators sum to the whole batch's loss."""
    groups = [plain_group("a"), tree_group("t1"), plain_group("b", (2,)), tree_group("t2", (3, 4, 5, 6))]
    batch = pack_groups(groups, pad_id=0, tree_advantage="treerl")
    cfg = AlgorithmConfig(decoupled=False, tis="none", loss_agg=mode)
    adv = row_advantages(batch, compute_advantages(batch.rewards, batch.group_index, cfg))
    assert adv.dim() == 2
    gen = torch.Generator().manual_seed(1)
    logprobs = batch.behaviour_logprobs + 0.05 * torch.randn(batch.loss_mask.shape, generator=gen)

    def loss(index, width, den=None):
        cut = (index, slice(0, width - 1))
        inputs = PolicyLossInputs(logprobs[cut], batch.behaviour_logprobs[cut], adv[cut], batch.loss_mask[cut])
        return compute_policy_loss(inputs, cfg, den).loss

    rows = list(range(len(batch.rewards)))
    whole = loss(torch.tensor(rows), batch.input_ids.shape[1])
    lengths = batch.attention_mask.sum(-1).tolist()
    scored = (batch.loss_mask > 0).sum(-1).tolist()
    den = loss_denominators(batch.loss_mask, max_response_length=float(batch.response_lengths.max()))
    total, seen = 0.0, []
    for rank in range(world_size):
        plan = plan_update(rows, lengths, scored, rank, world_size, 0, 20, None)
        for micro in plan.micro_batches:
            if micro is not None:
                index = torch.tensor(micro)
                total = total + loss(index, int(batch.attention_mask[index].sum(-1).max()), den)
                seen += micro
    assert sorted(seen) == rows
    torch.testing.assert_close(total, whole, rtol=1e-6, atol=1e-7)


def test_malformed_tree_groups_fail_closed_naming_the_culprit():
    g = tree_group()
    g.trajectories[1].node_ids.pop()  # after construction: Trajectory.check no longer guards it
    with pytest.raises(ValueError, match=rf"tree group tree: trajectory {g.trajectories[1].uid} has 4 node_ids "
                                         "for 5 response tokens"):
        pack_groups([g], pad_id=0, tree_advantage="treerl")
    with pytest.raises(ValueError, match="without a tree_advantage: pass algorithm.tree_advantage"):
        pack_groups([tree_group()], pad_id=0)
    orphan = tree_group()
    orphan.tree_parents = {}
    with pytest.raises(ValueError, match="has node_ids but the group has no tree_parents"):
        pack_groups([orphan], pad_id=0)
    bad = tree_group()
    del bad.tree_parents[4]
    with pytest.raises(ValueError, match=r"tree group tree \(algorithm.tree_advantage='depth'\): tree leaf 2: node 4"):
        pack_groups([bad], pad_id=0, tree_advantage="depth")


def test_the_tree_advantage_key_is_checked_against_the_registry():
    assert AlgorithmConfig().tree_advantage == "treerl"
    choices = r"\['treerl', 'depth', 'leaf'\]"
    with pytest.raises(ValueError, match=rf"algorithm.tree_advantage='branch' is not one of {choices}"):
        AlgorithmConfig(tree_advantage="branch")
