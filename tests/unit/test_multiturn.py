"""The multi-turn workflow on a scripted fake context: observation tokens are context only
(mask 0, no logprob), the model's keep theirs, turns end at stop strings, environments
that fail are marked, counted and alarmed, the calculator evaluates only arithmetic."""

from __future__ import annotations

import asyncio
import re
import time

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
    assert traj.reward == 1.0 and traj.reward_info["turns"] == 3.0 and group.stats["env/turns"] == 3.0
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


class Stuck:
    """A sync environment that hangs (long enough to be timed out, short enough not to
    keep its abandoned thread alive past the test)."""

    def reset(self, row):
        return ""

    def step(self, action):
        time.sleep(1.5)
        return "", 0.0, True


class Garbage:
    def reset(self, row):
        return ""

    def step(self, action):
        return "=1", float("nan"), False


class BadReset:
    def reset(self, row):
        raise RuntimeError("no connection")


class BadInit:
    made = 0

    def __init__(self):
        BadInit.made += 1
        if BadInit.made > 1:  # the start-up check builds one; the episodes' fail
            raise OSError("sandbox unavailable")


def test_a_failing_environment_drops_its_group_counts_it_and_trips_the_alarm():
    flow = MultiTurnWorkflow(env=f"{__name__}:Boom", failure_min_episodes=3, failure_window=4)
    group, _ = episode(["<calc>1</calc>"], flow)
    assert group is None  # dropped: the worker files it as the ledger's `dropped`
    assert flow.metrics()["env/failures"] == 1.0 and flow.metrics()["env/failures_exception"] == 1.0
    assert flow.metrics()["env/dropped_groups"] == 1.0 and flow.metrics()["env/failure_rate"] == 1.0
    episode(["<calc>1</calc>"], flow)
    with pytest.raises(EnvironmentAlarm, match=r"Boom.*failed 3 of the last 3 episodes.*step raised KeyError"):
        episode(["<calc>1</calc>"], flow)


def test_the_score_policy_keeps_the_group_with_the_failed_sample_scored_and_marked():
    flow = MultiTurnWorkflow(env=f"{__name__}:Boom", on_failure="score", failure_score=-1.0)
    group, _ = episode(["<calc>1</calc>"], flow)
    (traj,) = group.trajectories
    assert traj.reward == -1.0 and traj.reward_failure == "exception" and traj.reward_info["env_failed"] == 1.0
    assert traj.finish_reason is FinishReason.STOP and flow.metrics()["env/dropped_groups"] == 0.0


def test_a_hanging_environment_times_out_sync_or_async():
    for env in ("Sleepy", "Stuck"):
        flow = MultiTurnWorkflow(env=f"{__name__}:{env}", env_timeout_s=0.2, on_failure="score")
        start = time.perf_counter()
        group, _ = episode(["<calc>1</calc>"], flow)
        assert time.perf_counter() - start < 1.0, env  # not waiting for the hung call
        assert group.trajectories[0].reward_failure == "timeout", env
        assert flow.metrics()["env/failures_timeout"] == 1.0


@pytest.mark.parametrize("env, kind, says", [("Garbage", "invalid", "step returned ('=1', nan, False)"),
                                             ("BadReset", "exception", "reset raised RuntimeError: no connection"),
                                             ("BadInit", "exception", "constructor raised OSError")])
def test_every_environment_call_is_inside_the_fault_boundary(env, kind, says):
    flow = MultiTurnWorkflow(env=f"{__name__}:{env}", on_failure="score", failure_min_episodes=1, failure_window=1,
                             max_failure_rate=0.0)
    with pytest.raises(EnvironmentAlarm) as alarm:
        episode(["<calc>1</calc>"], flow)
    assert f"'{kind}': 1" in str(alarm.value) and says in str(alarm.value)
    assert flow.metrics()[f"env/failures_{kind}"] == 1.0


def test_the_alarm_waits_for_its_window_and_can_be_turned_off():
    quiet = MultiTurnWorkflow(env=f"{__name__}:Boom", max_failure_rate=1.0, failure_min_episodes=1, failure_window=1)
    for _ in range(3):
        assert episode(["<calc>1</calc>"], quiet)[0] is None
    patient = MultiTurnWorkflow(env=f"{__name__}:Boom", failure_min_episodes=4, failure_window=8)
    for _ in range(3):
        episode(["<calc>1</calc>"], patient)
    with pytest.raises(EnvironmentAlarm):
        episode(["<calc>1</calc>"], patient)


