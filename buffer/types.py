"""The data that flows from the rollout worker, through the buffer, to the trainer.

A `Trajectory` keeps, for every response token, the logprob the inference engine
sampled it with, the policy version that produced it and whether it is trained on.
Those three per-token lists are what staleness control, off-policy correction and
partial rollouts are built on, so they are recorded from the first slice on.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field, fields
from typing import Any


class FinishReason(str, enum.Enum):
    """Why generation of a response ended."""

    STOP = "stop"  # the model emitted EOS or a stop string
    LENGTH = "length"  # hit max_tokens
    ABORTED = "aborted"  # interrupted; the response is partial and may be resumed


def new_uid() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(slots=True)
class Trajectory:
    """One response to one prompt, with per-token provenance."""

    prompt_id: str  # identifies the dataset row
    group_id: str  # identifies the prompt instance this response belongs to
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    behaviour_logprobs: list[float] = field(default_factory=list)  # per response token
    versions: list[int] = field(default_factory=list)  # per response token
    loss_mask: list[int] = field(default_factory=list)  # per response token, 1 = train on it
    reward: float | None = None
    reward_info: dict[str, float] = field(default_factory=dict)
    reward_failure: str | None = None  # failure kind when the reward function failed
    finish_reason: FinishReason | None = None
    uid: str = field(default_factory=new_uid)
    # Tokens the engine generated after but the trainer never sees: the response is
    # trained against `prompt_ids` alone (in-context seeding), its behaviour logprobs
    # came from context + prompt, and the importance weight corrects for the difference.
    context_ids: list[int] = field(default_factory=list)
    # Tree rollouts: per response token, the id of the tree node (segment) it belongs to
    # along this leaf's root-to-leaf path; empty for a sample that is not part of a tree.
    node_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise if the per-token lists disagree in length: a silent misalignment
        would train on the wrong logprobs."""
        n = len(self.response_ids)
        lengths = {
            "behaviour_logprobs": len(self.behaviour_logprobs),
            "versions": len(self.versions),
            "loss_mask": len(self.loss_mask),
        }
        if self.node_ids:
            lengths["node_ids"] = len(self.node_ids)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ValueError(
                f"trajectory {self.uid}: {n} response tokens but per-token lists of lengths {bad}"
            )

    def append_tokens(self, token_ids: list[int], logprobs: list[float], version: int) -> None:
        """Add newly generated tokens, all produced by policy `version`."""
        if len(token_ids) != len(logprobs):
            raise ValueError(f"{len(token_ids)} tokens but {len(logprobs)} logprobs")
        self.response_ids.extend(token_ids)
        self.behaviour_logprobs.extend(logprobs)
        self.versions.extend([version] * len(token_ids))
        self.loss_mask.extend([1] * len(token_ids))

    def append_context_tokens(self, token_ids: list[int], version: int) -> None:
        """Add tokens the policy did not sample (an environment's observation in a
        multi-turn episode): context for what follows, never trained on, no logprob."""
        self.response_ids.extend(token_ids)
        self.behaviour_logprobs.extend([0.0] * len(token_ids))
        self.versions.extend([version] * len(token_ids))
        self.loss_mask.extend([0] * len(token_ids))
        if self.node_ids:
            self.node_ids.extend([self.node_ids[-1]] * len(token_ids))

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (checkpoints); `from_dict` rebuilds it exactly."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["finish_reason"] = self.finish_reason.value if self.finish_reason else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Trajectory":
        reason = data.get("finish_reason")
        return cls(**{**data, "finish_reason": FinishReason(reason) if reason else None})

    @property
    def oldest_version(self) -> int | None:
        return min(self.versions) if self.versions else None

    @property
    def newest_version(self) -> int | None:
        return max(self.versions) if self.versions else None


@dataclass(slots=True)
class Group:
    """The responses to one prompt instance: the unit of advantage and of consumption."""

    group_id: str
    prompt_id: str
    prompt_text: str
    row: dict[str, Any]  # the dataset row's fields, handed to rewards
    trajectories: list[Trajectory] = field(default_factory=list)
    start_version: int = 0  # trainer version when the group was admitted
    tree_parents: dict[int, int] = field(default_factory=dict)  # tree rollouts: node id -> parent (-1: root)
    stats: dict[str, float] = field(default_factory=dict)  # what its workflow measured, logged per step

    @property
    def rewards(self) -> list[float | None]:
        return [t.reward for t in self.trajectories]

    @property
    def num_samples(self) -> int:
        """Responses in the group: the unit admission and batches count in."""
        return len(self.trajectories)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "trajectories"}
        out["trajectories"] = [t.to_dict() for t in self.trajectories]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Group":
        trajs = [Trajectory.from_dict(t) for t in data["trajectories"]]
        parents = {int(k): int(v) for k, v in data.get("tree_parents", {}).items()}  # JSON keys are strings
        return cls(**{**data, "trajectories": trajs, "tree_parents": parents})

    @property
    def oldest_version(self) -> int | None:
        versions = [t.oldest_version for t in self.trajectories if t.versions]
        return min(versions) if versions else None

    @property
    def num_tokens(self) -> int:
        return sum(t.num_response_tokens for t in self.trajectories)

    @property
    def is_finished(self) -> bool:
        return bool(self.trajectories) and all(
            t.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) for t in self.trajectories
        )
