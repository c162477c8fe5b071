"""Workloads for benchmarks and stress tests, as rollout workflows named by path.

    grove train rollout.workflow=scripts/workloads.py:LongTailWorkflow \
        '+rollout.workflow_kwargs={fraction: 0.15, min_tokens: 40}'

`LongTailWorkflow` gives a built-in task, whose answers are a few tokens long, the long
tail of response lengths real reasoning tasks have: a fixed share of the prompts must be
answered with at least `min_tokens` tokens (EOS is ignored until then).
"""

from __future__ import annotations

import zlib
from typing import Any

from buffer.prompts import PromptItem
from rollout.workflow import GroupWorkflow


class LongTailWorkflow(GroupWorkflow):
    def __init__(self, fraction: float = 0.0, min_tokens: int = 0) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"LongTailWorkflow: fraction must be in [0, 1], got {fraction}")
        if min_tokens < 0:
            raise ValueError(f"LongTailWorkflow: min_tokens must be >= 0, got {min_tokens}")
        self.fraction = fraction
        self.min_tokens = min_tokens

    def is_long(self, prompt_id: str) -> bool:
        """Long-tail prompts are picked by a hash of the prompt id: the same prompts are long
        in every run and every mode, and a resumed group keeps its length."""
        return zlib.crc32(prompt_id.encode()) / 2**32 < self.fraction

    def sampling_kwargs(self, item: PromptItem) -> dict[str, Any]:
        return {"min_tokens": self.min_tokens} if self.is_long(item.prompt_id) else {}
