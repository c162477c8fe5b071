"""Per-prompt statistics that the adaptive prompt samplers share (`buffer.strategies`).

For each prompt id, `PromptStats` keeps the number of scored responses, how many of them
succeeded, a Beta posterior over the success probability, the running reward mean and std
(Welford), the last policy version it was seen at, and the current run of groups without a
success. Alongside, it keeps a bounded store of solved exemplars for XRPO's in-context seeding.

Exemplars are `(prompt, answer)` pairs: a `Group` carries token ids, not decoded text, so
the sampler cannot see the model's own solution. It keeps the prompt and the dataset row's
reference answer (`row["answer"]`) of prompts that the policy solved at least once without
help. Everything is plain JSON-ready data, so a resumed run continues exactly.

The Student-t quantile (`t_quantile`) that XRPO's confidence intervals need is here too:
a few lines of special functions instead of a scipy dependency.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from statistics import NormalDist
from typing import Any

import numpy as np

from buffer.types import Group

SEEDED_KEY = "_grove_seeded"  # set in an item's row copy when XRPO prepended exemplars to it


def is_seeded(group: Group) -> bool:
    """Whether the group was generated with in-context exemplars, so its rewards measure a
    different distribution from the prompt's own."""
    return bool(group.row.get(SEEDED_KEY))


def shrink(alpha: float, beta: float, gamma: float, alpha0: float, beta0: float) -> tuple[float, float]:
    """Decay a Beta posterior towards its prior: (α, β) ← γ(α, β) + (1 − γ)(α₀, β₀)."""
    return gamma * alpha + (1.0 - gamma) * alpha0, gamma * beta + (1.0 - gamma) * beta0


@dataclass
class PromptRecord:
    """What is known about one prompt. `attempts` counts scored responses (a failed reward
    function gives None and is skipped); `zero_streak` counts the latest groups in a row
    with no success."""

    alpha: float
    beta: float
    attempts: int = 0
    successes: int = 0
    mean: float = 0.0  # Welford: running mean of the rewards
    m2: float = 0.0  # Welford: sum of squared deviations from the mean
    groups: int = 0
    last_version: int = -1
    zero_streak: int = 0

    @property
    def std(self) -> float:
        """Unbiased sample std of the rewards, s = √(M2 / (n − 1)); 0 below two rewards."""
        return math.sqrt(self.m2 / (self.attempts - 1)) if self.attempts > 1 else 0.0

    @property
    def pass_rate(self) -> float:
        return self.successes / self.attempts if self.attempts else 0.0

    @property
    def posterior_mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)


def welford(count: int, mean: float, m2: float, x: float) -> tuple[int, float, float]:
    """One Welford step: n' = n + 1, μ' = μ + (x − μ)/n', M2' = M2 + (x − μ)(x − μ')."""
    count += 1
    delta = x - mean
    mean += delta / count
    return count, mean, m2 + delta * (x - mean)


