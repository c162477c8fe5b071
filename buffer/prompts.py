"""Prompt items and the uniform walk over a dataset split.

`PromptPool` walks the train split in a seeded, per-epoch shuffled order and remembers
its cursor, so a resumed run continues with the next prompt instead of replaying or
skipping data. The prompt samplers (`buffer.sampling`) are built on it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from buffer.types import new_uid


@dataclass(slots=True)
class PromptItem:
    """One prompt instance to roll out: a dataset row and how many samples it gets."""

    prompt_id: str
    prompt: str
    row: dict[str, Any]
    n_samples: int
    group_id: str = field(default_factory=new_uid)
    start_version: int = 0
    # Text generated from but not trained on: put before `prompt` for the engine only
    # (XRPO's in-context seeding); the responses are trained against `prompt` alone.
    context: str = ""
    # The id of a finished group these samples extend (DARS's second stage): when they are
    # done they are merged into it, and the two are trained as one group.
    extends: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PromptItem":
        return cls(**data)


def check_rows(rows: Sequence[dict[str, Any]], split: str, prompt_key: str = "prompt") -> None:
    """Fail at start-up, naming the row, rather than mid-run on a malformed example."""
    if len(rows) == 0:
        raise ValueError(f"dataset split {split!r} is empty")
    for index, row in enumerate(rows):
        value = row.get(prompt_key)
        if not isinstance(value, str) or not value:
            raise ValueError(
                f"dataset split {split!r} row {index}: field {prompt_key!r} must be a non-empty "
                f"string, got {value!r} (row keys: {sorted(row)})"
            )


class PromptPool:
    """Uniform sampling without replacement, epoch by epoch."""

    def __init__(self, rows: Sequence[dict[str, Any]], n_samples: int, seed: int = 0,
                 prompt_key: str = "prompt", id_key: str = "prompt_id") -> None:
        check_rows(rows, "train", prompt_key)
        self.rows = rows
        self.n_samples = n_samples
        self.seed = seed
        self.prompt_key = prompt_key
        self.id_key = id_key
        self.epoch = 0
        self.cursor = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, count: int, version: int = 0) -> list[PromptItem]:
        items = []
        for _ in range(count):
            if self.cursor == len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._shuffled(self.epoch)
            index = self._order[self.cursor]
            self.cursor += 1
            row = dict(self.rows[index])
            items.append(
                PromptItem(
                    prompt_id=str(row.get(self.id_key, index)),
                    prompt=row[self.prompt_key],
                    row=row,
                    n_samples=self.n_samples,
                    start_version=version,
                )
            )
        return items

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._shuffled(self.epoch)
