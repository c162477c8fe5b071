"""Policy-gradient losses: off-policy weights, per-token surrogate, aggregation.

`compute_policy_loss` is the trainer's single entry point. It runs five steps:
  1. pi_old of the clip ratio: `inputs.old_logprobs`, or in decoupled PPO with
     prox_mode="loglinear" the log-linear approximation `loglinear_prox`.
  2. `importance_weights`: the constant per-token weight w (decoupled PPO / TIS) and
     the rejection mask. Computed once, applied the same way to every policy loss.
  3. `POLICY_LOSSES[cfg.policy_loss]`: the clipped surrogate per token, (B, T).
  4. per_token = w * surrogate + kl_coef * KL_k3(pi_theta || pi_ref) - entropy_coef * H;
     with D³S's token level on, times a constant weight that keeps the tokens with the
     highest |A|·H (`algorithms/d3s.py`; the denominators stay the batch's).
  5. `aggregate(per_token, mask, cfg.loss_agg)`: a scalar.

A batch trained in pieces (micro-batches, ranks) passes `LossDenominators` computed over
the whole (mini)batch (`loss_denominators`): each piece's loss is then its exact share of
the whole batch's loss, so the pieces' gradients add up to the whole batch's gradient in
every aggregation mode.

Everything is minimised (loss = -objective). Tensors are (B, T) = (sequences, response
tokens); `mask` is 0/1 and marks the tokens that are trained. Masked positions must
hold finite values (0 is fine). Adding a policy loss: write a function with the
`PolicyLossFn` signature and add it to `POLICY_LOSSES`; likewise `AGGREGATIONS`, whose
functions take (loss, mask, constant, denominators) and must honour the denominators
when given, or the trainer cannot split a batch into micro-batches or ranks.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, TypeVar

import torch
from torch import Tensor

from algorithms.d3s import d3s_token_keep_fraction, d3s_token_weights

if TYPE_CHECKING:
    from algorithms.config import AlgorithmConfig

_T = TypeVar("_T")


@dataclass
class PolicyLossInputs:
    """One micro-batch of responses, as the trainer hands it to `compute_policy_loss`."""

    logprobs: Tensor  # (B, T) log pi_theta(o_t), carries the gradient
    old_logprobs: Optional[Tensor]  # (B, T) pi_old of the ratio (pi_prox if decoupled); None if loglinear
    advantages: Tensor  # (B,) one per sequence, or (B, T) per token
    loss_mask: Tensor  # (B, T) bool or 0/1 float; 0 = not trained (padding, prompt, masked)
    behav_logprobs: Optional[Tensor] = None  # (B, T) engine logprobs at generation time
    ref_logprobs: Optional[Tensor] = None  # (B, T) reference policy; needed when kl_coef > 0
    entropy: Optional[Tensor] = None  # (B, T) policy entropy, with grad; needed when entropy_coef > 0
    versions: Optional[Tensor] = None  # (B, T) long: policy version that generated each token (< 0: none)
    current_version: Optional[int] = None  # trainer version before this step's update (= version of pi_prox)


@dataclass
class PolicyLossOutput:
    """The scalar to backpropagate, and detached floats to log.

    metrics keys: clip_frac_low, clip_frac_high, dual_clip_frac, ratio_mean, ratio_max,
    approx_kl (k3 of pi_theta vs pi_old), is_weight_mean, is_weight_max, is_clipped_frac,
    rejected_frac; plus kl (when ref_logprobs given), entropy (when entropy given),
    mismatch_kl (k3 of pi_behav vs pi_old, i.e. engine/trainer mismatch plus staleness, when
    behav_logprobs given).
    """

    loss: Tensor  # () scalar
    metrics: dict[str, float]


@dataclass
class TokenLoss:
    """What a policy loss returns: the per-token loss and where each clip was active."""

    loss: Tensor  # (B, T)
    ratio: Tensor  # (B, T) the ratio that was clipped (token ratio, or sequence ratio broadcast)
    clipped_low: Tensor  # (B, T) bool: A < 0 and ratio < 1 - clip_low (no gradient)
    clipped_high: Tensor  # (B, T) bool: A > 0 and ratio > 1 + clip_high (no gradient)
    dual_clipped: Tensor  # (B, T) bool: A < 0 and ratio > dual_clip (no gradient)


# ---------------------------------------------------------------------------------------
# Policy losses: (logprobs, old_logprobs, advantages (B, T), mask, *, clip_low, clip_high,
# dual_clip) -> TokenLoss. Off-policy weights and aggregation are applied by the caller.
# ---------------------------------------------------------------------------------------

PolicyLossFn = Callable[..., TokenLoss]


def _clipped_surrogate(
    ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float, dual_clip: Optional[float]
) -> TokenLoss:
    """PPO's pessimistic bound, shared by every loss (arXiv 1707.06347; clip-higher, DAPO 2503.14476).

    loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); with dual clip c
    (arXiv 1912.09729), for A < 0 only: loss = min(loss, -A c), so a huge ratio on a
    bad token cannot blow the loss up.
    """
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(-advantages * ratio, -advantages * clipped_ratio)  # (B, T)
    dual_clipped = torch.zeros_like(ratio, dtype=torch.bool)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
        dual_clipped = (advantages < 0) & (ratio > dual_clip)
    return TokenLoss(
        loss=loss,
        ratio=ratio,
        clipped_low=(advantages < 0) & (ratio < 1 - clip_low),
        clipped_high=(advantages > 0) & (ratio > 1 + clip_high),
        dual_clipped=dual_clipped,
    )


def ppo_clip(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float] = None,
) -> TokenLoss:
    """Token-level PPO clip (GRPO arXiv 2402.03300, DAPO 2503.14476): r_t = pi_theta / pi_old.

    The log-ratio is clamped to [-20, 20] as a numerical guard only.
    """
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20, 20))  # (B, T)
    return _clipped_surrogate(ratio, advantages, clip_low, clip_high, dual_clip)


def _seq_mean_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """(1/|o_i|) sum_t log r_{i,t} over the trained tokens -> (B, 1)."""
    return ((logprobs - old_logprobs) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)


def gspo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float] = None,
) -> TokenLoss:
    """GSPO (arXiv 2507.18071): one ratio per sequence, s_i = exp(mean_t log r_{i,t}), log s_i <= 10.

    The sequence loss is broadcast to every token of the sequence, so aggregate with
    seq-mean-token-mean to get the paper's (1/G) sum_i. Paper clip range: 3e-4 / 4e-4.
    """
    log_s = _seq_mean_log_ratio(logprobs, old_logprobs, mask).clamp(max=10)  # (B, 1)
    ratio = torch.exp(log_s).expand_as(logprobs)  # (B, T)
    return _clipped_surrogate(ratio, advantages, clip_low, clip_high, dual_clip)


def gspo_token(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float] = None,
) -> TokenLoss:
    """GSPO-token (arXiv 2507.18071): s_{i,t} = sg[s_i] * pi_theta(o_t) / sg[pi_theta(o_t)].

    Same value as s_i, but the gradient flows per token, so per-token advantages can be
    used; with sequence advantages and seq-mean-token-mean it equals GSPO's gradient.
    """
    log_s = _seq_mean_log_ratio(logprobs, old_logprobs, mask).detach()  # (B, 1)
    log_s_t = (log_s + logprobs - logprobs.detach()).clamp(max=10)  # (B, T)
    return _clipped_surrogate(torch.exp(log_s_t), advantages, clip_low, clip_high, dual_clip)


POLICY_LOSSES: dict[str, PolicyLossFn] = {
    "ppo_clip": ppo_clip,
    "gspo": gspo,
    "gspo_token": gspo_token,
}


# ---------------------------------------------------------------------------------------
# Aggregation: (per_token_loss (B, T), mask (B, T), constant, denominators) -> scalar.
# Fully masked sequences are left out of the "seq-mean" denominators.
# ---------------------------------------------------------------------------------------


@dataclass
class LossDenominators:
    """The divisors of an aggregation, taken over a whole (mini)batch when it is trained in
    pieces: micro-batches, ranks. None = from the piece's own mask (right when the piece
    is the whole batch). A sequence's own token count (seq-mean-token-mean) always comes
    from its row, which a piece holds whole.

    tokens: trained tokens (token-mean). sequences: sequences with at least one trained
    token (seq-mean-*). length: Dr.GRPO's L_const when the algorithm sets none
    (seq-mean-token-sum-norm); the trainer passes the batch's longest response.
    """

    tokens: Optional[float] = None
    sequences: Optional[float] = None
    length: Optional[float] = None


def loss_denominators(mask: Tensor, max_response_length: Optional[float] = None) -> LossDenominators:
    """The denominators of the whole (mini)batch `mask` (B, T), to pass to every piece.

    Sums over disjoint pieces add up (tokens, sequences), so ranks all-reduce them."""
    mask = mask.detach()
    return LossDenominators(
        tokens=float(mask.sum()),
        sequences=float((mask.sum(-1) > 0).sum()),
        length=None if max_response_length is None else float(max_response_length),
    )


def _token_mean(loss: Tensor, mask: Tensor, constant: Optional[float],
                denominators: Optional[LossDenominators] = None) -> Tensor:
    """DAPO (arXiv 2503.14476): sum_{i,t} l / sum_i |o_i|. Every token weighs the same,
    so a long sequence counts in proportion to its length."""
    tokens = denominators.tokens if denominators is not None and denominators.tokens is not None else mask.sum()
    return (loss * mask).sum() / _at_least_one(tokens, loss)


def _at_least_one(value, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).clamp(min=1)


def _seq_mean(per_seq: Tensor, mask: Tensor, denominators: Optional[LossDenominators] = None) -> Tensor:
    """Mean of (B,) over the sequences that have at least one trained token."""
    if denominators is not None and denominators.sequences is not None:
        return per_seq.sum() / _at_least_one(denominators.sequences, per_seq)
    return per_seq.sum() / (mask.sum(-1) > 0).sum().clamp(min=1)


def _seq_mean_token_mean(loss: Tensor, mask: Tensor, constant: Optional[float],
                         denominators: Optional[LossDenominators] = None) -> Tensor:
    """GRPO (arXiv 2402.03300): (1/G) sum_i (1/|o_i|) sum_t l. Every sequence weighs the
    same, whatever its length."""
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    return _seq_mean(per_seq, mask, denominators)


def _seq_mean_token_sum(loss: Tensor, mask: Tensor, constant: Optional[float],
                        denominators: Optional[LossDenominators] = None) -> Tensor:
    """(1/G) sum_i sum_t l. Every token of the batch weighs 1/G."""
    return _seq_mean((loss * mask).sum(-1), mask, denominators)


def _seq_mean_token_sum_norm(loss: Tensor, mask: Tensor, constant: Optional[float],
                             denominators: Optional[LossDenominators] = None) -> Tensor:
    """Dr.GRPO (arXiv 2503.20783) length-unbiased sum: sum_i sum_t l / L_const.

    A fixed divisor (L_const = `constant`; else `denominators.length`, which the trainer
    sets to the batch's longest response; else the mask's T) gives every token the same
    weight in every batch, removing GRPO's length bias. Set the constant (the dr_grpo
    recipe sets rollout.max_tokens), or the weight varies with the batch's longest
    response. Not divided by the number of sequences, so the loss scale grows with the
    batch size.

    verl's mode of the same name differs: since v0.7.1 (PR #5417; same in v0.9.0) its
    `agg_loss` also divides by G, the number of sequences with at least one trained token
    (or the global batch size it is passed): (1/G) sum_i sum_t l / L_const. Grove's value
    is G times verl's. verl v0.7.0 and earlier computed what Grove computes.
    """
    if constant is None:
        given = denominators.length if denominators is not None else None
        constant = given if given is not None else mask.shape[-1]
    return (loss * mask).sum() / constant


AGGREGATIONS: dict[str, Callable[..., Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(per_token_loss: Tensor, mask: Tensor, mode: str, constant: Optional[float] = None,
              denominators: Optional[LossDenominators] = None) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar; `mode` is a key of AGGREGATIONS.

    With `denominators` (of the whole batch this (B, T) is a piece of), the result is the
    piece's share of the whole batch's loss: the pieces' results add up to it.
    An all-masked batch gives 0 (still connected to the graph, so backward works).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss aggregation {mode!r} is not one of {list(AGGREGATIONS)}")
    fn = AGGREGATIONS[mode]
    mask = mask.to(per_token_loss.dtype)
    if denominators is None:
        return fn(per_token_loss, mask, constant)
    if "denominators" not in inspect.signature(fn).parameters:
        raise ValueError(
            f"loss aggregation {mode!r} takes no `denominators` argument, so a batch cannot be trained in "
            "pieces with it: add `denominators: LossDenominators | None = None` to it (see algorithms/losses.py)"
        )
    return fn(per_token_loss, mask, constant, denominators=denominators)


# ---------------------------------------------------------------------------------------
# Off-policy correction and KL.
# ---------------------------------------------------------------------------------------


def importance_weights(
    old_logprobs: Tensor,
    behav_logprobs: Optional[Tensor],
    mask: Tensor,
    *,
    decoupled: bool = False,
    tis: str = "none",
    tis_cap: float = 2.0,
    rejection: str = "none",
    rejection_low: float = 0.5,
    rejection_high: float = 2.0,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Per-token weight w (B, T) and keep mask (B, T), both constants, plus metrics.

    Both corrections use the same ratio rho_t = pi_old(o_t) / pi_behav(o_t), where pi_old
    is pi_prox in decoupled mode and pi_behav generated the token:
      - decoupled PPO (AReaL, arXiv 2505.24298): w_t = rho_t, uncapped.
      - token TIS (verl rollout_corr_math.md; slime): w_t = min(rho_t, C).
      - sequence TIS: w_t = min(prod_t rho_t, C), the same for all tokens of the sequence.
    Since they are the same ratio, TIS with decoupled=True caps the decoupled weight; the
    two are never multiplied together. With all three off, w = 1.
    Rejection (AReaL; verl geometric-mean masking) zeroes the keep mask where
      - token: rho_t is outside [low, high];
      - sequence: the geometric mean (prod_t rho_t)^(1/|o|) is outside [low, high].
    """
    ones = torch.ones_like(mask)
    metrics = {"is_weight_mean": 1.0, "is_weight_max": 1.0, "is_clipped_frac": 0.0, "rejected_frac": 0.0}
    if not (decoupled or tis != "none" or rejection != "none"):
        return ones, ones, metrics
    if behav_logprobs is None:
        raise ValueError("decoupled PPO, TIS and rejection need behav_logprobs (the engine's logprobs)")

    log_rho = ((old_logprobs - behav_logprobs) * mask).detach()  # (B, T), 0 where masked
    seq_log_rho = log_rho.sum(-1, keepdim=True).expand_as(log_rho)  # (B, T) log prod_t rho_t of each sequence

    if tis == "sequence":
        log_w = seq_log_rho
    elif tis == "token" or decoupled:
        log_w = log_rho
    else:
        log_w = torch.zeros_like(log_rho)
    log_cap = math.log(tis_cap) if tis != "none" else math.inf
    capped = log_w > log_cap  # (B, T)
    weight = torch.exp(log_w.clamp(max=log_cap))  # (B, T)

    keep = ones
    if rejection != "none":
        n_tokens = mask.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
        log_test = log_rho if rejection == "token" else seq_log_rho / n_tokens  # (B, T) log rho or geo-mean
        rho = torch.exp(log_test)
        keep = ((rho >= rejection_low) & (rho <= rejection_high)).to(mask.dtype)  # (B, T)

    metrics = {
        "is_weight_mean": _masked_mean(weight, mask),
        "is_weight_max": _masked_max(weight, mask),
        "is_clipped_frac": _masked_mean(capped, mask),
        "rejected_frac": _masked_mean(1 - keep, mask),
    }
    return weight, keep, metrics


