"""Tree rollouts train end to end: the real trainer on hand-built tree groups (a shared
prefix enters the loss once; micro-batches and two ranks give the one-batch update), and
`grove train rollout.workflow=tree` through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algorithms import AlgorithmConfig
from buffer.types import FinishReason, Group, Trajectory
from tests.integration.test_e2e import LAST_LINE, grove
from tests.integration.test_trainer_ranks import (
    ROOT,
    SPLIT,
    WHOLE,
    assert_close_grads,
    capture_gradients,
    groups_of_several_lengths,
    make_trainer,
)

pytestmark = pytest.mark.integration

PARENTS = {0: -1, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 0}
LEAVES = [  # (response ids, node ids, reward): node 1 is shared by three leaves, node 2 by two
    ([5, 6, 7, 8, 9, 10], [1, 1, 2, 2, 4, 4], 1.0),
    ([5, 6, 7, 8, 11], [1, 1, 2, 2, 5], 0.0),
    ([5, 6, 12, 13, 14, 15, 16], [1, 1, 3, 3, 3, 3, 3], 1.0),
    ([17, 18, 19], [6, 6, 6], 0.0),
]
ALL_TOKENS = sum(len(r) for r, _, _ in LEAVES)  # 21
DISTINCT = 2 + 2 + 2 + 1 + 5 + 3  # 15: nodes 1 and 2 once


def tree_batch() -> list[Group]:
    groups = []
    for k, prompt in enumerate(([3, 4, 20], [21, 22])):
        g = Group(group_id=f"t{k}", prompt_id=f"p{k}", prompt_text="", row={}, tree_parents=dict(PARENTS))
        for response, nodes, reward in LEAVES:
            t = Trajectory(prompt_id=f"p{k}", group_id=f"t{k}", prompt_ids=list(prompt))
            t.append_tokens(list(response), [-1.0 - 0.1 * i for i in range(len(response))], 0)
            t.node_ids = list(nodes)
            t.reward, t.finish_reason = reward if k == 0 else 1.0 - reward, FinishReason.STOP
            g.trajectories.append(t)
        groups.append(g)
    return groups


def test_a_shared_prefix_enters_the_loss_once_and_micro_batches_give_the_batch_update(model_path):
    treerl = AlgorithmConfig(tree_advantage="treerl")
    whole, split = make_trainer(model_path, treerl, **WHOLE), make_trainer(model_path, treerl, **SPLIT)
    g_whole, g_split = capture_gradients(whole), capture_gradients(split)
    m_whole, m_split = whole.train_step(tree_batch()), split.train_step(tree_batch())
    assert m_whole["train/num_tokens"] == 2 * DISTINCT  # each tree's shared tokens trained once
    assert m_whole["train/tree_masked_tokens"] == 2 * (ALL_TOKENS - DISTINCT)
    assert m_whole["train/tree_leaves"] == 2 * len(LEAVES) and m_whole["adv/max"] > 0 > m_whole["adv/min"]
    assert m_split["train/micro_batches"] >= 2
    assert m_split["train/loss"] == pytest.approx(m_whole["train/loss"], rel=1e-5, abs=1e-7)
    assert_close_grads(g_split, g_whole)
    leaf = make_trainer(model_path, AlgorithmConfig(tree_advantage="leaf"), **WHOLE).train_step(tree_batch())
    assert leaf["train/num_tokens"] == 2 * ALL_TOKENS and leaf["train/tree_masked_tokens"] == 0


def rank_main(model_path: str, rank: int, port: int, out: str) -> None:
    """One of two ranks: a step on ordinary and tree groups together, micro-batched."""
    tr = make_trainer(model_path, AlgorithmConfig(tree_advantage="depth"), rank=rank, world_size=2,
                      master_port=port, **SPLIT)
    grads = capture_gradients(tr)
    metrics = tr.train_step(groups_of_several_lengths() + tree_batch())
    torch.save({"grads": dict(grads), "metrics": metrics}, out)


def test_two_ranks_train_tree_and_ordinary_groups_as_one_rank_does(model_path, tmp_path):
    from trainer.distributed import _free_port

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.integration.test_tree_train", model_path, str(rank),
                               str(port), str(tmp_path / f"rank{rank}.pt")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    one = make_trainer(model_path, AlgorithmConfig(tree_advantage="depth"), **WHOLE)
    g_one = capture_gradients(one)
    ref = one.train_step(groups_of_several_lengths() + tree_batch())
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert ref["train/tree_masked_tokens"] == 2 * (ALL_TOKENS - DISTINCT)
    for r in ranks:
        for key in ("train/loss", "train/grad_norm", "train/num_tokens", "adv/mean", "adv/max"):
            assert r["metrics"][key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
        assert_close_grads(r["grads"], dict(g_one))


def test_grove_train_with_tree_rollouts_trains_each_step(tmp_path, model_path):
    """Surprisal branching always finds branch points, so every tree shares prefixes; no
    lookahead, so none is pruned (the default LATR rule may find none on this task)."""
    kwargs = "{rule: surprisal, top_n: 3, rounds: 2, lookahead: 0}"
    out = grove(["rollout.workflow=tree", f"+rollout.workflow_kwargs={kwargs}",
                 "algorithm.tree_advantage=treerl", "trainer.total_steps=3", "trainer.batch_groups=4",
                 "eval.every_steps=0", "eval.max_rows=40", "logger=none", "run_name=tree"], tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    match = LAST_LINE.match(out.stdout.strip().splitlines()[-1])
    assert match, out.stdout[-2000:]
    records = [json.loads(line) for line in (Path(match.group(3)) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert "'lost': 0" in out.stderr
    for r in steps:
        assert r["train/tree_leaves"] > r["train/num_trajectories"] / 2  # trees, not stray groups
        assert r["train/tree_masked_tokens"] > 0  # shared prefixes were trained once
        assert r["train/updates_applied"] == 1
        assert 1 < r["tree/leaves"] <= 8 and r["tree/branch_points"] > 0 and r["tree/decoded_tokens_per_leaf"] > 0


if __name__ == "__main__":  # one rank of test_two_ranks_train_tree_and_ordinary_groups_as_one_rank_does
    model_path, rank, port, out = sys.argv[1:]
    rank_main(model_path, int(rank), int(port), out)
