"""D³S at token level: keep the tokens with the highest |A|·H in the loss (pure torch).

D³S, "Learning More with Less: A Dynamic Dual-Level Down-Sampling Framework for Efficient
Policy Optimization" (arXiv 2509.22115). Its sample level (the subset of a group with the
largest Var(A)) is `buffer.strategies.d3s_select`, applied by `sampling=d3s`'s `trim`
before a batch reaches the trainer; this module is its token level, applied inside
`algorithms.compute_policy_loss` when `algorithm.d3s_token_keep_start` or `_end` is below 1.

The paper gives the score and the shape of the schedule ("aggressive early, relaxed
later"); the exact rule below is ours (docs/sampling.md):

- **Score.** s_{i,t} = |A_{i,t}|·H_{i,t} for every trained token (loss mask > 0), with A
  the token's advantage and H the policy's entropy at that position (no gradient).
- **Schedule.** f(v) = start + (end − start)·min(1, v / relax_steps), v the trainer's
  version before this step's update (`PolicyLossInputs.current_version`).
- **Scope "sequence"** (default). Row i keeps its k_i = max(1, ⌊f·n_i + ½⌋) highest-scoring
  trained tokens, n_i its trained tokens (f·n_i rounded to the nearest, at least one). A row is never
  split between micro-batches or ranks, so the kept set does not depend on
  `trainer.max_tokens_per_micro_batch` or `trainer.world_size`. With one advantage per
  response |A| is constant along the row, and the ranking is by H alone.
- **Scope "micro_batch".** The micro-batch keeps its max(1, ⌊f·N + ½⌋) highest-scoring tokens over all
  its rows (N its trained tokens): |A| then ranks across responses, as the paper's
  batch-wide ranking does; it equals that rule when the batch is one micro-batch, and
  otherwise depends on how the batch was split.
- Ties keep the earlier position (a stable sort), so the selection is deterministic.
- **Weights and the global denominators.** The loss denominators are the whole batch's,
  counted from the loss mask before any micro-batch runs (`loss_denominators`), while the
  entropy exists only inside the micro-batch's forward. So a dropped token is a zero-weight
  token that still counts in those denominators: dropping is a reweighting. With
  `rescale` (default) each kept token is weighted n/k of its row (scope sequence) or of
  its micro-batch (scope micro_batch), so every row (micro-batch) keeps its total weight
  in the loss and the gradient's scale does not shrink with f: under token-mean each row's
  share is its kept tokens' mean times n_i/N, under seq-mean-token-mean the row's term is
  the mean over its kept tokens. Without `rescale`, kept tokens keep weight 1 and the
  loss is the undropped loss with the dropped tokens' terms set to zero (scale ≈ f).
  Either way the pieces' losses still add up to the batch's (the selection and the
  weights are local to a row or a piece), so micro-batching stays exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

D3S_TOKEN_SCOPES = ("sequence", "micro_batch")


def d3s_token_keep_fraction(version: int, start: float, end: float, relax_steps: int) -> float:
    """f(v) = start + (end − start)·min(1, v / relax_steps): the share of trained tokens kept
    at trainer version v (start at v = 0, end from v = relax_steps on; relax_steps ≤ 0: end)."""
    progress = min(1.0, max(0.0, version / relax_steps)) if relax_steps > 0 else 1.0
    return start + (end - start) * progress


def _kept_counts(trained: Tensor, fraction: float) -> Tensor:
    """max(1, ⌊fraction·n + ½⌋) for each count n ≥ 1 (0 stays 0): the nearest whole number,
    halves up (the tolerance keeps exact halves exact)."""
    k = torch.floor(trained.to(torch.float64) * fraction + 0.5 + 1e-9).to(trained.dtype)
    return torch.where(trained > 0, k.clamp(min=1), torch.zeros_like(k))


def d3s_top_tokens(scores: Tensor, mask: Tensor, fraction: float, scope: str = "sequence") -> Tensor:
    """Bool (B, T): the trained tokens (mask > 0) kept, the max(1, ⌊fraction·n + ½⌋) highest `scores` of
    each row (scope "sequence") or of the whole (B, T) (scope "micro_batch"); ties keep the
    earlier position (row-major for micro_batch)."""
    if scope not in D3S_TOKEN_SCOPES:
        raise ValueError(f"algorithm.d3s_token_scope={scope!r} is not one of {list(D3S_TOKEN_SCOPES)}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the D³S token keep fraction must be in (0, 1], got {fraction!r}")
    trained = mask > 0
    if fraction >= 1.0:
        return trained
    ranked = torch.where(trained, scores.detach().to(torch.float64), -math.inf)
    flat = scope == "micro_batch"
    if flat:
        ranked = ranked.reshape(1, -1)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    k = _kept_counts(trained.reshape(ranked.shape).sum(-1, keepdim=True), fraction)
    return (rank < k).reshape(mask.shape) & trained


def d3s_token_weights(advantages: Tensor, entropy: Tensor, mask: Tensor, fraction: float,
                      scope: str = "sequence", rescale: bool = True) -> tuple[Tensor, dict[str, float]]:
    """Constant per-token weights (B, T) of D³S's token level, and metrics.

    Kept tokens (`d3s_top_tokens` of |A|·H) weigh 1, or n/k of their row / micro-batch with
    `rescale`; dropped tokens and untrained positions weigh 0. `advantages` is (B,) or
    (B, T), `entropy` (B, T); neither carries gradient through the weights.
    metrics: d3s_token_keep_frac (kept / trained tokens), d3s_token_keep_target (f)."""
    mask = mask.detach()
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    scores = adv.expand_as(mask).abs() * entropy.detach()
    keep = d3s_top_tokens(scores, mask, fraction, scope)
    weight = keep.to(mask.dtype)
    trained = (mask > 0).sum()
    if rescale:
        dims = -1 if scope == "sequence" else (-2, -1)
        n = (mask > 0).sum(dims, keepdim=True).to(mask.dtype)
        k = keep.sum(dims, keepdim=True).to(mask.dtype)
        weight = weight * (n / k.clamp(min=1))
    metrics = {"d3s_token_keep_frac": float(keep.sum()) / max(float(trained), 1.0),
               "d3s_token_keep_target": float(fraction)}
    return weight, metrics
