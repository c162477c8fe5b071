"""Packing groups into padded batches, and splitting a batch into micro-batches and rank shares.

Tree groups (`Group.tree_parents` set, rollout.workflow=tree) are packed with per-token
advantages from `algorithm.tree_advantage` (`tree_terms`) and their shared-prefix keep mask
multiplied into the loss mask; every other group packs as before, one advantage per row.

Rows are sorted by length into buckets of at most `trainer.max_tokens_per_micro_batch`
padded tokens (`length_buckets`); with several ranks each takes a share balanced by tokens
(`split_by_tokens`), and every rank runs the same number of micro-batches (`plan_update`).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Optional

import torch

from algorithms.tree import tree_advantages
from buffer.types import Group


@dataclass
class PackedBatch:
    """Groups flattened to padded tensors. Per-token tensors are (B, L-1): position t holds
    what is known about token t+1 of prompt+response, so logits line up without slicing."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    behaviour_logprobs: torch.Tensor  # (B, L-1)
    versions: torch.Tensor  # (B, L-1), -1 outside responses
    loss_mask: torch.Tensor  # (B, L-1) float
    rewards: torch.Tensor  # (B,)
    group_index: torch.Tensor  # (B,)
    response_lengths: torch.Tensor  # (B,) response tokens of each row
    num_tokens: int
    # Tree groups only (both None when the batch has none): per-token advantages (B, L-1),
    # 0 outside tree rows, and which rows are tree leaves (B,) bool.
    token_advantages: Optional[torch.Tensor] = None
    tree_rows: Optional[torch.Tensor] = None
    tree_masked_tokens: int = 0  # tokens the shared-prefix keep mask took out of the loss

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The same batch with every tensor on `device` (the model's)."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return PackedBatch(**moved)


def tree_terms(group: Group, estimator: str, eps: float) -> tuple[list[list[float]], list[list[int]]]:
    """A tree group's per-token advantages and keep mask (`algorithms.tree.tree_advantages`),
    one list per leaf, after checking that every leaf carries one node id per response token.
    The keep mask keeps each shared token in the first leaf that trains it (its loss mask)."""
    for t in group.trajectories:
        if len(t.node_ids) != len(t.response_ids):
            raise ValueError(
                f"tree group {group.group_id}: trajectory {t.uid} has {len(t.node_ids)} node_ids for "
                f"{len(t.response_ids)} response tokens; a tree workflow must give every response token "
                "its node (Trajectory.node_ids)")
    try:
        return tree_advantages(estimator, [t.node_ids for t in group.trajectories], group.rewards,
                               group.tree_parents, eps, loss_masks=[t.loss_mask for t in group.trajectories])
    except ValueError as err:
        raise ValueError(f"tree group {group.group_id} (algorithm.tree_advantage={estimator!r}): {err}") from err


def pack_groups(groups: list[Group], pad_id: int, tree_advantage: Optional[str] = None,
                adv_eps: float = 1e-6) -> PackedBatch:
    """Pad the groups' trajectories into one batch. A tree group (non-empty `tree_parents`)
    needs `tree_advantage` (a key of algorithms.tree.TREE_ADVANTAGES): its rows get per-token
    advantages and its keep mask is multiplied into their loss mask."""
    trajs = [t for g in groups for t in g.trajectories]
    group_index = [i for i, g in enumerate(groups) for _ in g.trajectories]
    for t in trajs:
        if t.reward is None:
            raise ValueError(f"trajectory {t.uid} reached the trainer without a reward")
    terms: dict[int, tuple[list[float], list[int]]] = {}  # row -> (its advantages, its keep mask)
    row = 0
    for g in groups:
        if g.tree_parents:
            if tree_advantage is None:
                raise ValueError(f"tree group {g.group_id} reached pack_groups without a tree_advantage: "
                                 "pass algorithm.tree_advantage")
            for k, pair in enumerate(zip(*tree_terms(g, tree_advantage, adv_eps))):
                terms[row + k] = pair
        else:
            stray = next((t for t in g.trajectories if t.node_ids), None)
            if stray is not None:
                raise ValueError(f"group {g.group_id}: trajectory {stray.uid} has node_ids but the group has no "
                                 "tree_parents; a tree workflow must set Group.tree_parents")
        row += len(g.trajectories)
    length = max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    batch = len(trajs)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    behaviour = torch.zeros((batch, length - 1))
    versions = torch.full((batch, length - 1), -1, dtype=torch.long)
    mask = torch.zeros((batch, length - 1))
    token_adv = torch.zeros((batch, length - 1)) if terms else None
    masked = 0
    for row, t in enumerate(trajs):
        p, r = len(t.prompt_ids), len(t.response_ids)
        input_ids[row, : p + r] = torch.tensor(t.prompt_ids + t.response_ids)
        attention[row, : p + r] = 1
        span = slice(p - 1, p - 1 + r)
        behaviour[row, span] = torch.tensor(t.behaviour_logprobs)
        versions[row, span] = torch.tensor(t.versions)
        own = torch.tensor(t.loss_mask, dtype=torch.float)
        if row in terms:
            adv, keep = terms[row]
            token_adv[row, span] = torch.tensor(adv, dtype=torch.float)
            kept = torch.tensor(keep, dtype=torch.float)
            masked += int(((own > 0) & (kept == 0)).sum())
            own = own * kept
        mask[row, span] = own
    return PackedBatch(
        input_ids=input_ids,
        attention_mask=attention,
        behaviour_logprobs=behaviour,
        versions=versions,
        loss_mask=mask,
        rewards=torch.tensor([float(t.reward) for t in trajs]),
        group_index=torch.tensor(group_index),
        response_lengths=torch.tensor([len(t.response_ids) for t in trajs]),
        num_tokens=int(mask.sum()),
        token_advantages=token_adv,
        tree_rows=torch.tensor([row in terms for row in range(batch)]) if terms else None,
        tree_masked_tokens=masked,
    )


def row_advantages(batch: PackedBatch, advantages: torch.Tensor) -> torch.Tensor:
    """The advantages the loss reads: `advantages` (B,), one per row, as they are when the
    batch has no tree rows; else (B, L-1), each row's scalar on every position and the tree
    rows' own per-token advantages in their place."""
    if batch.token_advantages is None:
        return advantages
    per_row = advantages.to(batch.token_advantages.dtype)[:, None].expand_as(batch.token_advantages)
    return torch.where(batch.tree_rows[:, None], batch.token_advantages, per_row)


def head_chunks(positions: int, chunk_tokens: Optional[int]) -> int:
    """Chunks of at most `chunk_tokens` positions (None: one chunk)."""
    return 1 if not chunk_tokens else max(1, math.ceil(positions / chunk_tokens))


def length_buckets(lengths: list[int], overhead_tokens: int, max_tokens: Optional[int] = None) -> list[list[int]]:
    """Row indices grouped by length so that the padded work, Σ over buckets of
    (overhead_tokens + rows × longest row), is least; with `max_tokens`, no bucket holds
    more than max_tokens padded tokens (rows × longest row) unless it is a single row.

    On a long-tail batch one padded forward pays for every short row at the longest row's
    length; a few buckets cut that to about the real tokens. Optimal over cuts between
    distinct lengths (an O(k²) dynamic programme, k = distinct lengths); a run of lengths
    over the cap is dealt into as few near-equal buckets as fit, each paying the overhead."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ascending = [lengths[i] for i in order]
    distinct = sorted(set(lengths))
    count_upto = [bisect.bisect_right(ascending, d) for d in distinct]  # rows with length <= d

    def pieces(rows: int, longest: int) -> int:
        if max_tokens is None:
            return 1
        return math.ceil(rows / max(1, max_tokens // max(1, longest)))

    best = [0.0] * (len(distinct) + 1)  # best[j]: least cost of the rows up to distinct[j-1]
    cut = [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        best[j] = float("inf")
        for i in range(j):  # the last bucket holds distinct[i:j]
            rows = count_upto[j - 1] - (count_upto[i - 1] if i else 0)
            cost = best[i] + overhead_tokens * pieces(rows, distinct[j - 1]) + rows * distinct[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], len(distinct)
    while j > 0:
        bounds.append((count_upto[cut[j] - 1] if cut[j] else 0, count_upto[j - 1], distinct[j - 1]))
        j = cut[j]
    buckets = []
    for a, b, longest in reversed(bounds):
        run, n = order[a:b], pieces(b - a, longest)
        buckets.extend(run[len(run) * part // n: len(run) * (part + 1) // n] for part in range(n))  # near-equal
    return buckets


def split_by_tokens(lengths: list[int], parts: int) -> list[list[int]]:
    """Row indices dealt to `parts` ranks by tokens, not by rows: longest row first, each
    to the rank with the fewest tokens so far (ties: fewer rows, then the lower rank). The
    heaviest rank holds at most the mean plus one row; with at least `parts` rows every rank
    gets one; the same lengths always give the same split. Each share is in row order."""
    loads = [0] * parts
    shares: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(parts), key=lambda r: (loads[r], len(shares[r]), r))
        shares[rank].append(i)
        loads[rank] += lengths[i]
    return [sorted(share) for share in shares]


@dataclass
class UpdatePlan:
    """One optimizer update as this rank runs it."""

    rows: list[int]  # every row of the (mini)batch, on every rank
    micro_batches: list[Optional[list[int]]]  # this rank's, as batch rows; None = a zero-loss stand-in
    head_chunks: list[int]  # output-layer chunks of each micro-batch, the same on every rank
    split: bool  # more than one micro-batch or rank: the denominators must be the whole batch's


def plan_update(rows: list[int], lengths: list[int], scored: list[int], rank: int, world_size: int,
                overhead_tokens: int, max_tokens: Optional[int], chunk_tokens: Optional[int]) -> UpdatePlan:
    """This rank's micro-batches of the update over `rows` (batch row indices).

    `lengths[i]`: prompt + response tokens of row i; `scored[i]`: its positions the output
    layer scores. Rows are split over ranks by tokens, then each share into length-sorted
    micro-batches. Every rank computes every rank's plan from the same batch, so they
    agree without talking: each runs the most micro-batches any rank has (a rank short of
    them, or of rows, runs stand-ins), and micro-batch k has the same number of output-layer
    chunks on every rank (ZeRO-3 gathers the output layer once per chunk)."""
    shares = split_by_tokens([lengths[i] for i in rows], world_size)
    per_rank = []
    for share in shares:
        share_rows = [rows[i] for i in share]
        buckets = length_buckets([lengths[i] for i in share_rows], overhead_tokens, max_tokens) if share_rows else []
        per_rank.append([[share_rows[i] for i in bucket] for bucket in buckets])
    count = max(1, max(len(plan) for plan in per_rank))
    chunks = [max(head_chunks(sum(scored[i] for i in plan[k]), chunk_tokens) if k < len(plan) else 1
                  for plan in per_rank) for k in range(count)]
    mine: list[Optional[list[int]]] = list(per_rank[rank]) + [None] * (count - len(per_rank[rank]))
    return UpdatePlan(rows=list(rows), micro_batches=mine, head_chunks=chunks, split=count > 1 or world_size > 1)


def batch_statistics(batch: PackedBatch, advantages: torch.Tensor, version: int) -> dict[str, float]:
    """What practitioners read first: advantage spread, dead groups, lengths, staleness.
    Per-token advantages (a batch with tree rows) are summarised over the trained tokens."""
    lengths = batch.loss_mask.sum(-1)
    groups = batch.group_index.unique()
    zero_variance = sum(float(batch.rewards[batch.group_index == g].std(unbiased=False)) < 1e-8 for g in groups)
    trained = batch.loss_mask > 0
    ages = (version - batch.versions[trained]).float()
    if advantages.dim() == 2:
        advantages = advantages[trained] if trained.any() else advantages.new_zeros(1)
    tree = {}
    if batch.tree_rows is not None:
        tree = {"train/tree_leaves": float(batch.tree_rows.sum()),
                "train/tree_masked_tokens": float(batch.tree_masked_tokens)}
    return {
        **tree,
        "adv/mean": float(advantages.mean()),
        "adv/std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
        "adv/min": float(advantages.min()),
        "adv/max": float(advantages.max()),
        "batch/zero_variance_group_frac": zero_variance / len(groups),
        "response/length_mean": float(lengths.mean()),
        "response/length_min": float(lengths.min()),
        "response/length_max": float(lengths.max()),
        "staleness/token_age_mean": float(ages.mean()) if ages.numel() else 0.0,
        "staleness/token_age_max": float(ages.max()) if ages.numel() else 0.0,
    }
