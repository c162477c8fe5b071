"""Difficulty-adaptive prompt samplers, and the pure schedules the pipeline will build on.

- `VadeSampler` (`sampling.name=vade`): Thompson sampling over per-prompt Beta posteriors,
  picking the prompts whose drawn success probability p̃ has the largest p̃(1 − p̃).
- `XrpoSampler` (`sampling.name=xrpo`): n_base rollouts per prompt, then extra rollouts
  by confidence-interval priority, and in-context seeding of prompts that keep failing.
- `dars_extra_samples` / `DarsSchedule`: DARS's second-stage rollout counts.
- `d3s_select` / `d3s_keep_fraction`: D³S's sample-level down-selection and its schedule.

Both samplers follow `buffer.sampling.PromptSampler`; their whole state is plain JSON data.
docs/sampling.md gives every formula and coefficient, and the rules chosen where a paper's
code was not available.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from buffer.prompt_stats import SEEDED_KEY, PromptRecord, PromptStats, ci_half_width, is_seeded, welford
from buffer.prompts import PromptItem, PromptPool, check_rows
from buffer.types import Group, new_uid

# -- DARS (yangzhch6/DARS; ALGORITHMS.md §6) ---------------------------------------------------
DARS_CAPS = {"equal": 32, "hardness": 64}  # n_max: most rollouts a prompt gets in all


def dars_extra_samples(accuracy: float, n: int, schedule: str = "equal", advantage: str = "std",
                       cap: int | None = None) -> int:
    """ΔN, the second-stage rollouts for a prompt with accuracy a after N first-stage ones, so
    that hard prompts get as much cumulative advantage as a medium one.

    a ≥ 0.5 → 0; a = 0 is taken as 0.5/N. With S(a) = 2√(a(1−a)), A_peak = N (advantage="std")
    or S(a) = 2a(1−a), A_peak = N/2 (advantage="mean"):
    equal-treatment ΔN = ⌈(A_peak − N·S)/S⌉; hardness-weighted ΔN = ⌈(2(1−a)·A_peak − N·S)/S⌉;
    then N + ΔN ≤ cap (n_max: 32 equal, 64 hardness by default)."""
    if schedule not in DARS_CAPS:
        raise ValueError(f"DARS schedule must be one of {sorted(DARS_CAPS)}, got {schedule!r}")
    if advantage not in ("std", "mean"):
        raise ValueError(f"DARS advantage must be 'std' or 'mean', got {advantage!r}")
    if not 0.0 <= accuracy <= 1.0 or n < 1:
        raise ValueError(f"DARS needs 0 <= accuracy <= 1 and n >= 1, got {accuracy}, {n}")
    if accuracy >= 0.5:
        return 0
    a = accuracy if accuracy > 0 else 0.5 / n
    if advantage == "mean":
        s, peak = 2 * a * (1 - a), 0.5 * n
    else:
        s, peak = 2 * math.sqrt(a * (1 - a)), float(n)
    target = peak if schedule == "equal" else 2 * (1 - a) * peak
    extra = max(0, math.ceil((target - n * s) / s - 1e-9))  # tolerance: exact cases stay exact
    return max(0, min(extra, (DARS_CAPS[schedule] if cap is None else cap) - n))


@dataclass(frozen=True)
class DarsSchedule:
    """A configured DARS schedule (the second-stage extension itself is not built yet)."""

    schedule: str = "equal"
    advantage: str = "std"
    cap: int | None = None

    def extra(self, accuracy: float, n: int) -> int:
        return dars_extra_samples(accuracy, n, self.schedule, self.advantage, self.cap)


# -- D³S sample level (arXiv 2509.22115) -------------------------------------------------------
def d3s_select(advantages: Sequence[float], k: int) -> list[int]:
    """Indices (ascending) of the size-k subset of a group's advantages with the largest
    variance, exactly, in O(n log n).

    Why a prefix + suffix of the sorted values suffices: fix the other k − 1 members R; the
    subset's variance is (1/k²)·Σ_{i<j}(x_i − x_j)², which as a function of the remaining
    member z is the convex quadratic Σ_{r∈R}(z − r)². If the excluded values are not one
    contiguous block of the sorted order, some member x lies between excluded y₁ < x < y₂,
    and by convexity swapping x for y₁ or y₂ does not lower the variance. Repeating makes the
    excluded block contiguous: the best subset is the i smallest plus the k − i largest for
    some i, and all k + 1 of them are checked (ties: the smallest i)."""
    n = len(advantages)
    if k >= n:
        return list(range(n))
    if k <= 0:
        return []
    order = sorted(range(n), key=lambda i: (advantages[i], i))
    center = sum(advantages) / n  # centred sums keep the variance free of cancellation
    xs = [advantages[i] - center for i in order]
    s1, s2 = [0.0], [0.0]
    for x in xs:
        s1.append(s1[-1] + x)
        s2.append(s2[-1] + x * x)
    best_i, best_var = -1, 0.0
    for i in range(k + 1):
        j = n - (k - i)  # the suffix starts here
        t1, t2 = s1[i] + s1[n] - s1[j], s2[i] + s2[n] - s2[j]
        var = t2 / k - (t1 / k) ** 2
        if best_i < 0 or var > best_var + 1e-12 * max(1.0, best_var):
            best_i, best_var = i, var
    return sorted(order[:best_i] + order[n - (k - best_i):])


def d3s_keep_fraction(step: int, total_steps: int, start: float = 0.5, end: float = 1.0) -> float:
    """Fraction of each group's rollouts to keep at `step`: aggressive early, relaxed later,
    linearly, f = start + (end − start)·min(1, step/total_steps)."""
    progress = min(1.0, max(0.0, step / total_steps)) if total_steps > 0 else 1.0
    return start + (end - start) * progress


def _prompt_ids(rows: Sequence[dict[str, Any]], id_key: str = "prompt_id") -> list[str]:
    """The ids `PromptPool` gives the rows: their `prompt_id`, else their index."""
    return [str(row.get(id_key, i)) for i, row in enumerate(rows)]


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """PCG64's state with its 128-bit integers as strings, so any JSON writer keeps them."""
    s = rng.bit_generator.state
    return {"bit_generator": s["bit_generator"], "state": str(s["state"]["state"]), "inc": str(s["state"]["inc"]),
            "has_uint32": s["has_uint32"], "uinteger": s["uinteger"]}