@pytest.mark.parametrize("kwargs, says", [({"on_failure": "skip"}, "on_failure='skip'"),
                                          ({"max_failure_rate": 2.0}, "max_failure_rate=2.0"),
                                          ({"failure_min_episodes": 100}, "failure_min_episodes=100")])
def test_bad_fault_settings_are_refused_naming_the_key(kwargs, says):
    with pytest.raises(ValueError, match=r"rollout.workflow_kwargs for multiturn: bad " + re.escape(says)):
        MultiTurnWorkflow(**kwargs)


class Counting:
    steps = 0

    def reset(self, row):
        return ""

    def step(self, action):
        Counting.steps += 1
        return ("=2", 0.5, False) if action.endswith("</calc>") else ("", 0.25, True)


class TwoCtx(ScriptCtx):
    """Two episodes: the first finishes at once, the second is interrupted mid-turn once."""

    def __init__(self, scripts: dict[int, list[str]]) -> None:
        super().__init__([])
        self.scripts = scripts

    async def agenerate(self, traj, max_tokens=None, *, stop=(), **kwargs):
        if traj.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            return traj
        text = self.scripts[traj.prompt_ids[-1]].pop(0)
        aborted = text.endswith("|")
        text = text.rstrip("|")
        traj.append_tokens(self.tokenizer.encode(text), [-0.25] * len(text), self.version)
        traj.finish_reason = FinishReason.ABORTED if aborted else FinishReason.STOP
        return traj


def test_an_interrupted_episode_resumes_where_it_stopped_and_keeps_its_env_rewards():
    Counting.steps = 0
    flow = MultiTurnWorkflow(env=f"{__name__}:Counting")
    ctx = TwoCtx({ord("a"): ["#2"], ord("b"): ["<calc>1+1</calc>", "<ca|", "lc>2</calc>", "#2"]})
    group = Group("g", "p", "x", {"prompt": "x"})
    group.trajectories = [Trajectory("p", "g", ctx.tokenizer.encode(p)) for p in ("a", "b")]
    ctx.partial = group
    item = PromptItem("p", "x", {"prompt": "x"}, 2, group_id="g")
    assert asyncio.run(flow.arun_episode(ctx, item)) is group and not group.is_finished  # handed back partial
    assert Counting.steps == 2 and flow.metrics()["env/episodes"] == 1.0  # the interrupted one has not ended
    assert asyncio.run(flow.arun_episode(ctx, item)) is group and group.is_finished
    assert Counting.steps == 4  # the finished episode was not stepped again
    done, resumed = group.trajectories
    assert "".join(map(chr, resumed.response_ids)) == "<calc>1+1</calc>=2<calc>2</calc>=2#2"
    assert resumed.reward_info["env_reward"] == 0.5 + 0.5 + 0.25 and resumed.reward_info["turns"] == 3.0
    assert done.reward == 0.0 + 0.25 and flow.metrics()["env/episodes"] == 2.0


def test_the_calculator_evaluates_arithmetic_only():
    env = CalculatorEnv()
    assert env.step("so <calc>12+7*3-4</calc>") == ("=29", 0.0, False)
    assert env.step("#29") == ("", 0.0, True)
    assert env.step("<calc>__import__('os')</calc>") == ("=?", 0.0, False)
    assert env.step("<calc>2**100</calc>") == ("=?", 0.0, False)  # only + - *
    # a step written up to its '=' (with "=" a stop string): the result is what comes next
    assert env.step("7*3=") == ("21", 0.0, False) and env.step("21;12+21=") == ("33", 0.0, False)
    assert env.step("21;=") == ("?", 0.0, False) and env.step("33;#33") == ("", 0.0, True)


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


def test_aevaluate_runs_one_greedy_episode_and_a_fault_ends_it_uncounted():
    ctx = ScriptCtx(["12+21=", "33-4=", ";#29"])
    wf = MultiTurnWorkflow(stop=["="], max_turns=8)
    traj = asyncio.run(wf.aevaluate(ctx, Trajectory("eval", "eval", [1, 2]), {"prompt": "12+7*3-4="}))
    assert "".join(map(chr, traj.response_ids)) == "12+21=33" + "33-4=29" + ";#29"
    assert traj.reward_info["turns"] == 3.0 and traj.finish_reason is FinishReason.STOP

    broken = MultiTurnWorkflow(env=f"{__name__}:Boom")
    traj = asyncio.run(broken.aevaluate(ScriptCtx(["<calc>1</calc>"]), Trajectory("eval", "eval", [1]), {}))
    assert traj.finish_reason is FinishReason.LENGTH and traj.reward_info["env_failed"] == 1.0
    assert broken.counts["episodes"] == 0 and not broken.recent  # the training alarm never sees evaluation
