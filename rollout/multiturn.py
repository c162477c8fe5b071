"""Multi-turn episodes with an environment (`rollout.workflow=multiturn`).

An environment is a small user class, named by dotted path as rewards are, sync or async:

    class MyEnv:
        def reset(self, row: dict) -> str: ...                       # an opening observation, or ""
        def step(self, action: str) -> tuple[str, float, bool]: ...  # observation, reward, done

Each of a group's n responses is one episode: the model generates a turn until one of
`stop` strings (or EOS, or the budget), the environment answers, its observation is
appended, and the model goes on, for at most `max_turns` turns. Tokens in, tokens out:
each observation is tokenized on its own and *appended* to the token ids already held;
past turns are never re-tokenized or re-templated, so what is trained is exactly what the
engine saw. Observation tokens are context only: loss mask 0, no behaviour logprob. The
model's tokens keep their logprobs and versions, so an episode may span weight updates
(and interrupts) like any response. With `rollout.chat_template=true` the chat template wraps the
first prompt only.

The reward is the configured reward functions' (on the whole transcript) plus the sum of
the environment's step rewards (`reward_info["env_reward"]`). An environment that raises
or exceeds `env_timeout_s` ends that episode: the sample is marked failed (its reward
failure is the kind, its info the error), counted in `env/failures`, and more than
`max_failure_rate` failed episodes among the last `failure_window` stop the run with an
error naming the environment. Environments run in a worker thread: a hung one is timed
out but its thread is not killed (keep them to pure Python, or make them async).
"""

from __future__ import annotations

import asyncio
import ast
import inspect
import operator
import re
from collections import deque
from typing import Any

from buffer.plugins import load_plugin
from buffer.prompts import PromptItem
from buffer.types import FinishReason, Group, Trajectory
from rollout.workflow import EpisodeContext, GroupWorkflow


def observation_runs(mask: list[int]) -> int:
    """How many runs of context (mask 0) tokens a transcript holds: the turns answered."""
    return sum(1 for i, m in enumerate(mask) if m == 0 and (i == 0 or mask[i - 1] == 1))


def last_context_end(mask: list[int]) -> int:
    """Where the current turn began: just after the last context token (0 if none)."""
    for i in range(len(mask) - 1, -1, -1):
        if mask[i] == 0:
            return i + 1
    return 0


class EnvironmentAlarm(RuntimeError):
    """Too many episodes failed in the environment."""


class CalculatorEnv:
    """The built-in example: the model may write `<calc>expr</calc>`; the result is appended
    (`=result`); an action without a call ends the episode (its answer is scored by the
    rewards)."""

    CALL = re.compile(r"<calc>([^<]*)</calc>\s*$")
    OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def reset(self, row: dict) -> str:
        return ""

    def step(self, action: str) -> tuple[str, float, bool]:
        call = self.CALL.search(action)
        if call is None:
            return "", 0.0, True
        try:
            return f"={self.evaluate(call.group(1))}", 0.0, False
        except (ValueError, SyntaxError):
            return "=?", 0.0, False  # a malformed expression: the model sees it failed

    @classmethod
    def evaluate(cls, text: str) -> int:
        """Integer arithmetic with + - * and parentheses only; anything else is refused."""

        def value(node: ast.AST) -> int:
            if isinstance(node, ast.Constant) and type(node.value) is int:
                return node.value
            if isinstance(node, ast.BinOp) and type(node.op) in cls.OPS:
                return cls.OPS[type(node.op)](value(node.left), value(node.right))
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
                return -value(node.operand)
            raise ValueError(f"not integer arithmetic: {text!r}")

        if len(text) > 64:
            raise ValueError("expression too long")
        return value(ast.parse(text.strip(), mode="eval").body)


ENVIRONMENTS = {"calculator": CalculatorEnv}