class PromptStats:
    """Per-prompt counts, Beta posterior, reward moments and the solved-exemplar store.

    The posterior starts at Beta(α₀, β₀); a group with k successes out of G scored responses
    adds α += k, β += G − k. Two optional decays towards the prior keep it tracking a moving
    policy (VADE's two-scale prior decay; 1.0 turns either off):
    - `decay_version` γ_v, per trainer version since the prompt was last seen: applied with
      γ = γ_v^(v − v_last), before use (`posterior`) and before each update;
    - `decay_update` γ_u, per observed group: the old evidence is shrunk once more by γ_u
      before the new counts are added, so it never outweighs about G/(1 − γ_u) responses.
    """

    def __init__(self, alpha0: float = 1.0, beta0: float = 1.0, success_threshold: float = 1.0,
                 max_exemplars: int = 256, decay_update: float = 1.0, decay_version: float = 1.0,
                 calibration_bins: int = 10) -> None:
        if alpha0 <= 0 or beta0 <= 0:
            raise ValueError(f"the Beta prior needs alpha0, beta0 > 0, got {alpha0}, {beta0}")
        for name, value in (("decay_update", decay_update), ("decay_version", decay_version)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.alpha0, self.beta0 = float(alpha0), float(beta0)
        self.success_threshold = success_threshold
        self.max_exemplars = max_exemplars
        self.decay_update, self.decay_version = decay_update, decay_version
        self.records: dict[str, PromptRecord] = {}
        self.exemplars: list[list[str]] = []  # [prompt_id, prompt, answer], oldest first
        # per bin of predicted p: [groups, Σ predicted, Σ observed pass rate]
        self.calibration_bins: list[list[float]] = [[0, 0.0, 0.0] for _ in range(calibration_bins)]

    def get(self, prompt_id: str) -> PromptRecord | None:
        return self.records.get(prompt_id)

    def posterior(self, prompt_id: str, version: int | None = None) -> tuple[float, float]:
        """(α, β) to use now: the prior for an unseen prompt; with `version`, decayed by
        γ_v^(version − last_version). Does not change the record."""
        rec = self.records.get(prompt_id)
        if rec is None:
            return self.alpha0, self.beta0
        gap = 0 if version is None else version - rec.last_version
        if gap <= 0 or self.decay_version == 1.0:
            return rec.alpha, rec.beta
        return shrink(rec.alpha, rec.beta, self.decay_version ** gap, self.alpha0, self.beta0)

    def update(self, group: Group, version: int) -> PromptRecord:
        """Fold in one scored group generated at `version` (groups of different versions may
        arrive in any order: an older one is not decayed further)."""
        rewards = [r for r in group.rewards if r is not None]
        k = sum(r >= self.success_threshold for r in rewards)
        rec = self.records.get(group.prompt_id)
        if rec is None:
            rec = self.records[group.prompt_id] = PromptRecord(self.alpha0, self.beta0)
        rec.alpha, rec.beta = self.posterior(group.prompt_id, version)
        if rewards:
            self._calibrate(rec.posterior_mean, k / len(rewards))
        if rec.groups:
            rec.alpha, rec.beta = shrink(rec.alpha, rec.beta, self.decay_update, self.alpha0, self.beta0)
        rec.alpha += k
        rec.beta += len(rewards) - k
        for r in rewards:
            rec.attempts, rec.mean, rec.m2 = welford(rec.attempts, rec.mean, rec.m2, float(r))
        rec.successes += k
        rec.groups += 1
        rec.last_version = max(rec.last_version, version)
        if rewards:
            rec.zero_streak = 0 if k else rec.zero_streak + 1
        answer = group.row.get("answer")
        prompt = group.prompt_text or group.row.get("prompt")
        if k and answer is not None and prompt:
            self.add_exemplar(group.prompt_id, str(prompt), str(answer))
        return rec

    # -- solved exemplars ------------------------------------------------------------------
    def add_exemplar(self, prompt_id: str, prompt: str, answer: str) -> None:
        """Keep the newest `max_exemplars` solved prompts, one entry per prompt id."""
        self.exemplars = [e for e in self.exemplars if e[0] != prompt_id]
        self.exemplars.append([prompt_id, prompt, answer])
        if len(self.exemplars) > self.max_exemplars:
            del self.exemplars[:len(self.exemplars) - self.max_exemplars]

    def exemplars_for(self, prompt_id: str, k: int, rng: np.random.Generator) -> list[tuple[str, str]]:
        """Up to `k` distinct solved exemplars, never the prompt itself (that would hand it
        its own answer), drawn uniformly with the sampler's generator."""
        pool = [e for e in self.exemplars if e[0] != prompt_id]
        if not pool or k <= 0:
            return []
        picks = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
        return [(pool[i][1], pool[i][2]) for i in sorted(int(j) for j in picks)]

    # -- summaries -------------------------------------------------------------------------
    def pass_rate_histogram(self, bins: int = 10) -> list[int]:
        """Prompts per bin of observed pass rate successes/attempts over [0, 1] (the last bin
        holds 1.0); unseen prompts are not counted."""
        counts = [0] * bins
        for rec in self.records.values():
            if rec.attempts:
                counts[min(int(rec.pass_rate * bins), bins - 1)] += 1
        return counts

    def _calibrate(self, predicted: float, observed: float) -> None:
        bins = len(self.calibration_bins)
        if bins:
            cell = self.calibration_bins[min(int(predicted * bins), bins - 1)]
            cell[0] += 1
            cell[1] += predicted
            cell[2] += observed

    def calibration(self) -> list[dict[str, float]]:
        """Per bin of the posterior mean predicted just before a group arrived: how many
        groups, the mean prediction and the mean observed pass rate of those groups."""
        bins = len(self.calibration_bins)
        out = []
        for i, (n, pred, obs) in enumerate(self.calibration_bins):
            out.append({"lo": i / bins, "hi": (i + 1) / bins, "groups": float(n),
                        "predicted": pred / n if n else math.nan, "observed": obs / n if n else math.nan})
        return out

    def calibration_error(self) -> float:
        """Expected calibration error, Σ_b (n_b/N)·|pred_b − obs_b|; 0 before any group."""
        total = sum(c[0] for c in self.calibration_bins)
        return sum(abs(c[1] - c[2]) for c in self.calibration_bins) / total if total else 0.0

    def metrics(self, prefix: str = "sampling/") -> dict[str, float]:
        seen = [r for r in self.records.values() if r.attempts]
        n = max(len(seen), 1)
        return {f"{prefix}prompts_seen": float(len(seen)),
                f"{prefix}prompts_never_solved_frac": sum(r.successes == 0 for r in seen) / n,
                f"{prefix}prompts_always_solved_frac": sum(r.successes == r.attempts for r in seen) / n,
                f"{prefix}exemplars": float(len(self.exemplars)),
                f"{prefix}calibration_error": self.calibration_error()}

    def state_dict(self) -> dict[str, Any]:
        return {"records": {pid: asdict(rec) for pid, rec in self.records.items()},
                "exemplars": [list(e) for e in self.exemplars],
                "calibration_bins": [list(c) for c in self.calibration_bins]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in fields(PromptRecord)}
        self.records = {pid: PromptRecord(**{k: v for k, v in rec.items() if k in names})
                        for pid, rec in state["records"].items()}
        self.exemplars = [list(e) for e in state["exemplars"]]
        self.calibration_bins = [list(c) for c in state["calibration_bins"]]


# -- Student-t quantile (XRPO's confidence intervals), without scipy ---------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """Student-t CDF: F(x) = 1 − ½·I_{ν/(ν+x²)}(ν/2, ½) for x ≥ 0, symmetric below."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x >= 0 else tail


def _t_pdf(x: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """t_{p,ν}: the x with F(x) = p. Exact for ν = 1, 2; otherwise Newton's method on the CDF
    from the Cornish–Fisher start z + (z³ + z)/(4ν), kept inside a bisection bracket."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    x = z + (z ** 3 + z) / (4 * df)
    lo, hi = 0.0, max(2.0 * x, 1.0)
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(100):
        f = t_cdf(x, df) - p
        lo, hi = (x, hi) if f < 0 else (lo, x)
        step = f / _t_pdf(x, df)
        nxt = x - step
        x = nxt if lo < nxt < hi else 0.5 * (lo + hi)
        if abs(step) < 1e-13 * max(1.0, abs(x)) or hi - lo < 1e-14:
            break
    return x


def ci_half_width(n: float, std: float, alpha: float = 0.05) -> float:
    """h(n) = t_{1−α/2, n−1}·s/√n: half-width of the two-sided confidence interval of a mean
    after n samples with sample std s; infinite below two samples."""
    if n < 2:
        return math.inf
    return t_quantile(1.0 - alpha / 2.0, n - 1) * std / math.sqrt(n)
