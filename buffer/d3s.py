"""D³S's sample level inside the asynchronous pipeline (`sampling=d3s`).

D³S, "Learning More with Less: A Dynamic Dual-Level Down-Sampling Framework for Efficient
Policy Optimization" (arXiv 2509.22115): every prompt is rolled out `rollout.n_samples`
times as usual (uniform prompt order), but the trainer gets only the k of each group's n
samples whose advantages have the largest variance, k shrinking the batch early in
training and growing back later. Its token level (|A|·H) lives in the loss
(`algorithms/d3s.py`); configs/sampling/d3s.yaml turns both on.

The rule (the paper gives the criterion and the shape of the schedule; the details are
ours, docs/sampling.md):

- **When.** `trim(group, version)` is called by the orchestrator on each group of a batch
  just before it goes to the trainer, at the trainer's version v. The group was admitted,
  generated and consumed whole (admission and the staleness window count all n samples);
  the trimmed samples are counted (`sampling/d3s_samples_trimmed`, ledger
  `samples_trimmed`) and never trained on. The group ledger is unchanged: a trimmed
  group is still one consumed group.
- **How many.** k = clamp(⌊f(v)·n + ½⌋, min_keep, n) (f·n to the nearest, halves up), with
  f(v) = keep_start + (keep_end − keep_start)·min(1, v/relax_steps) (`d3s_keep_fraction`).
- **Which.** The size-k subset with the largest variance of the group's advantages,
  exactly (`d3s_select`). Within a group the GRPO advantage (r − mean)/(std + ε) and Dr.GRPO's
  r − mean are increasing affine maps of the reward, so the subset is chosen on the rewards:
  the same subset for either estimator. Ties between equal rewards are broken by a seeded
  shuffle of the group (seed, group id), so which of several equal samples is kept is not
  tied to their order, and the same group always keeps the same samples.
- **Advantages after trimming.** The trainer computes them over the kept samples (as PODS,
  arXiv 2504.13818, does with its max-variance down-sampling): a kept subset of binary
  rewards is as balanced as the group allows, so its baseline sits near its middle.
- Groups from tree rollouts (`rollout.workflow=tree`) share prefixes between samples and
  pass untrimmed; so do groups with a failed reward (None) and groups of ≤ min_keep samples.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from buffer.prompts import PromptItem
from buffer.sampling import UniformSampler
from buffer.strategies import d3s_keep_fraction, d3s_select
from buffer.types import Group


def d3s_keep_count(n: int, fraction: float, min_keep: int) -> int:
    """k = clamp(⌊fraction·n + ½⌋, min_keep, n): samples a group of n keeps."""
    return max(min(n, min_keep), min(n, math.floor(fraction * n + 0.5 + 1e-9)))


def d3s_trim_indices(rewards: Sequence[float], k: int, tie_seed: int | None = None) -> list[int]:
    """Indices (ascending) of the k samples to keep: the max-variance subset of `rewards`
    (`d3s_select`). With `tie_seed`, candidates are visited in a permutation drawn from it,
    so equal rewards are kept by that draw instead of by their position."""
    n = len(rewards)
    order = list(range(n))
    if tie_seed is not None:
        order = np.random.default_rng(tie_seed).permutation(n).tolist()
    picked = d3s_select([float(rewards[i]) for i in order], k)
    return sorted(order[j] for j in picked)


class D3sSampler:
    """Uniform prompts; each group trimmed to its max-variance subset before training."""

    def __init__(self, rows: Sequence[dict[str, Any]], n_samples: int, seed: int = 0, prompt_key: str = "prompt",
                 keep_start: float = 0.5, keep_end: float = 1.0, relax_steps: int = 200, min_keep: int = 2) -> None:
        for name, value in (("keep_start", keep_start), ("keep_end", keep_end)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"sampling.kwargs.{name}={value!r} must be in (0, 1]: the share of each group's "
                                 "samples trained on (1.0: all)")
        if relax_steps < 1:
            raise ValueError(f"sampling.kwargs.relax_steps={relax_steps!r} must be >= 1 (trainer versions over which "
                             "the kept share goes from keep_start to keep_end)")
        if min_keep < 2:
            raise ValueError(f"sampling.kwargs.min_keep={min_keep!r} must be >= 2: a group of one sample has no "
                             "variance and no group-relative advantage")
        self.uniform = UniformSampler(rows, n_samples, seed, prompt_key)
        self.seed = seed
        self.keep_start, self.keep_end, self.relax_steps, self.min_keep = keep_start, keep_end, relax_steps, min_keep
        self.counts = {"groups_trimmed": 0, "samples_trimmed": 0, "samples_kept": 0, "groups_untrimmed": 0}
        self.last_fraction = keep_start
        self.var_gain_sum = 0.0  # Σ over trimmed groups of Var(kept rewards) − Var(all rewards)

    def next(self, count: int, version: int) -> list[PromptItem]:
        return self.uniform.next(count, version)

    def observe(self, groups: list[Group]) -> list[Group]:
        return self.uniform.observe(groups)

    def keep_fraction(self, version: int) -> float:
        return d3s_keep_fraction(version, self.relax_steps, self.keep_start, self.keep_end)

    def trim(self, group: Group, version: int) -> Group:
        """The group with only its max-variance k samples (a new Group; `group` is unchanged)."""
        self.last_fraction = fraction = self.keep_fraction(version)
        n = group.num_samples
        rewards = group.rewards
        k = d3s_keep_count(n, fraction, self.min_keep)
        if k >= n or group.tree_parents or any(r is None for r in rewards):
            self.counts["groups_untrimmed"] += 1
            self.counts["samples_kept"] += n
            return group
        keep = d3s_trim_indices(rewards, k, self._tie_seed(group.group_id))
        self.counts["groups_trimmed"] += 1
        self.counts["samples_trimmed"] += n - k
        self.counts["samples_kept"] += k
        self.var_gain_sum += float(np.var([rewards[i] for i in keep]) - np.var(rewards))
        return replace(group, trajectories=[group.trajectories[i] for i in keep])

    def _tie_seed(self, group_id: str) -> int:
        digest = hashlib.sha256(f"{self.seed}:{group_id}".encode()).digest()
        return int.from_bytes(digest[:8], "little")

    def state_dict(self) -> dict[str, Any]:
        return {"uniform": self.uniform.state_dict(), "counts": dict(self.counts), "last_fraction": self.last_fraction,
                "var_gain_sum": self.var_gain_sum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.uniform.load_state_dict(state["uniform"])
        self.counts = dict(state["counts"])
        self.last_fraction, self.var_gain_sum = state["last_fraction"], state["var_gain_sum"]

    def metrics(self) -> dict[str, float]:
        seen = self.counts["samples_trimmed"] + self.counts["samples_kept"]
        return {**self.uniform.metrics(), **{f"sampling/d3s_{k}": float(v) for k, v in self.counts.items()},
                "sampling/d3s_keep_fraction": self.last_fraction,
                "sampling/d3s_trimmed_share": self.counts["samples_trimmed"] / max(seen, 1),
                "sampling/d3s_reward_var_gain": self.var_gain_sum / max(self.counts["groups_trimmed"], 1)}