class MultiTurnWorkflow(GroupWorkflow):
    def __init__(self, env: str = "calculator", env_kwargs: dict | None = None, max_turns: int = 4,
                 stop: list[str] | None = None, env_timeout_s: float = 5.0, max_failure_rate: float = 0.5,
                 failure_window: int = 64, failure_min_episodes: int = 16) -> None:
        if max_turns < 1 or env_timeout_s <= 0:
            raise ValueError("multiturn workflow: max_turns >= 1 and env_timeout_s > 0")
        self.env_spec = env
        self.env_factory = load_plugin("rollout.workflow_kwargs.env", env, ENVIRONMENTS)
        self.env_kwargs = dict(env_kwargs or {})
        self.env_factory(**self.env_kwargs)  # a bad spec or kwargs fails at start-up, not mid-run
        self.max_turns = max_turns
        self.stop = tuple(stop if stop is not None else ["</calc>"])
        self.env_timeout_s = env_timeout_s
        self.max_failure_rate, self.failure_min_episodes = max_failure_rate, failure_min_episodes
        self.recent: deque[str | None] = deque(maxlen=failure_window)  # failure kind per episode, or None

    async def _call(self, fn, *args) -> Any:
        """An environment call, sync or async, within env_timeout_s."""
        if inspect.iscoroutinefunction(fn):
            return await asyncio.wait_for(fn(*args), self.env_timeout_s)
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), self.env_timeout_s)

    async def arun_episode(self, ctx: EpisodeContext, item: PromptItem) -> Group | None:
        group = ctx.partial or ctx.new_group(item)  # (the chat template, if on, wraps the first prompt)
        results = await asyncio.gather(*(self._episode(ctx, t, group.row) for t in group.trajectories))
        if not group.is_finished:
            return group  # interrupted: resumed later (the environment starts again from the transcript)
        if not await ctx.ascore(group):
            return None
        for traj, (env_reward, failure, turns) in zip(group.trajectories, results):
            traj.reward_info["env_reward"] = env_reward
            traj.reward_info["turns"] = float(turns)
            if failure is not None:
                traj.reward_failure = traj.reward_failure or failure[0]
                traj.reward_info["env_failed"] = 1.0
            elif traj.reward is not None:
                traj.reward += env_reward
        group.stats = {"env/turns": sum(r[2] for r in results) / len(results),
                       "env/failures": float(sum(r[1] is not None for r in results)),
                       "env/context_tokens": float(sum(len(t.loss_mask) - sum(t.loss_mask) for t in group.trajectories))}
        return group

    async def _episode(self, ctx: EpisodeContext, traj: Trajectory, row: dict) -> tuple[float, tuple | None, int]:
        """One response's episode; returns (environment reward, failure (kind, detail) or None, turns)."""
        env = self.env_factory(**self.env_kwargs)
        total, turns = 0.0, 0
        try:
            opening = await self._call(env.reset, row)
            resumed = traj.num_response_tokens > 0  # handed back mid-turn: that turn goes on
            if opening and not resumed:
                traj.append_context_tokens(ctx.tokenizer.encode(opening, add_special_tokens=False), ctx.version)
            done_turns = observation_runs(traj.loss_mask) - bool(opening)  # (the opening is no turn's answer)
            for turns in range(done_turns + 1, self.max_turns + 1):
                start = last_context_end(traj.loss_mask) if resumed else traj.num_response_tokens
                resumed = False
                await ctx.agenerate(traj, stop=self.stop)
                if traj.finish_reason is not FinishReason.STOP:
                    break  # the budget, or an interrupt (handed back partial)
                action = ctx.tokenizer.decode(traj.response_ids[start:], skip_special_tokens=True)
                observation, reward, done = await self._call(env.step, action)
                total += float(reward)
                if done or not action.endswith(self.stop):
                    break  # the environment ended it, or the model answered (EOS)
                traj.append_context_tokens(ctx.tokenizer.encode(observation, add_special_tokens=False),
                                           ctx.version)
                traj.finish_reason = None  # the next turn
            if traj.finish_reason is None:
                traj.finish_reason = FinishReason.LENGTH  # out of turns
            self._record(None)
            return total, None, turns
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            failure = ("timeout", f"environment {self.env_spec!r} did not answer within {self.env_timeout_s} s")
        except Exception as err:  # noqa: BLE001 - an environment's fault ends its episode, marked
            failure = ("exception", f"environment {self.env_spec!r} raised {type(err).__name__}: {err}")
        traj.finish_reason = traj.finish_reason if traj.finish_reason is not None else FinishReason.LENGTH
        if traj.finish_reason is FinishReason.ABORTED:
            traj.finish_reason = FinishReason.LENGTH
        self._record(failure)
        return total, failure, turns

    def _record(self, failure: tuple | None) -> None:
        self.recent.append(None if failure is None else failure[0])
        failed = [kind for kind in self.recent if kind is not None]
        if len(self.recent) >= self.failure_min_episodes and len(failed) > self.max_failure_rate * len(self.recent):
            kinds = {k: failed.count(k) for k in set(failed)}
            raise EnvironmentAlarm(
                f"environment {self.env_spec!r} failed {len(failed)} of the last {len(self.recent)} episodes "
                f"({kinds}; rollout.workflow_kwargs.max_failure_rate={self.max_failure_rate}); the last: {failure[1] if failure else ''}. "
                "Fix the environment, or raise max_failure_rate if this is expected.")