def _set_rng_state(rng: np.random.Generator, s: dict[str, Any]) -> None:
    inner = {"state": int(s["state"]), "inc": int(s["inc"])}
    rng.bit_generator.state = {"bit_generator": s["bit_generator"], "state": inner,
                               "has_uint32": s["has_uint32"], "uinteger": s["uinteger"]}


# -- VADE (arXiv 2511.18902) -----------------------------------------------------------------
class VadeSampler:
    """VADE: prompts whose outcome is most uncertain teach the most, since a group whose
    responses all score the same has zero advantage. For each candidate it draws
    p̃ ~ Beta(α, β) (Thompson sampling; an unseen prompt uses the prior) and starts the
    `count` with the largest information gain p̃(1 − p̃). Candidates are all prompts when there
    are at most `pool_size`, otherwise a fresh uniform subset of `pool_size` each call.
    Prompts started within the last `inflight_versions` versions and not yet observed go last,
    so one uncertain prompt is not started many times over before its result is in (None: off).
    Posteriors decay towards the prior on two scales (`PromptStats`): `decay_version` per
    trainer version since the prompt was seen, `decay_update` per observed group."""

    def __init__(self, rows: Sequence[dict[str, Any]], n_samples: int, seed: int = 0,
                 prompt_key: str = "prompt", alpha0: float = 1.0, beta0: float = 1.0,
                 decay_update: float = 0.9, decay_version: float = 0.99, pool_size: int = 1024,
                 inflight_versions: int | None = 4, success_threshold: float = 1.0) -> None:
        check_rows(rows, "train", prompt_key)
        if pool_size < 1:
            raise ValueError(f"vade needs pool_size >= 1, got {pool_size}")
        self.rows, self.n_samples, self.prompt_key = rows, n_samples, prompt_key
        self.ids = _prompt_ids(rows)
        self.pool_size, self.inflight_versions = pool_size, inflight_versions
        self.stats = PromptStats(alpha0, beta0, success_threshold, max_exemplars=0,
                                 decay_update=decay_update, decay_version=decay_version)
        self.rng = np.random.default_rng(seed)
        self.inflight: dict[str, int] = {}  # prompt id -> version it was last started at
        self.started = self.observed = self.zero_variance = 0
        self.last = {"draw": 0.0, "gain": 0.0, "posterior_mean": 0.0}

    def next(self, count: int, version: int) -> list[PromptItem]:
        if count <= 0:
            return []
        if self.inflight_versions is None:
            self.inflight.clear()
        else:
            self.inflight = {p: v for p, v in self.inflight.items() if version - v <= self.inflight_versions}
        n = len(self.rows)
        cands = np.arange(n) if n <= self.pool_size else self.rng.choice(n, size=self.pool_size, replace=False)
        post = np.array([self.stats.posterior(self.ids[i], version) for i in cands])
        draw = self.rng.beta(post[:, 0], post[:, 1])
        gain = draw * (1.0 - draw)
        busy = np.array([self.ids[i] in self.inflight for i in cands])
        order = np.lexsort((-gain, busy))  # not in flight first, then the largest gain
        picks = [int(order[j % len(order)]) for j in range(count)]  # wraps when count > candidates
        items = []
        for j in picks:
            index = int(cands[j])
            row = dict(self.rows[index])
            items.append(PromptItem(prompt_id=self.ids[index], prompt=row[self.prompt_key], row=row,
                                    n_samples=self.n_samples, start_version=version))
            if self.inflight_versions is not None:
                self.inflight[self.ids[index]] = version
        self.started += len(items)
        self.last = {"draw": float(draw[picks].mean()), "gain": float(gain[picks].mean()),
                     "posterior_mean": float((post[picks, 0] / post[picks].sum(axis=1)).mean())}
        return items

    def observe(self, groups: list[Group]) -> list[Group]:
        for group in groups:
            self.observed += 1
            self.inflight.pop(group.prompt_id, None)
            scored = [r for r in group.rewards if r is not None]
            self.zero_variance += len(set(scored)) <= 1
            if scored and not is_seeded(group):
                self.stats.update(group, group.start_version)
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict(), "rng": _rng_state(self.rng), "inflight": dict(self.inflight),
                "started": self.started, "observed": self.observed, "zero_variance": self.zero_variance,
                "last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])
        _set_rng_state(self.rng, state["rng"])
        self.inflight = dict(state["inflight"])
        self.started, self.observed = state["started"], state["observed"]
        self.zero_variance, self.last = state["zero_variance"], dict(state["last"])

    def metrics(self) -> dict[str, float]:
        return {**self.stats.metrics(), "sampling/groups_observed": float(self.observed),
                "sampling/items_started": float(self.started), "sampling/inflight_prompts": float(len(self.inflight)),
                "sampling/zero_variance_frac": self.zero_variance / max(self.observed, 1),
                "sampling/selected_draw": self.last["draw"], "sampling/selected_info_gain": self.last["gain"],
                "sampling/selected_posterior_mean": self.last["posterior_mean"]}


