"""DARS's second stage inside the asynchronous pipeline (`sampling.name=dars`).

Every prompt first gets `rollout.n_samples` rollouts. When its group comes back with
accuracy a < 0.5 (hard), the sampler asks for ΔN more (`buffer.strategies.dars_extra_samples`:
the equal-treatment or hardness-weighted schedule, with its cap) and holds the group:
the scheduler keeps it out of the buffer, waiting for its extension (ledger state
`extending`). The extension is one more prompt item (`extends` = the group's id), admitted
like any other (its samples count against the staleness window), generated on the newest
weights; when it is done it is merged into the group, which is then trained as one group
of N + ΔN responses. The group's start version stays the first stage's, so no token of
either stage is trained older than η (with `buffer.stragglers=wait` the trainer waits for
an extension due now; with `proceed` the first stage's tokens that grew too old become
context). A group is extended once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from buffer.prompts import PromptItem
from buffer.sampling import UniformSampler
from buffer.strategies import DarsSchedule
from buffer.types import Group


class DarsSampler:
    def __init__(self, rows: Sequence[dict[str, Any]], n_samples: int, seed: int = 0, prompt_key: str = "prompt",
                 schedule: str = "equal", advantage: str = "std", cap: int | None = None,
                 success_threshold: float = 1.0) -> None:
        self.uniform = UniformSampler(rows, n_samples, seed, prompt_key)
        self.schedule = DarsSchedule(schedule, advantage, cap)
        self.schedule.extra(0.0, n_samples)  # checks schedule and advantage now, not mid-run
        self.success_threshold = success_threshold
        self.pending: deque[PromptItem] = deque()  # extension items not handed out yet
        self.held: set[str] = set()  # groups waiting for their extension
        self.counts = {"extended_groups": 0, "extra_samples": 0, "merged_groups": 0}

    def next(self, count: int, version: int) -> list[PromptItem]:
        return self.uniform.next(count, version)

    def urgent(self, version: int) -> list[PromptItem]:
        """The extensions asked for: they start at once, whatever the room for new prompts
        (their groups were admitted already and wait for them; their samples still count
        against the staleness window, delaying new prompts instead)."""
        items = list(self.pending)
        self.pending.clear()
        for item in items:
            item.start_version = version
        return items

    def observe(self, groups: list[Group]) -> list[Group]:
        kept = []
        for group in self.uniform.observe(groups):
            if group.group_id in self.held:  # back with its extension merged in
                self.held.discard(group.group_id)
                self.counts["merged_groups"] += 1
                kept.append(group)
                continue
            n = group.num_samples
            accuracy = sum(r is not None and r >= self.success_threshold for r in group.rewards) / n
            extra = self.schedule.extra(accuracy, n)
            if extra <= 0:
                kept.append(group)
                continue
            self.held.add(group.group_id)
            self.pending.append(PromptItem(prompt_id=group.prompt_id, prompt=group.prompt_text, row=group.row,
                                           n_samples=extra, extends=group.group_id))
            self.counts["extended_groups"] += 1
            self.counts["extra_samples"] += extra
        return kept

    def holding(self) -> set[str]:
        """Ids of observed groups this sampler holds for their extension."""
        return set(self.held)

    def state_dict(self) -> dict[str, Any]:
        return {"uniform": self.uniform.state_dict(), "pending": [i.to_dict() for i in self.pending],
                "held": sorted(self.held), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.uniform.load_state_dict(state["uniform"])
        self.pending = deque(PromptItem.from_dict(i) for i in state["pending"])
        self.held = set(state["held"])
        self.counts = dict(state["counts"])

    def metrics(self) -> dict[str, float]:
        observed = max(self.uniform.observed, 1)
        return {**self.uniform.metrics(), **{f"sampling/{k}": float(v) for k, v in self.counts.items()},
                "sampling/extended_share": self.counts["extended_groups"] / observed,
                "sampling/waiting_for_extension": float(len(self.held))}