@torch.no_grad()
def loglinear_prox(
    behav_logprobs: Tensor, current_logprobs: Tensor, versions: Tensor, v_prox: int, v_current: int
) -> Tensor:
    """AReaL's proximal approximation (docs/algorithms/prox_approx.md), no gradient:

        log pi_prox = log pi_behav + alpha (log pi_theta - log pi_behav),
        alpha = clamp((v_prox - v_behav) / (v_current - v_behav), 0, 1).

    Saves the trainer's forward pass for pi_prox. A token generated by the proximal
    weights (v_behav = v_prox) gets pi_behav; tokens with v_behav >= v_current or without
    a version (< 0) get alpha = 0. All tensors (B, T); versions are per-token, long.
    """
    v_behav = versions.to(behav_logprobs.dtype)  # (B, T)
    span = v_current - v_behav
    alpha = torch.where((span > 0) & (versions >= 0), (v_prox - v_behav) / span.clamp(min=1), 0.0).clamp(0, 1)
    return behav_logprobs + alpha * (current_logprobs - behav_logprobs)


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(p || q), from tokens sampled from p. Element-wise, (B, T).

    k3 = exp(x) - x - 1 >= 0 with x = log q - log p clamped to [-20, 20]: unbiased and
    low-variance. GRPO (arXiv 2402.03300) uses p = pi_theta, q = pi_ref.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-20, 20)
    return torch.exp(log_ratio) - log_ratio - 1


