"""The contexts a workflow runs in (`EpisodeContext`, rollout/workflow.py): `Episode` for
one prompt item's group while training, `EvalEpisode` for one held-out row. Both sample
through their rollout worker's `_sample`, so versions, interrupts and prefix-cache counts
are the worker's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from buffer.prompts import PromptItem
from buffer.types import Group, Trajectory

if TYPE_CHECKING:
    from rollout.worker import RolloutWorker


class Episode:
    """One prompt item's run through the workflow: the `EpisodeContext` the worker gives
    it (rollout/workflow.py). It carries what the episode was admitted with: the weights
    it may generate on (`not_before`) and the APRIL interrupt count it started under."""

    def __init__(self, worker: "RolloutWorker", item: PromptItem, partial: Group | None, not_before: int) -> None:
        self.worker = worker
        self.tokenizer = worker.tokenizer
        self.max_tokens = worker.cfg.max_tokens
        self.item = item
        self.partial = partial
        self.not_before = not_before
        self.interrupts = worker._interrupts  # an APRIL interrupt after this hands the group back
        self.scored: bool | None = None  # the keep flag of `ascore`, once called
        self.prompt_tokens = 0  # sent to the engine by this episode's requests ...
        self.cached_prompt_tokens = 0  # ... and found in its prefix cache

    @property
    def version(self) -> int:
        """The policy version every request sent from now on runs on."""
        return self.worker.version

    def new_group(self, item: PromptItem) -> Group:
        group = Group(group_id=item.group_id, prompt_id=item.prompt_id, prompt_text=item.prompt,
                      row=item.row, start_version=item.start_version)
        prompt_ids = self.worker.encode_prompt(item.prompt)
        context_ids = self._context_ids(item.context, prompt_ids) if item.context else []
        group.trajectories = [Trajectory(prompt_id=item.prompt_id, group_id=item.group_id, prompt_ids=list(prompt_ids),
                                         context_ids=list(context_ids)) for _ in range(item.n_samples)]
        return group

    def _context_ids(self, context: str, prompt_ids: list[int]) -> list[int]:
        """The tokens of `context` as they precede the prompt's own tokens in context + prompt."""
        full = self.tokenizer.encode(context + self.item.prompt)
        if len(full) > len(prompt_ids) and full[len(full) - len(prompt_ids):] == prompt_ids:
            return full[:len(full) - len(prompt_ids)]
        return self.tokenizer.encode(context, add_special_tokens=False)

    async def agenerate(self, traj: Trajectory, max_tokens: int | None = None, *, min_tokens: int = 0,
                        temperature: float | None = None, top_logprobs: int = 0,
                        tops: list | None = None, stop: tuple[str, ...] = ()) -> Trajectory:
        cfg = self.worker.cfg

        def seen(segment) -> None:
            self.prompt_tokens += segment.prompt_tokens
            self.cached_prompt_tokens += segment.cached_prompt_tokens
            if tops is not None:  # per new token: its position's top-k (empty if the engine gave none)
                tops.extend(segment.top if segment.top is not None else [[] for _ in segment.token_ids])

        return await self.worker._sample(traj, max_tokens or cfg.max_tokens,
                                         cfg.temperature if temperature is None else temperature,
                                         min_tokens, self.interrupts, self.not_before, top_logprobs, seen, stop)

    async def ascore(self, group: Group) -> bool:
        self.scored = await self.worker._score(group)
        return self.scored


class EvalEpisode:
    """The context a workflow's `aevaluate` runs a held-out row in: greedy requests of up
    to `rollout.eval_max_tokens`, never handed back by an interrupt."""

    partial = None

    def __init__(self, worker: "RolloutWorker") -> None:
        self.worker, self.tokenizer = worker, worker.tokenizer
        self.max_tokens = worker.cfg.eval_max_tokens
        self.prompt_tokens = self.cached_prompt_tokens = 0

    @property
    def version(self) -> int:
        return self.worker.version

    async def agenerate(self, traj: Trajectory, max_tokens: int | None = None, *, stop: tuple[str, ...] = (),
                        **_ignored: Any) -> Trajectory:
        return await self.worker._sample(traj, max_tokens or self.max_tokens, 0.0, stop=stop)
