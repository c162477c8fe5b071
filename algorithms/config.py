"""The algorithm's knobs: one dataclass, also the Hydra structured-config schema of `algorithm/`.

Defaults are exactly Grove's GRPO recipe (`algorithm=grpo`, the default): GRPO (arXiv
2402.03300) with token-mean aggregation and, as every asynchronous run needs, decoupled
PPO with token TIS. configs/algorithm/grpo.yaml therefore sets only its name, and every
other recipe there sets only what it changes. Field types stay simple (str, int, float,
bool, Optional[float]) so OmegaConf can type-check YAML overrides against them.
Names are checked against the registries themselves, so a new estimator, loss or
aggregation is accepted here as soon as it is registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from algorithms.advantages import ADVANTAGE_ESTIMATORS
from algorithms.d3s import D3S_TOKEN_SCOPES
from algorithms.losses import AGGREGATIONS, POLICY_LOSSES
from algorithms.tree import TREE_ADVANTAGES

PROX_MODES = ("recompute", "loglinear")
TIS_MODES = ("none", "token", "sequence")
REJECTION_MODES = ("none", "token", "sequence")


@dataclass
class AlgorithmConfig:
    """Advantage estimator, policy loss, aggregation and off-policy correction.

    Combinations the papers use (the recipes in configs/algorithm/ add them to the defaults):
      - GRPO: the defaults (optionally kl_coef=0.001); the paper aggregates with
        seq-mean-token-mean, the default token-mean follows DAPO and current practice.
      - Dr.GRPO (arXiv 2503.20783): advantage="mean_only", loss_agg="seq-mean-token-sum-norm".
      - DAPO (arXiv 2503.14476): clip_high=0.28, dynamic_sampling=True.
      - GSPO (arXiv 2507.18071): policy_loss="gspo", clip_low=3e-4, clip_high=4e-4,
        loss_agg="seq-mean-token-mean".
    Off-policy correction is on by default: AReaL decoupled PPO (arXiv 2505.24298,
    decoupled=True, prox_mode="recompute") with token TIS capped at 2. For synchronous
    training without it (buffer.max_staleness=0), set decoupled=False, tis="none".
    """

    name: str = "grpo"  # free-form label for logs

    # Advantages (algorithms/advantages.py).
    advantage: str = "group_norm"  # "group_norm" (GRPO) | "mean_only" (Dr.GRPO)
    adv_eps: float = 1e-6  # added to the group std
    novelty_sharpening: bool = False  # XRPO (arXiv 2510.06672) bonus for novel correct answers
    novelty_lambda: float = 1.0
    novelty_kappa: float = 0.5  # bonus <= kappa * A
    # Tree groups (rollout.workflow=tree) only, in place of `advantage`: per-segment
    # advantages (algorithms/tree.py), "treerl" | "depth" | "leaf"; treerl and depth train a
    # shared prefix once (a keep mask on its other copies), leaf trains every leaf whole.
    tree_advantage: str = "treerl"

    # Policy loss (algorithms/losses.py).
    policy_loss: str = "ppo_clip"  # "ppo_clip" | "gspo" | "gspo_token"
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    dual_clip: Optional[float] = None  # c > 1: caps the loss of A < 0 tokens at -A * c (e.g. 3.0)
    # "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" | "seq-mean-token-sum-norm"
    loss_agg: str = "token-mean"
    loss_agg_constant: Optional[float] = None  # Dr.GRPO L_const; None = the mask's T dimension
    kl_coef: float = 0.0  # k3 KL to the reference policy; 0 = no reference model needed
    entropy_coef: float = 0.0  # entropy bonus

    # Off-policy correction (ALGORITHMS.md section 2).
    decoupled: bool = True  # AReaL: w = pi_prox / pi_behav (no grad), ratio = pi_theta / pi_prox
    prox_mode: str = "recompute"  # "recompute" (trainer forward pass) | "loglinear" (version interpolation)
    tis: str = "token"  # truncated IS: "none" | "token" | "sequence"
    tis_cap: float = 2.0  # C in min(rho, C)
    rejection: str = "none"  # drop tokens/sequences whose rho leaves [low, high]: none | token | sequence
    rejection_low: float = 0.5
    rejection_high: float = 2.0

    # D³S token level (arXiv 2509.22115; algorithms/d3s.py): only the trained tokens with the
    # highest |A|·H stay in the loss, a share f(v) = start + (end - start) * min(1, v /
    # d3s_relax_steps) at trainer version v. start = end = 1.0: off. sampling=d3s sets start 0.5.
    d3s_token_keep_start: float = 1.0  # share of each response's trained tokens kept at version 0 (1.0: all)
    d3s_token_keep_end: float = 1.0  # share kept from version d3s_relax_steps on
    d3s_relax_steps: int = 200  # versions over which the share relaxes from start to end
    d3s_token_scope: str = "sequence"  # top tokens per "sequence" | per "micro_batch" (across rows)
    d3s_token_rescale: bool = True  # kept tokens weigh n/k, so each row keeps its weight in the loss

    # Sampling-side parts of a recipe (applied by the launcher, declared here so one name
    # selects the whole recipe).
    dynamic_sampling: bool = False  # DAPO: zero-variance groups never enter a batch
    max_num_gen_batches: int = 10  # DAPO: give up after this many batches' worth filtered in a row
    requires_sampler: Optional[str] = None  # a prompt sampler this recipe cannot run without

    @property
    def d3s_token_on(self) -> bool:
        """Whether D³S's token selection runs in the loss."""
        return self.d3s_token_keep_start < 1 or self.d3s_token_keep_end < 1

    @property
    def needs_reference(self) -> bool:
        """Whether the trainer must compute reference-model logprobs."""
        return self.kl_coef > 0

    @property
    def needs_behav_logprobs(self) -> bool:
        """Whether the loss reads the engine's per-token logprobs."""
        return self.decoupled or self.tis != "none" or self.rejection != "none"

    def __post_init__(self) -> None:
        _one_of("advantage", self.advantage, tuple(ADVANTAGE_ESTIMATORS))
        _one_of("tree_advantage", self.tree_advantage, tuple(TREE_ADVANTAGES))
        _one_of("policy_loss", self.policy_loss, tuple(POLICY_LOSSES))
        _one_of("loss_agg", self.loss_agg, tuple(AGGREGATIONS))
        _one_of("prox_mode", self.prox_mode, PROX_MODES)
        _one_of("tis", self.tis, TIS_MODES)
        _one_of("rejection", self.rejection, REJECTION_MODES)

        _check("adv_eps", self.adv_eps, self.adv_eps > 0, "must be > 0")
        _check("novelty_lambda", self.novelty_lambda, self.novelty_lambda >= 0, "must be >= 0")
        _check("novelty_kappa", self.novelty_kappa, self.novelty_kappa >= 0, "must be >= 0")
        _check("clip_low", self.clip_low, 0 <= self.clip_low < 1, "must be in [0, 1)")
        _check("clip_high", self.clip_high, self.clip_high >= 0, "must be >= 0")
        if self.dual_clip is not None:
            _check("dual_clip", self.dual_clip, self.dual_clip > 1, "must be > 1 or null (e.g. 3.0)")
        if self.loss_agg_constant is not None:
            ok = self.loss_agg_constant > 0
            _check("loss_agg_constant", self.loss_agg_constant, ok, "must be > 0 or null")
        _check("kl_coef", self.kl_coef, self.kl_coef >= 0, "must be >= 0")
        _check("entropy_coef", self.entropy_coef, self.entropy_coef >= 0, "must be >= 0")
        _check("tis_cap", self.tis_cap, self.tis_cap > 0, "must be > 0")
        _check("rejection_low", self.rejection_low, self.rejection_low >= 0, "must be >= 0")
        _check(
            "rejection_high",
            self.rejection_high,
            self.rejection_high > self.rejection_low,
            f"must be > algorithm.rejection_low={self.rejection_low!r}",
        )
        _check("max_num_gen_batches", self.max_num_gen_batches, self.max_num_gen_batches >= 1, "must be >= 1")
        for name in ("d3s_token_keep_start", "d3s_token_keep_end"):
            value = getattr(self, name)
            _check(name, value, 0 < value <= 1, "must be in (0, 1]: the share of trained tokens kept (1.0: all)")
        _check("d3s_relax_steps", self.d3s_relax_steps, self.d3s_relax_steps >= 1, "must be >= 1 (trainer versions)")
        _one_of("d3s_token_scope", self.d3s_token_scope, D3S_TOKEN_SCOPES)
        if self.prox_mode == "loglinear" and not self.decoupled:
            raise ValueError(
                "algorithm.prox_mode='loglinear' approximates the proximal policy of decoupled PPO; "
                "set algorithm.decoupled=true, or algorithm.prox_mode='recompute'"
            )


def _one_of(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"algorithm.{field}={value!r} is not one of {list(allowed)}")


def _check(field: str, value: object, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"algorithm.{field}={value!r} {rule}")