# ---------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------


def compute_policy_loss(inputs: PolicyLossInputs, cfg: AlgorithmConfig,
                        denominators: Optional[LossDenominators] = None) -> PolicyLossOutput:
    """weights -> per-token loss -> + kl_coef * KL - entropy_coef * H -> aggregate.

    `denominators`: of the whole (mini)batch when `inputs` is one piece of it (see
    `aggregate`); they must count the tokens rejection keeps, as the loss does."""
    logprobs = inputs.logprobs
    mask = inputs.loss_mask.to(logprobs.dtype)  # (B, T) 0/1
    if mask.shape != logprobs.shape:
        raise ValueError(f"loss_mask {tuple(mask.shape)} must match logprobs {tuple(logprobs.shape)}")
    behav = None if inputs.behav_logprobs is None else inputs.behav_logprobs.detach()
    old = _old_logprobs(inputs, behav, cfg)  # (B, T), no grad

    weight, keep, metrics = importance_weights(
        old,
        behav,
        mask,
        decoupled=cfg.decoupled,
        tis=cfg.tis,
        tis_cap=cfg.tis_cap,
        rejection=cfg.rejection,
        rejection_low=cfg.rejection_low,
        rejection_high=cfg.rejection_high,
    )
    mask = mask * keep  # rejected tokens leave the loss and its denominators

    advantages = inputs.advantages.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1)
    advantages = advantages.expand_as(logprobs)  # (B, T)

    clip = dict(clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip)
    tok = POLICY_LOSSES[cfg.policy_loss](logprobs, old, advantages, mask, **clip)
    per_token = weight * tok.loss  # (B, T)
    if cfg.kl_coef > 0:
        ref = _required(inputs.ref_logprobs, "ref_logprobs", "algorithm.kl_coef > 0").detach()
        per_token = per_token + cfg.kl_coef * kl_k3(logprobs, ref)
    if cfg.entropy_coef > 0:
        entropy = _required(inputs.entropy, "entropy", "algorithm.entropy_coef > 0")
        per_token = per_token - cfg.entropy_coef * entropy
    if cfg.d3s_token_on:  # D³S token level: a constant weight, the denominators unchanged (algorithms/d3s.py)
        per_token, d3s_metrics = _d3s_token_level(per_token, advantages, mask, inputs, cfg)
        metrics.update(d3s_metrics)
    loss = aggregate(per_token, mask, cfg.loss_agg, cfg.loss_agg_constant, denominators)

    with torch.no_grad():
        metrics.update(
            clip_frac_low=_masked_mean(tok.clipped_low, mask),
            clip_frac_high=_masked_mean(tok.clipped_high, mask),
            dual_clip_frac=_masked_mean(tok.dual_clipped, mask),
            ratio_mean=_masked_mean(tok.ratio, mask),
            ratio_max=_masked_max(tok.ratio, mask),
            approx_kl=_masked_mean(kl_k3(old, logprobs), mask),
        )
        if inputs.ref_logprobs is not None:
            metrics["kl"] = _masked_mean(kl_k3(logprobs, inputs.ref_logprobs), mask)
        if inputs.entropy is not None:
            metrics["entropy"] = _masked_mean(inputs.entropy, mask)
        if behav is not None:
            metrics["mismatch_kl"] = _masked_mean(kl_k3(behav, old), mask)
    return PolicyLossOutput(loss=loss, metrics=metrics)


