"""How responses are sampled, and what the rollout worker does with requests in flight
when weights arrive (see `rollout/worker.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rollout.engine import EngineConfig

ON_UPDATE_MODES = ("wait", "interrupt", "interrupt_newest")
RENAMED_ON_UPDATE_MODES = {"mask": "interrupt_newest"}
INTERRUPT_BY = ("pause", "abort")


@dataclass
class RolloutConfig:
    """How responses are sampled. Group size is `n_samples`."""

    n_samples: int = 8
    max_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    eval_max_tokens: int = 8
    eval_workflow: bool = False  # held-out rows run through the workflow's `aevaluate` (greedy), e.g. an agent with its tools
    on_update: str = "interrupt"  # wait | interrupt | interrupt_newest (see rollout/worker.py)
    interrupt_by: str = "pause"  # pause: keep requests in the engine | abort: resubmit, re-prefill
    overprovision: float = 1.0  # APRIL: keep this many batches' worth of groups in flight (1 = off)
    num_workers: int = 1  # rollout workers, each a vLLM engine in its own actor; every one gets every version
    max_restarts: int = 3  # dead workers replaced in a run (their groups start again); past that the run stops
    chat_template: bool = False  # wrap each prompt in the tokenizer's chat template (a user turn)
    system_prompt: Optional[str] = None  # with chat_template: a system turn before it
    workflow: str = "group"  # how a prompt becomes a group: a registered name or a dotted path
    workflow_kwargs: dict = field(default_factory=dict)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"rollout.n_samples must be >= 1, got {self.n_samples}")
        if self.max_tokens < 1:
            raise ValueError(f"rollout.max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 < self.temperature:
            raise ValueError(f"rollout.temperature must be > 0 for RL sampling, got {self.temperature}")
        if self.top_p != 1.0:
            raise ValueError(
                f"rollout.top_p={self.top_p}: with top-p sampling the engine's behaviour logprobs are those of the "
                "truncated, renormalised distribution, while the trainer scores tokens under the full softmax, so "
                "every importance weight and the decoupled-PPO correction would be biased. Grove refuses the "
                "combination: set rollout.top_p=1.0 (temperature still shapes the distribution exactly)."
            )
        if self.on_update in RENAMED_ON_UPDATE_MODES:
            raise ValueError(f"rollout.on_update={self.on_update!r} was renamed: set "
                             f"rollout.on_update={RENAMED_ON_UPDATE_MODES[self.on_update]}")
        if self.on_update not in ON_UPDATE_MODES:
            raise ValueError(f"rollout.on_update={self.on_update!r} is not one of {list(ON_UPDATE_MODES)}")
        if self.interrupt_by not in INTERRUPT_BY:
            raise ValueError(f"rollout.interrupt_by={self.interrupt_by!r} is not one of {list(INTERRUPT_BY)}")
        if self.num_workers < 1:
            raise ValueError(f"rollout.num_workers must be >= 1, got {self.num_workers}")
        if self.max_restarts < 0:
            raise ValueError(f"rollout.max_restarts must be >= 0, got {self.max_restarts}")
        if self.overprovision < 1.0:
            raise ValueError(f"rollout.overprovision must be >= 1 (1 = no over-provisioning), got {self.overprovision}")