# -- XRPO (arXiv 2510.06672; ALGORITHMS.md §3) ---------------------------------------------------
def xrpo_priority(n: float, std: float, total: float, lam: float = 0.01, alpha: float = 0.05) -> float:
    """Π = Δ̂ + φ: the expected shrink of the confidence interval of the prompt's mean reward
    from one more rollout, Δ̂ = h(n) − h(n+1) with h(n) = t_{1−α/2, n−1}·s/√n, plus the
    exploration bonus φ = λ·√(log(1 + T)/n), T the rollouts observed so far. Below two
    rollouts the interval is undefined and the priority is infinite."""
    if n < 2:
        return math.inf
    return ci_half_width(n, std, alpha) - ci_half_width(n + 1, std, alpha) + lam * math.sqrt(math.log1p(total) / n)


class XrpoSampler:
    """XRPO's rollout allocator and in-context seeding, streamed for asynchronous runs.

    New prompts come from a seeded uniform walk with `n_base` rollouts each (phase 0). Every
    time `phase_prompts`·n_base rollouts have been observed, a phase runs: its `phase_budget`
    extra rollouts go, `extra_chunk` at a time, to the prompt of highest `xrpo_priority` among
    those observed in the last `window_phases` phases, each up to `max_rollouts`; n counts the
    prompt's rollouts in that window, including extras not back yet. A prompt's extras from a
    phase form one item whose `n_samples` is their number. Queued items go out before new prompts.

    Seeding: when a prompt's last `seed_after` unassisted groups had no success (no reward ≥
    `success_threshold`) and a solved exemplar of another prompt exists, the prompt is re-rolled
    with `seed_samples` rollouts and `context` = up to `seed_exemplars` "{prompt}{answer}\\n"
    lines; its row copy has `_grove_seeded: True`. Seeded groups are trained on but do not
    update the prompt's statistics (they measure the seeded distribution)."""

    def __init__(self, rows: Sequence[dict[str, Any]], n_samples: int, seed: int = 0,
                 prompt_key: str = "prompt", n_base: int | None = None, phase_prompts: int = 16,
                 phase_budget: int | None = None, extra_chunk: int = 2, max_rollouts: int | None = None,
                 window_phases: int = 2, lam: float = 0.01, alpha: float = 0.05, seed_after: int = 2,
                 seed_exemplars: int = 4, seed_samples: int | None = None, success_threshold: float = 1.0,
                 max_exemplars: int = 256) -> None:
        self.n_base = n_samples if n_base is None else n_base
        self.phase_rollouts = phase_prompts * self.n_base
        self.phase_budget = self.phase_rollouts // 2 if phase_budget is None else phase_budget
        self.max_rollouts = 4 * self.n_base if max_rollouts is None else max_rollouts
        problems = [m for ok, m in (
            (self.n_base >= 2, f"n_base >= 2 (a confidence interval needs two rollouts), got {self.n_base}"),
            (phase_prompts >= 1, f"phase_prompts >= 1, got {phase_prompts}"),
            (extra_chunk >= 1, f"extra_chunk >= 1, got {extra_chunk}"),
            (0 <= self.phase_budget < self.phase_rollouts,
             f"0 <= phase_budget < phase_prompts * n_base = {self.phase_rollouts} (else extras starve new "
             f"prompts), got {self.phase_budget}"),
            (0 < alpha < 1, f"0 < alpha < 1, got {alpha}"), (seed_after >= 1, f"seed_after >= 1, got {seed_after}"),
        ) if not ok]
        if problems:
            raise ValueError("xrpo sampler needs " + "; ".join(problems))
        self.pool = PromptPool(rows, self.n_base, seed=seed, prompt_key=prompt_key)
        self.ids = _prompt_ids(rows)
        self.index = {pid: i for i, pid in enumerate(self.ids)}
        self.prompt_key = prompt_key
        self.extra_chunk, self.window_phases, self.lam, self.alpha = extra_chunk, window_phases, lam, alpha
        self.seed_after, self.seed_exemplars = seed_after, seed_exemplars
        self.seed_samples = self.n_base if seed_samples is None else seed_samples
        self.stats = PromptStats(success_threshold=success_threshold, max_exemplars=max_exemplars)
        self.rng = np.random.default_rng(seed)
        # items to hand out before new prompts: {"index", "n", "context", "group_id"}
        self.queue: list[dict[str, Any]] = []
        # prompt id -> {"n", "mean", "m2" (rewards this window), "phase" (last observed), "pending" {gid: n}}
        self.active: dict[str, dict[str, Any]] = {}
        self.phase = 0
        self.since_phase = 0  # rollouts observed since the last phase ran
        self.total = 0  # T: rollouts observed in all
        self.counts = {"groups": 0, "extra_items": 0, "extra_rollouts": 0, "seeded_items": 0,
                       "seeded_groups": 0, "seeded_successes": 0}

    def next(self, count: int, version: int) -> list[PromptItem]:
        items = []
        while self.queue and len(items) < count:
            q = self.queue.pop(0)
            row = dict(self.pool.rows[q["index"]])
            if q["context"]:
                row[SEEDED_KEY] = True
            items.append(PromptItem(prompt_id=self.ids[q["index"]], prompt=row[self.prompt_key], row=row,
                                    n_samples=q["n"], group_id=q["group_id"], start_version=version,
                                    context=q["context"]))
        if len(items) < count:
            items += self.pool.next(count - len(items), version=version)
        return items

    def observe(self, groups: list[Group]) -> list[Group]:
        for group in groups:
            self.counts["groups"] += 1
            scored = [float(r) for r in group.rewards if r is not None]
            if is_seeded(group):
                self.counts["seeded_groups"] += 1
                self.counts["seeded_successes"] += any(r >= self.stats.success_threshold for r in scored)
                continue
            if not scored:
                continue
            rec = self.stats.update(group, group.start_version)
            self.total += len(scored)
            self.since_phase += len(scored)
            pid = group.prompt_id
            if pid in self.index:
                entry = self.active.setdefault(pid, {"n": 0, "mean": 0.0, "m2": 0.0, "phase": self.phase,
                                                     "pending": {}})
                entry["pending"].pop(group.group_id, None)
                for r in scored:
                    entry["n"], entry["mean"], entry["m2"] = welford(entry["n"], entry["mean"], entry["m2"], r)
                entry["phase"] = self.phase
                if rec.zero_streak >= self.seed_after:
                    self._seed(pid, rec)
            while self.since_phase >= self.phase_rollouts:
                self._allocate()
        return groups

    def _seed(self, prompt_id: str, rec: PromptRecord) -> None:
        exemplars = self.stats.exemplars_for(prompt_id, self.seed_exemplars, self.rng)
        if not exemplars:
            return  # nothing to show yet; retried at the prompt's next failed group
        context = "".join(f"{prompt}{answer}\n" for prompt, answer in exemplars)
        self.queue.append({"index": self.index[prompt_id], "n": self.seed_samples, "context": context,
                           "group_id": new_uid()})
        rec.zero_streak = 0
        self.counts["seeded_items"] += 1

    def priority(self, prompt_id: str, n: float | None = None) -> float:
        """`xrpo_priority` of an active prompt, with its window's n (or the given n)."""
        e = self.active[prompt_id]
        std = math.sqrt(e["m2"] / (e["n"] - 1)) if e["n"] > 1 else 0.0
        return xrpo_priority(e["n"] if n is None else n, std, self.total, self.lam, self.alpha)

    def _allocate(self) -> None:
        """One phase: retire prompts outside the window, then hand the budget out greedily."""
        self.since_phase -= self.phase_rollouts
        for pid in [p for p, e in self.active.items() if self.phase - e["phase"] >= self.window_phases]:
            del self.active[pid]
        chunk = self.extra_chunk
        virtual = {pid: e["n"] + sum(e["pending"].values()) for pid, e in self.active.items()}
        heap = [(-self.priority(pid, virtual[pid]), i, pid) for i, pid in enumerate(self.active)
                if virtual[pid] + chunk <= self.max_rollouts]
        heapq.heapify(heap)
        give: dict[str, int] = {}
        budget = self.phase_budget
        while heap and budget >= chunk:
            _, i, pid = heapq.heappop(heap)
            give[pid] = give.get(pid, 0) + chunk
            virtual[pid] += chunk
            budget -= chunk
            if virtual[pid] + chunk <= self.max_rollouts:
                heapq.heappush(heap, (-self.priority(pid, virtual[pid]), i, pid))
        for pid, extra in give.items():
            gid = new_uid()
            self.queue.append({"index": self.index[pid], "n": extra, "context": "", "group_id": gid})
            self.active[pid]["pending"][gid] = extra
            self.counts["extra_items"] += 1
            self.counts["extra_rollouts"] += extra
        self.phase += 1

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict(), "stats": self.stats.state_dict(), "rng": _rng_state(self.rng),
                "queue": [dict(q) for q in self.queue],
                "active": {p: {**e, "pending": dict(e["pending"])} for p, e in self.active.items()},
                "phase": self.phase, "since_phase": self.since_phase, "total": self.total,
                "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state["pool"])
        self.stats.load_state_dict(state["stats"])
        _set_rng_state(self.rng, state["rng"])
        self.queue = [dict(q) for q in state["queue"]]
        self.active = {p: {**e, "pending": dict(e["pending"])} for p, e in state["active"].items()}
        self.phase, self.since_phase, self.total = state["phase"], state["since_phase"], state["total"]
        self.counts = dict(state["counts"])

    def metrics(self) -> dict[str, float]:
        c = self.counts
        return {**self.stats.metrics(), "sampling/epoch": float(self.pool.epoch),
                "sampling/groups_observed": float(c["groups"]), "sampling/phases": float(self.phase),
                "sampling/extra_items": float(c["extra_items"]), "sampling/extra_rollouts": float(c["extra_rollouts"]),
                "sampling/active_prompts": float(len(self.active)), "sampling/queued_items": float(len(self.queue)),
                "sampling/seeded_items": float(c["seeded_items"]), "sampling/seeded_groups": float(c["seeded_groups"]),
                "sampling/seeded_success_rate": c["seeded_successes"] / max(c["seeded_groups"], 1)}
