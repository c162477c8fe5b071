"""The multi-turn workflow on a scripted fake context: observation tokens are context only
(mask 0, no logprob), the model's keep theirs, turns end at stop strings, environments
that fail are marked, counted and alarmed, the calculator evaluates only arithmetic."""

from __future__ import annotations

import asyncio

import pytest

from buffer.prompts import PromptItem
from buffer.types import FinishReason, Group, Trajectory
from rollout.multiturn import CalculatorEnv, EnvironmentAlarm, MultiTurnWorkflow, last_context_end, observation_runs


class CharTok:
    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class ScriptCtx:
    """Each turn writes the next scripted text (up to and including a stop string)."""

    def __init__(self, turns: list[str]) -> None:
        self.tokenizer, self.partial, self.max_tokens, self.version = CharTok(), None, 200, 5
        self.turns = list(turns)
        self.prompt_tokens = self.cached_prompt_tokens = 0

    def new_group(self, item: PromptItem) -> Group:
        g = Group(item.group_id, item.prompt_id, item.prompt, item.row)
        g.trajectories = [Trajectory(item.prompt_id, item.group_id, self.tokenizer.encode(item.prompt))
                          for _ in range(item.n_samples)]
        return g

    async def agenerate(self, traj, max_tokens=None, *, stop=(), **kwargs):
        text = self.turns.pop(0)
        traj.append_tokens(self.tokenizer.encode(text), [-0.25] * len(text), self.version)
        traj.finish_reason = FinishReason.STOP
        return traj

    async def ascore(self, group):
        for t in group.trajectories:
            t.reward = 1.0 if self.tokenizer.decode(t.response_ids).endswith("#29") else 0.0
        return True


def episode(turns, workflow=None):
    ctx = ScriptCtx(turns)
    group = asyncio.run((workflow or MultiTurnWorkflow()).arun_episode(
        ctx, PromptItem("p", "12+7*3-4=", {"prompt": "12+7*3-4="}, 1, group_id="g")))
    return group, ctx


def test_observations_are_context_only_and_the_models_tokens_keep_their_logprobs():
    group, _ = episode(["<calc>7*3</calc>", "12+21=33;<calc>33-4</calc>", "#29"])
    (traj,) = group.trajectories
    text = "".join(chr(i) for i in traj.response_ids)
    assert text == "<calc>7*3</calc>=21" + "12+21=33;<calc>33-4</calc>=29" + "#29"
    observed = [i for i, m in enumerate(traj.loss_mask) if m == 0]
    assert "".join(text[i] for i in observed) == "=21=29"  # exactly the environment's tokens
    assert all(traj.behaviour_logprobs[i] == 0.0 for i in observed)
    assert all(lp == -0.25 for lp, m in zip(traj.behaviour_logprobs, traj.loss_mask) if m)
    assert traj.reward == 1.0 and traj.reward_info["turns"] == 3.0 and group.stats["env/failures"] == 0.0
    assert observation_runs(traj.loss_mask) == 2 and last_context_end(traj.loss_mask) == len(text) - 3


def test_the_turn_limit_ends_an_episode():
    group, _ = episode(["<calc>1+1</calc>"] * 2, MultiTurnWorkflow(max_turns=2))
    (traj,) = group.trajectories
    assert traj.finish_reason is FinishReason.LENGTH and traj.reward_info["turns"] == 2.0


class Boom:
    def reset(self, row):
        return ""

    def step(self, action):
        raise KeyError("no such tool")


class Sleepy:
    def reset(self, row):
        return ""

    async def step(self, action):
        await asyncio.sleep(60)


def test_a_failing_environment_marks_its_episode_and_trips_the_alarm():
    flow = MultiTurnWorkflow(env=f"{__name__}:Boom", failure_min_episodes=3, failure_window=4)
    group, _ = episode(["<calc>1</calc>"], flow)
    (traj,) = group.trajectories
    assert traj.reward_failure == "exception" and traj.reward_info["env_failed"] == 1.0
    assert group.stats["env/failures"] == 1.0
    episode(["<calc>1</calc>"], flow)
    with pytest.raises(EnvironmentAlarm, match=r"Boom.*failed 3 of the last 3 episodes.*KeyError"):
        episode(["<calc>1</calc>"], flow)


def test_a_hanging_environment_times_out():
    flow = MultiTurnWorkflow(env=f"{__name__}:Sleepy", env_timeout_s=0.2)
    group, _ = episode(["<calc>1</calc>"], flow)
    assert group.trajectories[0].reward_failure == "timeout"


def test_the_calculator_evaluates_arithmetic_only():
    env = CalculatorEnv()
    assert env.step("so <calc>12+7*3-4</calc>") == ("=29", 0.0, False)
    assert env.step("#29") == ("", 0.0, True)
    assert env.step("<calc>__import__('os')</calc>") == ("=?", 0.0, False)
    assert env.step("<calc>2**100</calc>") == ("=?", 0.0, False)  # only + - *


def test_the_documented_environment_runs_as_written(tmp_path):
    """docs/workflows.md's example environment, taken from the page, through an episode."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "workflows.md").read_text()
    code = re.search(r"```python\n(# my_env.py.*?)```", page, re.S).group(1)
    assert len(code.strip().splitlines()) <= 32
    (tmp_path / "my_env.py").write_text(code)
    flow = MultiTurnWorkflow(env=f"{tmp_path}/my_env.py:Guess", stop=["!"], max_turns=10)
    secret = __import__("random").Random("12+7*3-4=").randrange(10)
    guesses = [f"{(secret + 1) % 10}!", f"{secret}!"]
    group, _ = episode(guesses, flow)
    (traj,) = group.trajectories
    text = "".join(chr(i) for i in traj.response_ids)
    assert text.startswith("guess:") and text.endswith(f"{secret}!")
    assert traj.reward_info["env_reward"] == 1.0 and traj.reward_info["turns"] == 2.0


def test_the_chat_template_wraps_a_prompt_when_asked():
    from types import SimpleNamespace

    from rollout.config import RolloutConfig
    from rollout.worker import RolloutWorker
    from trainer.tiny_model import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<a>{% endif %}")
    plain = SimpleNamespace(cfg=RolloutConfig(), tokenizer=tok)
    assert RolloutWorker.encode_prompt(plain, "1+1=") == tok.encode("1+1=")
    chat = SimpleNamespace(cfg=RolloutConfig(chat_template=True, system_prompt="be exact"), tokenizer=tok)
    assert RolloutWorker.encode_prompt(chat, "1+1=") == tok.encode("<system>be exact<user>1+1=<a>",
                                                                   add_special_tokens=False)
