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
first prompt only. An interrupted episode resumes with a fresh environment (`reset` again;
its opening is not appended twice), its step rewards and turns so far kept on the trajectory.

The reward is the configured reward functions' (on the whole transcript) plus the sum of
the environment's step rewards (`reward_info["env_reward"]`).

Faults are handled as reward failures are. An environment that raises (in its constructor,
`reset` or `step`), returns something other than `(str, number, bool)` from `step`, or takes
longer than `env_timeout_s` ends that episode, failed (`exception`, `invalid`, `timeout`);
the worker goes on. `on_failure="drop_group"` (the default) drops the episode's group
(the ledger's `dropped`; `env/dropped_groups`), `"score"` keeps it with the failed sample
scored `failure_score` and marked (`reward_failure`, `reward_info["env_failed"]`). Every
failure is counted (`env/failures`, by kind), and more than `max_failure_rate` failed
episodes among the last `failure_window` (once `failure_min_episodes` ended) stop the run
with an `EnvironmentAlarm` naming the environment. Sync environments run each call in a
daemon thread: a hung one is timed out and abandoned, not killed (keep them to pure
Python, or make them async; an async one must not block the event loop).
"""

from __future__ import annotations

import asyncio
import ast
import functools
import inspect
import math
import operator
import re
import threading
from collections import deque
from typing import Any

from buffer.plugins import load_plugin
from buffer.prompts import PromptItem
from buffer.types import FinishReason, Group, Trajectory
from rollout.workflow import EpisodeContext, GroupWorkflow

FAILURE_KINDS = ("exception", "timeout", "invalid")
POLICIES = ("drop_group", "score")


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


class EnvironmentFault(Exception):
    """An environment's call failed: `kind` is one of FAILURE_KINDS."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class CalculatorEnv:
    """The built-in example. The model may write `<calc>expr</calc>` (`=result` is appended),
    or, with "=" among the workflow's `stop` strings, a step up to its `=` as
    `task=arithmetic_steps` writes them (`12+21=`: `33` is appended). An action without a
    call ends the episode (its answer is scored by the rewards)."""

    CALL = re.compile(r"<calc>([^<]*)</calc>\s*$")
    STEP = re.compile(r"([-+*()0-9 ]*)=$")  # the arithmetic just before a trailing '='
    OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def reset(self, row: dict) -> str:
        return ""

    def step(self, action: str) -> tuple[str, float, bool]:
        call, prefix = self.CALL.search(action), "="
        if call is None:
            call, prefix = self.STEP.search(action), ""
        if call is None:
            return "", 0.0, True
        try:
            return f"{prefix}{self.evaluate(call.group(1))}", 0.0, False
        except (ValueError, SyntaxError):
            return f"{prefix}?", 0.0, False  # a malformed expression: the model sees it failed

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


def _in_daemon_thread(fn, *args) -> asyncio.Future:
    """`fn(*args)` in a daemon thread of its own: a call that hangs is abandoned when its
    caller times out, and holds neither a shared pool's slot nor the process at exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():  # (timed out meanwhile)
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, err
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop is gone: nobody waits for it any more

    threading.Thread(target=run, name="grove-env", daemon=True).start()
    return future


class MultiTurnWorkflow(GroupWorkflow):
    def __init__(self, env: str = "calculator", env_kwargs: dict | None = None, max_turns: int = 4,
                 stop: list[str] | None = None, env_timeout_s: float = 5.0, max_failure_rate: float = 0.5,
                 failure_window: int = 64, failure_min_episodes: int = 16, on_failure: str = "drop_group",
                 failure_score: float = 0.0) -> None:
        if max_turns < 1 or env_timeout_s <= 0:
            raise ValueError("multiturn workflow: max_turns >= 1 and env_timeout_s > 0")
        bad = [f"on_failure={on_failure!r} (choose one of {', '.join(POLICIES)})"] if on_failure not in POLICIES else []
        bad += [f"max_failure_rate={max_failure_rate} (a share in [0, 1]; 1.0 disables the alarm)"
                ] if not 0.0 <= max_failure_rate <= 1.0 else []
        bad += [f"failure_min_episodes={failure_min_episodes} (need 1 <= it <= failure_window={failure_window})"
                ] if not 1 <= failure_min_episodes <= failure_window else []
        if bad:
            raise ValueError(f"rollout.workflow_kwargs for multiturn: bad {'; '.join(bad)}")
        self.env_spec = env
        self.env_factory = load_plugin("rollout.workflow_kwargs.env", env, ENVIRONMENTS)
        self.env_kwargs = dict(env_kwargs or {})
        self.env_factory(**self.env_kwargs)  # a bad spec or kwargs fails at start-up, not mid-run
        self.max_turns = max_turns
        self.stop = tuple(stop if stop is not None else ["</calc>"])
        self.env_timeout_s = env_timeout_s
        self.on_failure, self.failure_score = on_failure, float(failure_score)
        self.max_failure_rate, self.failure_min_episodes = max_failure_rate, failure_min_episodes
        self.recent: deque[str | None] = deque(maxlen=failure_window)  # failure kind per episode, or None
        self.last_failure = ""
        self.counts = dict.fromkeys(("episodes", "failures", *(f"failures_{k}" for k in FAILURE_KINDS),
                                     "dropped_groups"), 0)

    def metrics(self) -> dict[str, float]:
        """Cumulative counters, merged into the rollout worker's stats (`env/*`), and the
        alarm window's failure rate."""
        failed = sum(kind is not None for kind in self.recent)
        return {**{f"env/{k}": float(v) for k, v in self.counts.items()},
                "env/failure_rate": failed / len(self.recent) if self.recent else 0.0}

    async def _call(self, what: str, fn, *args) -> Any:
        """An environment call, sync or async, within env_timeout_s; a fault is raised as
        EnvironmentFault naming the environment and the call."""
        try:
            if inspect.iscoroutinefunction(fn):
                return await asyncio.wait_for(fn(*args), self.env_timeout_s)
            return await asyncio.wait_for(_in_daemon_thread(fn, *args), self.env_timeout_s)
        except asyncio.TimeoutError:
            raise EnvironmentFault("timeout", f"environment {self.env_spec!r}: {what} did not return within "
                                              f"env_timeout_s={self.env_timeout_s} s") from None
        except Exception as err:  # noqa: BLE001 - an environment's fault ends its episode, marked
            raise EnvironmentFault("exception", f"environment {self.env_spec!r}: {what} raised "
                                                f"{type(err).__name__}: {err}") from err

    async def _step(self, env: Any, action: str) -> tuple[str, float, bool]:
        result = await self._call("step", env.step, action)
        try:
            observation, reward, done = result
            reward = float(reward)
        except (TypeError, ValueError):
            observation = reward = None
        if not isinstance(observation, str) or not math.isfinite(reward):
            raise EnvironmentFault("invalid", f"environment {self.env_spec!r}: step returned {result!r:.200}; "
                                              "it must return (observation: str, reward: finite number, done: bool)")
        return observation, reward, bool(done)

    async def arun_episode(self, ctx: EpisodeContext, item: PromptItem) -> Group | None:
        group = ctx.partial or ctx.new_group(item)  # (the chat template, if on, wraps the first prompt)
        failures = await asyncio.gather(*(self._episode(ctx, t, group.row) for t in group.trajectories))
        self._check_alarm()
        if any(failures) and self.on_failure == "drop_group":
            self.counts["dropped_groups"] += 1
            return None  # dropped (the ledger's `dropped`), partial or not: its failed episode cannot go on
        if not group.is_finished:
            return group  # interrupted: resumed later (the environment starts again from the transcript)
        progress = [dict(t.reward_info) for t in group.trajectories]  # ascore replaces reward_info
        if not await ctx.ascore(group):
            return None
        for traj, kept, failure in zip(group.trajectories, progress, failures):
            traj.reward_info.update(kept)
            if failure is not None:
                traj.reward, traj.reward_failure = self.failure_score, failure
            elif traj.reward is not None:
                traj.reward += kept["env_reward"]
        group.stats = {"env/turns": sum(t.reward_info["turns"] for t in group.trajectories) / group.num_samples,
                       "env/context_tokens": float(sum(len(t.loss_mask) - sum(t.loss_mask) for t in group.trajectories))}
        return group

    async def aevaluate(self, ctx: EpisodeContext, traj: Trajectory, row: dict) -> Trajectory:
        """One held-out episode (`rollout.eval_workflow=true`): the agent with its
        environment, as it is trained, but greedy (the context decides). An environment
        fault ends the episode where it stands, to be scored as it is; evaluation episodes
        do not count toward the training alarm."""
        info: dict[str, Any] = {"env_reward": 0.0, "turns": 0.0}
        try:
            await self._turns(ctx, traj, row, info)
        except EnvironmentFault:
            traj.finish_reason, info["env_failed"] = FinishReason.LENGTH, 1.0
        traj.reward_info = info
        return traj

    async def _episode(self, ctx: EpisodeContext, traj: Trajectory, row: dict) -> str | None:
        """One response's episode, continued where an earlier pass left it; its progress
        (`env_reward`, `turns`, `env_failed`) lives in `traj.reward_info`. Returns the
        failure kind, or None."""
        info = traj.reward_info
        info.setdefault("env_reward", 0.0)
        info.setdefault("turns", 0.0)
        if info.get("env_failed"):
            return traj.reward_failure or "exception"  # failed in an earlier pass
        if traj.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            return None  # ended in an earlier pass (its group was interrupted): not stepped again
        try:
            await self._turns(ctx, traj, row, info)
        except EnvironmentFault as fault:
            if traj.finish_reason in (None, FinishReason.ABORTED):
                traj.finish_reason = FinishReason.LENGTH  # ended here, not to be resumed
            info["env_failed"] = 1.0
            traj.reward_failure = fault.kind
            self._record(fault.kind, str(fault))
            return fault.kind
        if traj.finish_reason is not FinishReason.ABORTED:
            self._record(None)
        return None

    async def _turns(self, ctx: EpisodeContext, traj: Trajectory, row: dict, info: dict) -> None:
        env = await self._call("its constructor", functools.partial(self.env_factory, **self.env_kwargs))
        opening = await self._call("reset", env.reset, row)
        resumed = traj.num_response_tokens > 0  # handed back mid-turn: that turn goes on
        if opening and not resumed:
            traj.append_context_tokens(ctx.tokenizer.encode(opening, add_special_tokens=False), ctx.version)
        done_turns = observation_runs(traj.loss_mask) - bool(opening)  # (the opening is no turn's answer)
        for turn in range(done_turns + 1, self.max_turns + 1):
            start = last_context_end(traj.loss_mask) if resumed else traj.num_response_tokens
            resumed = False
            info["turns"] = float(turn)
            await ctx.agenerate(traj, stop=self.stop)
            if traj.finish_reason is not FinishReason.STOP:
                return  # the budget, or an interrupt (handed back partial)
            action = ctx.tokenizer.decode(traj.response_ids[start:], skip_special_tokens=True)
            observation, reward, done = await self._step(env, action)
            info["env_reward"] += reward
            if done or not action.endswith(self.stop):
                return  # the environment ended it, or the model answered (EOS)
            traj.append_context_tokens(ctx.tokenizer.encode(observation, add_special_tokens=False), ctx.version)
            traj.finish_reason = None  # the next turn
        traj.finish_reason = FinishReason.LENGTH  # out of turns

    def _record(self, kind: str | None, detail: str = "") -> None:
        self.counts["episodes"] += 1
        self.recent.append(kind)
        if kind is not None:
            self.counts["failures"] += 1
            self.counts[f"failures_{kind}"] += 1
            self.last_failure = detail

    def _check_alarm(self) -> None:
        failed = [kind for kind in self.recent if kind is not None]
        if len(self.recent) >= self.failure_min_episodes and len(failed) > self.max_failure_rate * len(self.recent):
            kinds = {k: failed.count(k) for k in sorted(set(failed))}
            raise EnvironmentAlarm(
                f"environment {self.env_spec!r} failed {len(failed)} of the last {len(self.recent)} episodes "
                f"({kinds}; rollout.workflow_kwargs.max_failure_rate={self.max_failure_rate}); the last: "
                f"{self.last_failure}. Fix the environment, or raise max_failure_rate if this is expected.")