def _d3s_token_level(per_token: Tensor, advantages: Tensor, mask: Tensor, inputs: PolicyLossInputs,
                     cfg: AlgorithmConfig) -> tuple[Tensor, dict[str, float]]:
    """D³S (arXiv 2509.22115): keep the share f(current_version) of the trained tokens with the
    highest |A|·H (`algorithms.d3s`); the whole per-token loss (surrogate, KL, entropy bonus)
    of a dropped token is weighted 0, of a kept one 1 or n/k (`algorithm.d3s_token_rescale`)."""
    why = "algorithm.d3s_token_keep_start or d3s_token_keep_end < 1 (D³S token selection)"
    entropy = _required(inputs.entropy, "entropy", why)
    version = _required(inputs.current_version, "current_version", why)
    fraction = d3s_token_keep_fraction(version, cfg.d3s_token_keep_start, cfg.d3s_token_keep_end,
                                       cfg.d3s_relax_steps)
    weight, metrics = d3s_token_weights(advantages, entropy, mask, fraction, cfg.d3s_token_scope,
                                        cfg.d3s_token_rescale)
    return per_token * weight, metrics


def _old_logprobs(inputs: PolicyLossInputs, behav: Optional[Tensor], cfg: AlgorithmConfig) -> Tensor:
    """pi_old of the clip ratio: given, or approximated from versions (decoupled + loglinear).

    current_version is the version of the weights before this step's update, i.e. of
    pi_prox; pi_theta is taken as the next version, current_version + 1.
    """
    if cfg.decoupled and cfg.prox_mode == "loglinear":
        why = "algorithm.prox_mode='loglinear'"
        behav = _required(behav, "behav_logprobs", why)
        versions = _required(inputs.versions, "versions", why)
        v = _required(inputs.current_version, "current_version", why)
        return loglinear_prox(behav, inputs.logprobs.detach(), versions, v_prox=v, v_current=v + 1)
    return _required(inputs.old_logprobs, "old_logprobs", "not using decoupled + prox_mode='loglinear'").detach()


def _required(value: Optional[_T], name: str, why: str) -> _T:
    if value is None:
        raise ValueError(f"PolicyLossInputs.{name} is required when {why}")
    return value


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    return float((x.detach().to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1))


def _masked_max(x: Tensor, mask: Tensor) -> float:
    x = x.detach()[mask > 0]
    return float(x.max()) if x.numel() else 0.0
