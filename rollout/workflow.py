"""How one prompt becomes a group: the `RolloutWorkflow` seam.

The rollout worker runs one episode per admitted prompt item:

    group = await workflow.arun_episode(ctx, item)     # a Group, or None to reject it

`ctx` is the worker's side of the contract. `ctx.agenerate(traj)` samples (or continues)
one response on the engine: it waits while a weight update is under way, survives
interrupts and pauses, and stamps every token with its sampling logprob and the policy
version that produced it. `ctx.ascore(group)` runs the configured rewards. A workflow
only decides what to generate and how the pieces form a group: n independent samples
(the built-in `group`), a tree, a multi-turn episode. A group handed back with responses
still `ABORTED` (an APRIL interrupt) is partial: the worker returns it to the scheduler,
which resumes it later through the same workflow with `ctx.partial` set.

Select one with `rollout.workflow`: a registered name or a dotted path
(`pkg.mod:MyWorkflow`, `path/file.py:MyWorkflow`); `rollout.workflow_kwargs` go to its
constructor. AReaL's `arun_episode` is the model for this interface. A workflow may also
define `metrics() -> dict[str, float]`: the worker logs them with its own counters each
step (cumulative counts, as `rollout/*`; e.g. the multi-turn workflow's `env/*`).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Protocol, runtime_checkable

from buffer.plugins import load_plugin
from buffer.prompts import PromptItem
from buffer.types import Group, Trajectory


class EpisodeContext(Protocol):
    """What the rollout worker gives a workflow for one episode."""

    tokenizer: Any
    partial: Group | None  # the group to continue, when resuming a partial one
    max_tokens: int  # rollout.max_tokens: the response budget
    version: int  # the policy version requests sent now run on (for tokens the policy did not sample)
    prompt_tokens: int  # prompt tokens this episode's requests sent to the engine ...
    cached_prompt_tokens: int  # ... and how many of them the prefix cache already held

    def new_group(self, item: PromptItem) -> Group:
        """A group of `item.n_samples` empty responses to `item`'s prompt (inside the chat
        template when `rollout.chat_template` is on)."""

    async def agenerate(self, traj: Trajectory, max_tokens: int | None = None, *, min_tokens: int = 0,
                        temperature: float | None = None, top_logprobs: int = 0,
                        tops: list | None = None, stop: tuple[str, ...] = ()) -> Trajectory:
        """Generate (or continue) `traj` until it stops, hits its budget or is interrupted.
        `max_tokens` bounds its whole response (default `rollout.max_tokens`). With
        `top_logprobs=k` and a `tops` list, each new token's position appends its k most
        likely (token, logprob) pairs to `tops`. `stop` strings end it too (kept in the
        response)."""

    async def ascore(self, group: Group) -> bool:
        """Score every response; False when the reward failure policy drops the group."""


@runtime_checkable
class RolloutWorkflow(Protocol):
    async def arun_episode(self, ctx: EpisodeContext, item: PromptItem) -> Group | None: ...


class GroupWorkflow:
    """`group` (the default): n independent samples of one prompt, scored together."""

    def sampling_kwargs(self, item: PromptItem) -> dict[str, Any]:
        """Extra `ctx.agenerate` arguments for this item's responses (none here)."""
        return {}

    async def arun_episode(self, ctx: EpisodeContext, item: PromptItem) -> Group | None:
        group = ctx.partial or ctx.new_group(item)
        kwargs = self.sampling_kwargs(item)
        group.trajectories = list(await asyncio.gather(*(ctx.agenerate(t, **kwargs) for t in group.trajectories)))
        if not group.is_finished:
            return group  # interrupted: handed back partial, resumed later
        return group if await ctx.ascore(group) else None


def tree_workflow(**kwargs: Any) -> RolloutWorkflow:
    """`tree`: rollout/tree.py (imported on use: it builds on GroupWorkflow)."""
    from rollout.tree import TreeWorkflow

    return TreeWorkflow(**kwargs)


def multiturn_workflow(**kwargs: Any) -> RolloutWorkflow:
    """`multiturn`: rollout/multiturn.py."""
    from rollout.multiturn import MultiTurnWorkflow

    return MultiTurnWorkflow(**kwargs)


WORKFLOWS = {"group": GroupWorkflow, "tree": tree_workflow, "multiturn": multiturn_workflow}


def build_workflow(spec: str, kwargs: dict[str, Any], cwd: str | None = None) -> RolloutWorkflow:
    """The workflow `rollout.workflow` names, built with `rollout.workflow_kwargs`."""
    factory = load_plugin("rollout.workflow", spec, WORKFLOWS, cwd)
    workflow = factory(**kwargs)
    if not inspect.iscoroutinefunction(getattr(workflow, "arun_episode", None)):
        raise ValueError(f"rollout.workflow={spec!r} built a {type(workflow).__name__} without an "
                         "`async def arun_episode(self, ctx, item)`: see rollout/workflow.py")
    return workflow
