"""Prompt samplers: which prompts to roll out next, how many samples each, and which
finished groups to train on.

The orchestrator asks `next(count, version)` for prompt items whenever admission opens,
hands every finished group to `observe`, and trains only on the groups `observe` returns
(the others are filed as filtered in the ledger). A sampler's whole state is in
`state_dict`, so a resumed run continues its schedule exactly (prime-rl's `TaskSampler`
has the same shape). Select one with `sampling.name`: a registered name or a dotted path.

Writing one: subclass `UniformSampler` (or implement `PromptSampler`) and name it in
`sampling.name=pkg.module:MySampler`; `sampling.kwargs` are passed to its constructor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from buffer.plugins import load_plugin
from buffer.prompts import PromptItem, PromptPool
from buffer.types import Group


@runtime_checkable
class PromptSampler(Protocol):
    def next(self, count: int, version: int) -> list[PromptItem]:
        """`count` prompt items to start at trainer `version`, each with its `n_samples`."""

    def observe(self, groups: list[Group]) -> list[Group]:
        """Finished, scored groups; returns those to train on (the rest are filtered)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def metrics(self) -> dict[str, float]:
        """Values to log with the next step, under `sampling/`.

        A sampler that extends groups (DARS) also has `holding() -> set[str]`, the ids of
        observed groups it holds for more samples (neither trained nor filtered yet), and
        `urgent(version) -> list[PromptItem]`, their extensions, started whatever the room.
        A sampler that trains on part of each group (D³S) also has `trim(group, version) ->
        Group`: called on every group of a batch just before it goes to the trainer, it
        returns the group with the samples to train on (the others are counted, not trained)."""


@dataclass
class SamplingConfig:
    """`name`: a registered sampler (uniform | dapo_filter | vade | xrpo | dars | d3s) or a
    dotted path; `kwargs` go to its constructor."""

    name: str = "uniform"
    kwargs: dict = field(default_factory=dict)


class UniformSampler:
    """Every prompt of the train split once per epoch, in a seeded shuffled order, each
    with the same number of samples; every finished group is trained on."""

    def __init__(self, rows: Sequence[dict[str, Any]], n_samples: int, seed: int = 0,
                 prompt_key: str = "prompt") -> None:
        self.pool = PromptPool(rows, n_samples, seed=seed, prompt_key=prompt_key)
        self.observed = 0

    def next(self, count: int, version: int) -> list[PromptItem]:
        return self.pool.next(count, version=version)

    def observe(self, groups: list[Group]) -> list[Group]:
        self.observed += len(groups)
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict(), "observed": self.observed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state["pool"])
        self.observed = state["observed"]

    def metrics(self) -> dict[str, float]:
        return {"sampling/epoch": float(self.pool.epoch), "sampling/groups_observed": float(self.observed)}


class FilteredTooOftenError(RuntimeError):
    """DAPO's dynamic sampling found nothing to learn from for too long."""


class DapoFilter:
    """DAPO's dynamic sampling (arXiv 2503.14476) around any sampler: a group whose
    responses all scored the same has zero advantage and teaches nothing, so it never
    enters a batch; its slot goes to a new prompt. After `max_filtered` such groups in a
    row the run stops with a clear error instead of generating forever. It filters
    finished groups as they arrive, so it works the same in asynchronous runs."""

    def __init__(self, inner: PromptSampler, max_filtered: int) -> None:
        if max_filtered < 1:
            raise ValueError(f"DapoFilter needs max_filtered >= 1, got {max_filtered}")
        self.inner = inner
        self.max_filtered = max_filtered
        self.filtered = 0
        self.filtered_in_a_row = 0

    def next(self, count: int, version: int) -> list[PromptItem]:
        return self.inner.next(count, version)

    def observe(self, groups: list[Group]) -> list[Group]:
        kept = []
        for group in self.inner.observe(groups):
            if len(set(group.rewards)) > 1:
                kept.append(group)
                self.filtered_in_a_row = 0
                continue
            self.filtered += 1
            self.filtered_in_a_row += 1
            if self.filtered_in_a_row > self.max_filtered:
                raise FilteredTooOftenError(
                    f"dynamic sampling filtered {self.filtered_in_a_row} groups in a row (every response "
                    "in each scored the same): the task is too easy or too hard for this policy. Lower "
                    "the difficulty, raise algorithm.max_num_gen_batches, or set algorithm.dynamic_sampling=false."
                )
        return kept

    def holding(self) -> set[str]:
        holding = getattr(self.inner, "holding", None)
        return holding() if holding else set()

    def urgent(self, version: int) -> list[PromptItem]:
        urgent = getattr(self.inner, "urgent", None)
        return urgent(version) if urgent else []

    def trim(self, group: Group, version: int) -> Group:
        trim = getattr(self.inner, "trim", None)
        return trim(group, version) if trim else group

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "filtered": self.filtered,
                "filtered_in_a_row": self.filtered_in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.filtered, self.filtered_in_a_row = state["filtered"], state["filtered_in_a_row"]

    def metrics(self) -> dict[str, float]:
        return {**self.inner.metrics(), "sampling/filtered": float(self.filtered)}


# Imported here, below the classes above, so buffer.strategies may import this module.
from buffer.strategies import VadeSampler, XrpoSampler  # noqa: E402


def dars_sampler(*args: Any, **kwargs: Any) -> PromptSampler:
    """`dars`: buffer/dars.py (imported on use: it builds on UniformSampler above)."""
    from buffer.dars import DarsSampler

    return DarsSampler(*args, **kwargs)


def d3s_sampler(*args: Any, **kwargs: Any) -> PromptSampler:
    """`d3s`: buffer/d3s.py (imported on use, as dars)."""
    from buffer.d3s import D3sSampler

    return D3sSampler(*args, **kwargs)


# dapo_filter: uniform prompts, zero-variance groups filtered (`build_sampler` wraps it);
# vade, xrpo: difficulty-adaptive samplers (buffer/strategies.py, docs/sampling.md);
# dars, d3s: group extension and group trimming (buffer/dars.py, buffer/d3s.py)
SAMPLERS = {"uniform": UniformSampler, "dapo_filter": UniformSampler, "vade": VadeSampler, "xrpo": XrpoSampler,
            "dars": dars_sampler, "d3s": d3s_sampler}


def build_sampler(cfg: SamplingConfig, rows: Sequence[dict[str, Any]], n_samples: int, seed: int,
                  prompt_key: str, dynamic_sampling: bool = False, max_filtered: int = 80,
                  cwd: str | None = None) -> PromptSampler:
    """The configured sampler; with a recipe's `dynamic_sampling`, wrapped in `DapoFilter`."""
    factory = load_plugin("sampling.name", cfg.name, SAMPLERS, cwd)
    sampler = factory(rows, n_samples, seed=seed, prompt_key=prompt_key, **cfg.kwargs)
    missing = [m for m in ("next", "observe", "state_dict", "load_state_dict", "metrics")
               if not callable(getattr(sampler, m, None))]
    if missing:
        raise ValueError(f"sampling.name={cfg.name!r} built a {type(sampler).__name__} without "
                         f"{missing}: a prompt sampler needs next, observe, state_dict, load_state_dict, metrics")
    if (dynamic_sampling or cfg.name == "dapo_filter") and not isinstance(sampler, DapoFilter):
        sampler = DapoFilter(sampler, max_filtered)
    return sampler
