"""Outcome advantages for group-sampled responses (one scalar per response).

A group is the set of responses to one prompt. `group_ids` are arbitrary integer labels
(not necessarily contiguous or sorted) and groups may differ in size. Group statistics
are computed with `index_add_` and `scatter_reduce`, without a Python loop over groups.

A group whose rewards are all equal (a singleton included) gets exactly 0, in every
dtype: it is detected by its max == min, not by a small std, because the mean of equal
non-dyadic rewards (0.7, 0.1, ...) is rounded, and the centred rewards it leaves, divided
by std + eps, are far from 0 (about 0.06 for eight float32 rewards of 0.7, ~1 in bfloat16).

Adding an estimator: write `fn(rewards, group_ids, cfg) -> advantages` and add it to
`ADVANTAGE_ESTIMATORS`; `AlgorithmConfig.advantage` then accepts its name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from algorithms.config import AlgorithmConfig


def _group_index(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Map labels to 0..G-1: returns inverse (N,) long and counts (G,) long."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return inverse, counts


def _group_sum(values: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    """Per-group sum of `values` (N,) -> (G,)."""
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)


def _group_all_equal(values: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    """(G,) bool: whether every member of each group holds the same value (max == min).

    Every group has at least one member (groups come from `_group_index`), so the
    initial values are never read. A group holding a NaN is not all-equal.
    """
    init = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    hi = init.scatter_reduce(0, inverse, values, "amax", include_self=False)
    lo = init.scatter_reduce(0, inverse, values, "amin", include_self=False)
    return hi == lo


def group_normalized(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO (arXiv 2402.03300): A_i = (R_i - mean_g R) / (std_g R + eps).

    Unbiased std (n - 1). A group of one response, or whose rewards are all equal,
    gets exactly 0: it carries no learning signal.

    rewards: (N,) float; group_ids: (N,) integer labels. Returns (N,).
    """
    inverse, counts = _group_index(group_ids)
    n = counts.to(rewards.dtype)  # (G,)
    mean = _group_sum(rewards, inverse, n.numel()) / n  # (G,)
    centered = rewards - mean[inverse]  # (N,)
    var = _group_sum(centered**2, inverse, n.numel()) / (n - 1).clamp(min=1)  # (G,), 0 for singletons
    advantages = centered / (var.sqrt()[inverse] + eps)  # (N,)
    flat = _group_all_equal(rewards, inverse, n.numel())[inverse]  # (N,)
    return torch.where(flat, torch.zeros_like(advantages), advantages)


def mean_only(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dr.GRPO (arXiv 2503.20783): A_i = R_i - mean_g R, no std division.

    Dividing by the std up-weights prompts that are nearly always right or wrong;
    Dr.GRPO removes it. A group whose rewards are all equal gets exactly 0.
    rewards: (N,); group_ids: (N,). Returns (N,).
    """
    inverse, counts = _group_index(group_ids)
    mean = _group_sum(rewards, inverse, counts.numel()) / counts.to(rewards.dtype)  # (G,)
    advantages = rewards - mean[inverse]  # (N,)
    flat = _group_all_equal(rewards, inverse, counts.numel())[inverse]  # (N,)
    return torch.where(flat, torch.zeros_like(advantages), advantages)


def novelty_sharpen(
    advantages: Tensor, seq_mean_logprobs: Tensor, group_ids: Tensor, lam: float = 1.0, kappa: float = 0.5
) -> Tensor:
    """XRPO novelty-aware sharpening (arXiv 2510.06672, formula from secondary summaries).

    Rewards correct answers the policy found unlikely, to keep exploring:
        s_i = mean_t log pi(y_t)            (given as seq_mean_logprobs)
        eta_i = exp(s_i - mean_g s)
        A+_i = A_i + min(max(lam * (1 - eta_i), 0), kappa * A_i)     only where A_i > 0.
    The bonus is at most kappa * A_i, so it never flips or dominates the sign.
    All inputs (N,). Returns (N,).
    """
    inverse, counts = _group_index(group_ids)
    n = counts.to(seq_mean_logprobs.dtype)  # (G,)
    s_bar = _group_sum(seq_mean_logprobs, inverse, n.numel()) / n  # (G,)
    eta = torch.exp(seq_mean_logprobs - s_bar[inverse])  # (N,)
    bonus = torch.minimum((lam * (1 - eta)).clamp(min=0), kappa * advantages)  # (N,)
    return torch.where(advantages > 0, advantages + bonus, advantages)


AdvantageEstimator = Callable[[Tensor, Tensor, "AlgorithmConfig"], Tensor]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "group_norm": lambda rewards, group_ids, cfg: group_normalized(rewards, group_ids, cfg.adv_eps),
    "mean_only": lambda rewards, group_ids, cfg: mean_only(rewards, group_ids),
}


def compute_advantages(
    rewards: Tensor, group_ids: Tensor, cfg: AlgorithmConfig, seq_mean_logprobs: Optional[Tensor] = None
) -> Tensor:
    """Per-response advantages (N,) for `cfg.advantage`, then optional novelty sharpening.

    seq_mean_logprobs (N,): mean per-token logprob of each response, needed only when
    cfg.novelty_sharpening is on. The result carries no gradient.
    """
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        shapes = f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)}"
        raise ValueError(f"{shapes} must both be (N,)")
    with torch.no_grad():
        advantages = ADVANTAGE_ESTIMATORS[cfg.advantage](rewards, group_ids, cfg)
        if cfg.novelty_sharpening:
            if seq_mean_logprobs is None:
                raise ValueError("algorithm.novelty_sharpening=true needs seq_mean_logprobs (N,)")
            advantages = novelty_sharpen(
                advantages, seq_mean_logprobs, group_ids, cfg.novelty_lambda, cfg.novelty_kappa
            )
    return advantages
