"""The reward runner: isolated and in-process scoring, every failure kind contained and counted,
failure policies, group rewards, worker replacement, config handling."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
import time

import pytest

from rewards.api import FAILURE_KINDS, RewardSignatureError, RewardSpecError
from rewards._worker import Scorer, run_parallel
from rewards.runner import (
    RewardAlarmError,
    RewardConfig,
    RewardFailureError,
    RewardFunctionConfig,
    RewardProbeError,
    RewardRequest,
    RewardRunner,
    RewardWorkerError,
)

USER_REWARDS = textwrap.dedent(
    """
    import asyncio, math, os, sys, threading, time
    from rewards.api import RewardResult, register_reward

    def chaos(response, **kwargs):
        if response == "raise":
            raise ValueError("boom")
        if response == "hang":
            while True:
                pass
        if response == "nan":
            return float("nan")
        if response == "inf":
            return -math.inf
        if response == "str":
            return "1.0"
        if response == "none":
            return None
        if response == "big":
            return RewardResult(1.0, {f"k{i}": 1.0 for i in range(20000)})
        if response == "exit":
            os._exit(3)
        if response == "segv":
            import ctypes
            ctypes.string_at(0)
        if response == "sysexit":
            sys.exit(2)
        return 1.0

    def length(response, **kwargs):
        return RewardResult(len(response) / 10, {"chars": len(response)})

    def fails_on_b(response, **kwargs):
        if response == "b":
            raise RuntimeError("no b")
        return 1.0

    async def slow_async(response, **kwargs):
        await asyncio.sleep(0.2)
        return 1.0 if response != "hang" else 0.5

    async def async_chaos(response, **kwargs):
        if response == "hang":
            await asyncio.sleep(100)
        if response == "raise":
            raise KeyError("async boom")
        return 1.0

    def uses_ids(response_ids, prompt_ids, finish_reason, **kwargs):
        return RewardResult(float(len(response_ids)), {"prompt_len": len(prompt_ids), "stopped": finish_reason == "stop"})

    def no_kwargs(response, answer):
        return float(response == str(answer))

    @register_reward("test_longest", group=True)
    def longest(prompt, responses, **kwargs):
        best = max(len(r) for r in responses)
        return [float(len(r) == best) for r in responses]

    @register_reward("test_group_chaos", group=True)
    def group_chaos(prompt, responses, **kwargs):
        if prompt == "raise":
            raise ValueError("group boom")
        if prompt == "short":
            return [1.0]
        if prompt == "hang":
            while True:
                pass
        return [float("nan") if r == "nan" else 1.0 for r in responses]

    def sleepy(response, **kwargs):
        # Hangs on "hang..." (asleep: the interpreter lock is free) and "spin..." (a busy loop);
        # "busy..." uses 50 ms of CPU ("busy:200": 200 ms). Scores the length, plus 100 off the
        # main thread (i.e. in the runner's parallel mode).
        if response.startswith("hang"):
            time.sleep(3600)
        if response.startswith("spin"):
            while True:
                pass
        if response.startswith("busy"):
            seconds = int(response.split(":")[1]) / 1000 if ":" in response else 0.05
            t = time.thread_time()
            while time.thread_time() - t < seconds:
                pass
        return len(response) + (0.0 if threading.current_thread() is threading.main_thread() else 100.0)

    def always_raises(response, **kwargs):
        raise ValueError(f"the grader is broken for {response!r}")

    def fails_30_percent(response, **kwargs):
        if int(response) % 10 < 3:
            raise RuntimeError("one of the 30%")
        return 1.0

    def needs_answer(prompt, response, answer, **kwargs):
        if response != str(answer):
            raise AssertionError(f"probe response {response!r} is not the answer {answer!r}")
        if prompt != "2+2=":
            raise AssertionError(f"probe prompt {prompt!r}")
        return 1.0

    if "rewards._worker" in sys.modules and os.environ.get("GROVE_TEST_FAIL_IN_WORKER"):
        raise RuntimeError("this module refuses to load in a worker")
    """
)


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "grove_user_rewards.py"
    path.write_text(USER_REWARDS)
    return str(path)


def fn(user_file, target, **kw):
    return RewardFunctionConfig(fn=f"{user_file}:{target}", **kw)


def req(response, answer=None, prompt="p", **kw):
    fields = {"answer": answer, "difficulty": 1, "op": "+"} if answer is not None else {}
    return RewardRequest(prompt=prompt, response=response, fields=fields, **kw)


@pytest.fixture(scope="module")
def chaos_runner(user_file):
    with RewardRunner(RewardConfig(functions=[fn(user_file, "chaos")], timeout_s=0.5, num_workers=2)) as r:
        yield r


# --- ordinary scoring ------------------------------------------------------------------------


def test_default_config_scores_arithmetic_with_exact_match():
    with RewardRunner() as runner:
        runner.check_signatures({"prompt": "1+1=", "answer": "2", "difficulty": 0, "op": "+"})
        out = runner.score([req("2", "2"), req(" 3 ", 3), req("4", "5")])
    assert [s.score for s in out] == [1.0, 1.0, 0.0]
    assert all(s.failure is None and s.detail == "" for s in out)


def test_isolated_runner_throughput():
    """A trivial reward must cost well under 5 ms per sample (measured: ~15 us)."""
    reqs = [req(str(i), i, response_ids=list(range(256)), prompt_ids=[1] * 16) for i in range(256)]
    with RewardRunner() as runner:
        runner.score(reqs[:4])  # start the worker
        t0 = time.perf_counter()
        out = runner.score(reqs)
        elapsed = time.perf_counter() - t0
    assert all(s.score == 1.0 for s in out)
    assert elapsed / len(reqs) < 5e-3, f"{elapsed / len(reqs) * 1e3:.2f} ms per sample"


def test_external_file_and_token_ids(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "uses_ids")])
    with RewardRunner(cfg) as runner:
        out = runner.score([req("x", prompt_ids=[1, 2], response_ids=[5, 6, 7], finish_reason="stop")])
    assert out[0].score == 3.0 and out[0].info == {"prompt_len": 2.0, "stopped": 1.0}


def test_external_package_by_dotted_path(tmp_path):
    pkg = tmp_path / "mypkg_rw"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "r.py").write_text("def half(response, **kw):\n    return 0.5\n")
    for spec in ("mypkg_rw.r.half", "mypkg_rw.r:half"):
        cfg = {"functions": [{"fn": spec}], "search_paths": [str(tmp_path)]}
        with RewardRunner(cfg) as runner:
            assert runner.score([req("x")])[0].score == 0.5


def test_relative_file_spec_against_launch_dir(user_file):
    cfg = {"functions": [{"fn": "grove_user_rewards.py:length"}]}
    with RewardRunner(cfg, cwd=os.path.dirname(user_file)) as runner:
        assert runner.score([req("abcd")])[0].score == pytest.approx(0.4)


def test_function_without_kwargs_gets_only_what_it_names(user_file):
    with RewardRunner(RewardConfig(functions=[fn(user_file, "no_kwargs")])) as runner:
        out = runner.score([req("7", 7)])
    assert out[0].score == 1.0


def test_async_rewards_run_concurrently(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "slow_async")], num_workers=1)
    with RewardRunner(cfg) as runner:
        runner.score([req("warm")])
        t0 = time.perf_counter()
        out = runner.score([req(str(i)) for i in range(8)])
        elapsed = time.perf_counter() - t0
    assert [s.score for s in out] == [1.0] * 8
    assert elapsed < 1.0, "8 async calls of 0.2 s should overlap in one worker"


def test_combination_weights_info_and_overlong(user_file):
    """DAPO's overlong shaping is one more reward in the list (the only way to get it)."""
    cfg = RewardConfig.from_any({"functions": [
        {"fn": "exact_match", "weight": 1.0},
        {"fn": f"{user_file}:length", "weight": 0.5, "name": "len"},
        {"fn": "regex_format", "weight": 0.25, "kwargs": {"pattern": r"^\d+$"}},
        {"fn": "overlong_penalty", "kwargs": {"max_len": 10, "cache_len": 4, "factor": 2.0}},
    ]})
    with RewardRunner(cfg) as runner:
        assert runner.names == ["exact_match", "len", "regex_format", "overlong_penalty"]
        out = runner.score([req("12", "12", response_ids=[0] * 8), req("ab", "12", response_ids=[0] * 3),
                            req("12", "12", response_ids=[0] * 11)])
    # sample 0: 1 + 0.5*0.2 + 0.25*1 + 2*(-(8-6)/4): 8 tokens, in the cache band (6, 10]
    assert out[0].score == pytest.approx(1 + 0.1 + 0.25 - 1.0)
    assert out[0].info == pytest.approx(
        {"exact_match": 1.0, "len": 0.2, "len/chars": 2.0, "regex_format": 1.0, "overlong_penalty": -1.0}
    )
    assert out[1].score == pytest.approx(0.1) and out[1].info["overlong_penalty"] == 0.0  # 3 <= 6 tokens
    assert out[2].info["overlong_penalty"] == pytest.approx(-2.0)  # 11 > max_len tokens: -1 x factor


def test_dict_target_entries_and_duplicate_names():
    cfg = {"functions": [{"_target_": "rewards.builtin.regex_format", "pattern": "a"},
                         {"fn": "regex_format", "kwargs": {"pattern": "b"}}]}
    with RewardRunner(cfg) as runner:
        assert runner.names == ["regex_format", "regex_format#2"]
        out = runner.score([req("a"), req("ab")])
    assert [s.score for s in out] == [1.0, 2.0]


def test_concurrent_calls_and_order(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "length")], num_workers=2, max_batch_size=3)
    with RewardRunner(cfg) as runner:

        async def main():
            batches = [[req("x" * (10 * b + i)) for i in range(7)] for b in range(4)]
            outs = await asyncio.gather(*(runner.ascore(b) for b in batches))
            return batches, outs

        batches, outs = asyncio.run(main())
    for batch, out in zip(batches, outs):
        assert [s.score for s in out] == pytest.approx([len(r.response) / 10 for r in batch])


def test_runner_survives_successive_event_loops_and_is_built_inside_one(user_file):
    async def build_and_score():
        runner = RewardRunner({"functions": [{"fn": f"{user_file}:length"}]})
        return runner, (await runner.ascore([req("abc")]))[0].score

    runner, score = asyncio.run(build_and_score())
    with runner:
        assert score == pytest.approx(0.3)
        assert asyncio.run(runner.ascore([req("abcd")]))[0].score == pytest.approx(0.4)


# --- every failure kind, scoring continues ------------------------------------------------------


def test_every_failure_kind_is_contained(chaos_runner):
    cases = {
        "ok": None, "raise": "exception", "hang": "timeout", "nan": "nan", "inf": "nan",
        "str": "not_a_number", "none": "not_a_number", "big": "oversized", "exit": "crashed",
        "segv": "crashed", "sysexit": "exception",
    }
    before = chaos_runner.metrics()
    responses = []
    for r in cases:
        responses += [r, "ok"]
    t0 = time.perf_counter()
    out = chaos_runner.score([req(r) for r in responses])
    assert time.perf_counter() - t0 < 8
    for r, s in zip(responses, out):
        assert s.failure == cases[r], (r, s)
        if cases[r] is None:
            assert s.score == 1.0 and s.detail == ""
        else:
            assert s.score == 0.0 and "chaos" in s.detail  # the default policy: failure_score
    by_kind = {k: sum(1 for s in out if s.failure == k) for k in FAILURE_KINDS}
    m = chaos_runner.metrics()
    for k in FAILURE_KINDS:
        assert m[f"reward/failures/{k}"] - before[f"reward/failures/{k}"] == by_kind[k]
    assert m["reward/worker_restarts"] - before["reward/worker_restarts"] >= 3  # hang, exit, segv
    assert m["reward/samples"] - before["reward/samples"] == len(responses)
    # and the pool still works afterwards
    assert [s.score for s in chaos_runner.score([req("ok")] * 4)] == [1.0] * 4


def test_failure_details_are_readable(chaos_runner):
    out = chaos_runner.score([req("raise"), req("hang"), req("exit"), req("big")])
    assert "ValueError: boom" in out[0].detail
    assert "timeout_s=0.5" in out[1].detail and "killed and replaced" in out[1].detail
    assert "exit code 3" in out[2].detail
    assert "max_result_bytes" in out[3].detail


def test_dead_idle_worker_is_replaced(chaos_runner):
    chaos_runner.score([req("ok")] * 4)
    pids = [w.proc.pid for w in chaos_runner._workers if w is not None]
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    # no waiting: a worker killed while idle must not be blamed on the next sample
    out = chaos_runner.score([req("ok")] * 4)
    assert [s.score for s in out] == [1.0] * 4 and all(s.failure is None for s in out)


def test_unpicklable_fields_fail_only_their_sample(chaos_runner):
    bad = RewardRequest("p", "ok", fields={"cb": lambda: 1})
    out = chaos_runner.score([req("ok"), bad, req("ok")])
    assert [s.failure for s in out] == [None, "exception", None]
    assert "cannot be sent" in out[1].detail


def test_cancellation_leaves_the_runner_usable(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "chaos")], timeout_s=3)
    with RewardRunner(cfg) as runner:

        async def main():
            task = asyncio.create_task(runner.ascore([req("hang")]))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await runner.ascore([req("ok")])

        assert asyncio.run(main())[0].score == 1.0


def test_async_failures_isolated(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "async_chaos")], timeout_s=0.5)
    with RewardRunner(cfg) as runner:
        out = runner.score([req("ok"), req("hang"), req("raise"), req("ok")])
    assert [s.failure for s in out] == [None, "timeout", "exception", None]
    assert "async boom" in out[2].detail


# --- policies -------------------------------------------------------------------------------


def test_policy_score_uses_failure_score(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "fails_on_b")], failure_score=-1.0)
    with RewardRunner(cfg) as runner:
        out = runner.score([req("a"), req("b")])
    assert [s.score for s in out] == [1.0, -1.0] and out[1].failure == "exception"


def test_policy_stop_after_consecutive_failures(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "fails_on_b")], on_failure="stop", max_consecutive_failures=3)
    with RewardRunner(cfg) as runner:
        out = runner.score([req("b"), req("b"), req("a"), req("b"), req("b")])  # a success resets the count
        assert [s.failure for s in out] == ["exception", "exception", None, "exception", "exception"]
        with pytest.raises(RewardFailureError) as e:
            runner.score([req("b")])
        msg = str(e.value)
        assert "3 reward failures in a row" in msg and "no b" in msg and "on_failure=score" in msg
        assert runner.metrics()["reward/failures/exception"] == 5


def test_policy_drop_group(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "fails_on_b")], on_failure="drop_group")

    async def main(runner):
        return await runner.ascore_group([req("a"), req("b")]), await runner.ascore_group([req("a"), req("a")])

    with RewardRunner(cfg) as runner:
        (bad, keep_bad), (good, keep_good) = asyncio.run(main(runner))
        assert not keep_bad and keep_good
        assert bad[0].score == 1.0 and bad[1].score is None and bad[1].failure == "exception"
        assert runner.metrics()["reward/dropped_groups"] == 1.0


# --- group rewards -------------------------------------------------------------------------------


def test_group_reward_with_per_sample_reward(user_file):
    cfg = RewardConfig(functions=[RewardFunctionConfig("test_longest", weight=2.0),
                                  RewardFunctionConfig("exact_match")])
    # "test_longest" is registered when the user file is imported; import it via search by file
    from rewards.api import resolve_reward

    resolve_reward(f"{user_file}:longest")
    with RewardRunner(cfg) as runner:
        assert runner.has_group_rewards
        runner.check_signatures({"answer": "1"})
        samples, keep = asyncio.run(runner.ascore_group([req("1", "1"), req("22", "1"), req("1", "1")]))
        assert keep
        assert [s.score for s in samples] == [1.0, 2.0, 1.0]
        assert samples[1].info == {"test_longest": 1.0, "exact_match": 0.0}
        with pytest.raises(TypeError, match="ascore_group"):
            runner.score([req("1", "1")])


def test_group_reward_failures(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "group_chaos")], timeout_s=0.5)
    with RewardRunner(cfg) as runner:

        async def main():
            return await runner.ascore_groups([
                [req("a", prompt="ok"), req("nan", prompt="ok")],
                [req("a", prompt="raise"), req("b", prompt="raise")],
                [req("a", prompt="short"), req("b", prompt="short")],
                [req("a", prompt="hang"), req("b", prompt="hang")],
                [req("a", prompt="ok")],
            ])

        results = asyncio.run(main())
    kinds = [[s.failure for s in samples] for samples, _ in results]
    assert kinds == [[None, "nan"], ["exception"] * 2, ["not_a_number"] * 2, ["timeout"] * 2, [None]]
    assert "1 scores for 2 responses" in results[2][0][0].detail
    assert all(keep for _, keep in results)  # policy "score" keeps groups


def test_group_flag_from_config(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "longest", group=False)])
    with RewardRunner(cfg) as runner:
        with pytest.raises(RewardSignatureError, match="group=True"):
            runner.check_signatures({"answer": 1})


# --- in-process mode ------------------------------------------------------------------------


def test_in_process_mode_catches_failures(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "chaos")], isolated=False)
    with RewardRunner(cfg) as runner:
        out = runner.score([req(r) for r in ("ok", "raise", "nan", "str", "big", "sysexit")])
        assert [s.failure for s in out] == [None, "exception", "nan", "not_a_number", "oversized", "exception"]
        assert runner._workers == [None]  # no process was started


def test_in_process_async_timeout(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "async_chaos")], isolated=False, timeout_s=0.3)
    with RewardRunner(cfg) as runner:
        out = runner.score([req("hang"), req("ok")])
    assert [s.failure for s in out] == ["timeout", None]


def test_in_process_accepts_a_lambda_free_callable_spec():
    cfg = RewardConfig(functions=[RewardFunctionConfig("rewards.builtin:exact_match")], isolated=False)
    with RewardRunner(cfg) as runner:
        assert runner.score([req("1", 1)])[0].score == 1.0


# --- start-up checks and config -------------------------------------------------------------


def test_signature_checked_at_startup_with_clear_message(user_file):
    with pytest.raises(RewardSignatureError) as e:
        RewardRunner({"functions": [{"fn": f"{user_file}:no_kwargs"}]}, example_row={"solution": "1"})
    msg = str(e.value)
    assert "no_kwargs" in msg and "grove_user_rewards.py" in msg and "answer" in msg and "solution" in msg


def test_bad_spec_fails_at_construction():
    with pytest.raises(RewardSpecError, match="no reward registered"):
        RewardRunner({"functions": [{"fn": "no_such_reward_anywhere"}]})


def test_worker_that_cannot_load_fails_clearly(user_file, monkeypatch):
    monkeypatch.setenv("GROVE_TEST_FAIL_IN_WORKER", "1")
    with RewardRunner({"functions": [{"fn": f"{user_file}:length"}]}) as runner:
        with pytest.raises(RewardWorkerError, match="refuses to load in a worker"):
            runner.score([req("a")])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"on_failure": "ignore"}, "on_failure"),
        ({"num_workers": 0}, "num_workers"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"functions": []}, "functions is empty"),
        # the runner's overlong options are gone: the reward overlong_penalty is the one way
        ({"overlong_max_len": 10, "overlong_cache_len": 4}, "unknown reward config key.*overlong"),
        ({"overlong_factor": 2.0}, "unknown reward config key"),
        ({"max_failure_rate": 1.5}, "max_failure_rate=1.5.*1.0 disables"),
        ({"max_failure_rate": -0.1}, "max_failure_rate"),
        ({"failure_window": 0}, "failure_window=0"),
        ({"failure_min_samples": 0}, "failure_min_samples=0"),
        ({"failure_window": 16, "failure_min_samples": 32}, "failure_min_samples=32.*failure_window=16"),
        ({"bogus": 1}, "unknown reward config key"),
        ({"functions": [{"fn": "exact_match", "wieght": 2}]}, "unknown key"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig.from_any(override)


def test_config_as_hydra_structured_schema():
    omegaconf = pytest.importorskip("omegaconf")
    base = omegaconf.OmegaConf.structured(RewardConfig)
    assert base.functions[0].fn == "exact_match" and base.functions[0].weight == 1.0
    merged = omegaconf.OmegaConf.merge(base, omegaconf.OmegaConf.from_dotlist(
        ["functions=[{fn: regex_format, weight: 0.5, kwargs: {pattern: '^a'}}]", "timeout_s=2"]))
    cfg = RewardConfig.from_any(merged)
    assert cfg.functions == [RewardFunctionConfig("regex_format", 0.5, {"pattern": "^a"})]
    assert cfg.timeout_s == 2.0
    with RewardRunner(merged) as runner:
        assert runner.score([req("abc")])[0].score == 0.5
    assert isinstance(omegaconf.OmegaConf.to_object(merged), RewardConfig)


def test_removed_overlong_options_are_refused_everywhere():
    """reward.overlong_* are gone: the reward overlong_penalty is the one way to shape length."""
    with pytest.raises(TypeError, match="overlong_max_len"):
        RewardConfig(overlong_max_len=10, overlong_cache_len=4)
    with pytest.raises(ValueError, match="overlong_cache_len"):
        RewardConfig.from_any({"overlong_cache_len": 4})
    import omegaconf  # the trainer's config schema

    base = omegaconf.OmegaConf.structured(RewardConfig)
    with pytest.raises(omegaconf.errors.ConfigKeyError, match="overlong_max_len"):
        omegaconf.OmegaConf.merge(base, omegaconf.OmegaConf.from_dotlist(["overlong_max_len=8"]))


def test_astart_starts_every_worker_before_the_first_score(user_file):
    """So a rollout pays the reward processes' start-up before it generates, not during."""
    runner = RewardRunner({"functions": [{"fn": f"{user_file}:length"}], "num_workers": 2})
    try:
        async def go():
            await runner.astart()
            started = [w.proc.pid for w in runner._workers if w is not None and w.proc.poll() is None]
            await runner.astart()  # nothing more to start
            again = [w.proc.pid for w in runner._workers if w is not None]
            scored = await runner.ascore([req("abc")] * 6)
            return started, again, scored, [w.proc.pid for w in runner._workers if w is not None]

        started, again, scored, after = asyncio.run(go())
        assert len(started) == 2 and again == started and after == started  # the same processes score
        assert [s.score for s in scored] == [0.3] * 6
        assert runner.metrics()["reward/worker_restarts"] == 0
    finally:
        runner.close()


def test_close_kills_workers(user_file):
    runner = RewardRunner({"functions": [{"fn": f"{user_file}:length"}], "num_workers": 2})
    runner.score([req("a")] * 4)
    procs = [w.proc for w in runner._workers if w is not None]
    assert procs
    runner.close()
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        runner.score([req("a")])


def _sandbox_boots() -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if b"_sandbox_boot.py" in f.read():
                        found.add(int(name))
            except OSError:
                pass
    return found


def test_code_reward_killed_by_runner_timeout_takes_its_sandbox_down():
    before = _sandbox_boots()
    cfg = RewardConfig(
        functions=[RewardFunctionConfig("code_tests", kwargs={"wall_time_s": 30, "cpu_time_s": 30})],
        timeout_s=1.0,
    )
    row = {"tests": [{"input": "", "output": "x"}]}
    with RewardRunner(cfg, example_row=row) as runner:
        # the first sleeper is killed with its worker; the second times out in a thread of the
        # parallel mode, and its worker (with the sandbox) is replaced after the batch
        out = runner.score([RewardRequest("p", "import time\ntime.sleep(30)", fields=row),
                            RewardRequest("p", "import time\ntime.sleep(31)", fields=row),
                            RewardRequest("p", "print('x')", fields=row)])
        assert [s.failure for s in out] == ["timeout", "timeout", None]
        assert out[2].score == 1.0 and out[2].info["passed"] == 1.0
        assert runner.metrics()["reward/worker_restarts"] == 2
    deadline = time.monotonic() + 3
    while _sandbox_boots() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _sandbox_boots() - before, "the sandbox outlived its killed reward worker"


# --- hanging rewards time out concurrently --------------------------------------------------


def test_always_hanging_reward_costs_about_two_timeouts_not_one_per_sample(user_file):
    """40 samples x timeout_s=1 would be 40 s one at a time: after the first timeout the rest
    run in parallel, each in its own thread, and time out together."""
    cfg = RewardConfig(functions=[fn(user_file, "sleepy")], timeout_s=1.0, num_workers=1,
                       max_failure_rate=1.0)  # no alarm: this test is about the time
    with RewardRunner(cfg) as runner:
        runner.score([req("warm")])  # start the worker: the bound is on scoring, not start-up
        t0 = time.perf_counter()
        out = runner.score([req(f"hang{i}") for i in range(40)])
        elapsed = time.perf_counter() - t0
        assert elapsed < 4.0, f"{elapsed:.1f} s for 40 hanging samples"
        assert [s.failure for s in out] == ["timeout"] * 40
        assert all("timeout_s=1.0" in s.detail and s.score == 0.0 for s in out)
        m = runner.metrics()
        assert m["reward/failures/timeout"] == 40 and m["reward/samples"] == 41
        # one kill in the sequential mode, one replacement after the parallel batch
        assert m["reward/worker_restarts"] == 2


def test_healthy_reward_after_a_hanging_phase_returns_to_normal_mode(user_file):
    """`sleepy` scores +100 when it runs off the worker's main thread: that shows the mode."""
    cfg = RewardConfig(functions=[fn(user_file, "sleepy")], timeout_s=0.5)
    with RewardRunner(cfg) as runner:
        out = runner.score([req("hang"), req("hang2"), req("abc")])
        # the first hang in the main thread; the rest in parallel, still with a timeout
        assert [s.failure for s in out] == ["timeout", "timeout", None]
        assert out[2].score == 103.0
        # still suspect (the parallel batch had a timeout): the next call starts in parallel,
        # and since nothing hangs in it, the runner goes back to normal
        out = runner.score([req("ab"), req("abcd")])
        assert [s.score for s in out] == [102.0, 104.0]
        pid = runner._workers[0].proc.pid
        out = runner.score([req("ab"), req("abcd"), req("x")])
        assert [s.score for s in out] == [2.0, 4.0, 1.0] and all(s.failure is None for s in out)
        assert runner._workers[0].proc.pid == pid  # a clean parallel batch keeps its worker


def test_partly_hanging_batch_scores_the_others_correctly(user_file):
    """Sleeping hangs and a busy-loop hang among healthy samples: only the hangers fail."""
    cfg = RewardConfig(functions=[fn(user_file, "sleepy")], timeout_s=0.5, num_workers=2, max_batch_size=8)
    responses = []
    for i in range(40):
        responses.append("spin" if i == 9 else f"hang{i}" if i % 5 == 1 else "x" * (i + 1))
    with RewardRunner(cfg) as runner:
        t0 = time.perf_counter()
        out = runner.score([req(r) for r in responses])
        elapsed = time.perf_counter() - t0
    for r, s in zip(responses, out):
        if r.startswith(("hang", "spin")):
            assert s.failure == "timeout" and s.score == 0.0, (r, s)
        else:
            assert s.failure is None and s.score % 100 == len(r), (r, s)
    # 9 hangers one after another would take 4.5 s at least
    assert elapsed < 4.0, f"{elapsed:.1f} s"


def test_parallel_mode_does_not_time_out_slow_healthy_samples(user_file):
    """10 samples of 100 ms CPU each share one interpreter lock in the parallel mode: 1 s of
    wall time for all, over timeout_s=0.5. Each is charged only its own running time."""
    cfg = RewardConfig(functions=[fn(user_file, "sleepy")], timeout_s=0.5, num_workers=1)
    with RewardRunner(cfg) as runner:
        out = runner.score([req("hang")] + [req("busy:100") for i in range(10)])
    assert out[0].failure == "timeout"
    assert [s.failure for s in out[1:]] == [None] * 10
    assert [s.score for s in out[1:]] == [108.0] * 10  # 100: they did run in parallel threads


def test_run_parallel_charges_each_item_its_own_time(user_file):
    """The worker's parallel runner in this process: with per-thread CPU clocks, slow healthy
    items are not timed out by each other, though some end past timeout_s of wall time."""
    from rewards.api import resolve_reward

    scorer = Scorer([resolve_reward(f"{user_file}:sleepy")], [False], 65536)
    # 10 x 100 ms of CPU under one interpreter lock: the last ends after ~1 s, over timeout_s
    items = [(i, "sample", [0], {"response": "busy:100"}) for i in range(10)]
    fair: list = []
    assert run_parallel(scorer, items, 0.5, fair.append, measure_cpu=True) == 0
    results = [m for m in fair if m[0] == "result"]
    assert sorted(m[1] for m in results) == list(range(10))
    assert all(m[2] == [("ok", 108.0, {})] for m in results)
    assert max(m[3] for m in results) > 0.5  # some did run past timeout_s of wall time


def test_crash_in_parallel_mode_blames_only_the_crasher(user_file):
    """After a timeout, a batch with a crashing sample runs in parallel; the crash cannot be
    pinned on a sample there, so the rest of the call runs one at a time again."""
    cfg = RewardConfig(functions=[fn(user_file, "chaos")], timeout_s=0.5)
    with RewardRunner(cfg) as runner:
        out = runner.score([req("hang"), req("ok"), req("exit"), req("ok"), req("raise"), req("ok")])
    assert [s.failure for s in out] == ["timeout", None, "crashed", None, "exception", None]
    assert "exit code 3" in out[2].detail


# --- the failure-rate alarm -----------------------------------------------------------------


def test_alarm_trips_after_min_samples_of_an_always_failing_reward(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "always_raises", name="broken_grader")])
    with RewardRunner(cfg) as runner:
        out = runner.score([req(str(i)) for i in range(31)])  # under failure_min_samples=32
        assert all(s.failure == "exception" for s in out)
        with pytest.raises(RewardAlarmError) as e:
            runner.score([req("last")])
        msg = str(e.value)
        assert "32 of the last 32 scored samples failed (100%)" in msg
        assert "reward.max_failure_rate=0.5" in msg and "reward.failure_window=256" in msg
        assert "'broken_grader': exception x32" in msg
        assert "ValueError: the grader is broken for 'last'" in msg  # the latest traceback
        assert "reward.max_failure_rate=1.0 disables" in msg
        # the samples were still counted; a caller that goes on starts a fresh window
        assert runner.metrics()["reward/failures/exception"] == 32
        runner.score([req("x")] * 31)


def test_alarm_message_names_each_failing_reward_and_kind(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "chaos")], failure_min_samples=8, failure_window=8,
                       on_failure="drop_group", isolated=False)
    with RewardRunner(cfg) as runner:

        async def main():
            await runner.ascore_group([req("ok"), req("raise"), req("nan"), req("ok")])
            await runner.ascore_group([req("raise"), req("ok"), req("none"), req("raise")])

        with pytest.raises(RewardAlarmError) as e:
            asyncio.run(main())
    msg = str(e.value)
    assert "5 of the last 8 scored samples failed (62%)" in msg
    assert "'chaos': exception x3, nan x1, not_a_number x1" in msg


def test_alarm_counts_ascore_and_ascore_group_samples_alike(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "always_raises")], isolated=False)
    with RewardRunner(cfg) as runner:
        runner.score([req("a")] * 16)

        async def groups(n):
            return await runner.ascore_groups([[req("b")] * 4] * n)

        asyncio.run(groups(3))  # 28 samples so far
        with pytest.raises(RewardAlarmError, match="32 of the last 32"):
            asyncio.run(groups(1))


def test_alarm_does_not_trip_at_30_percent_failures(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "fails_30_percent")])
    with RewardRunner(cfg) as runner:
        for _ in range(3):
            out = runner.score([req(str(i)) for i in range(100)])
        assert sum(s.failed for s in out) == 30
        assert runner.metrics()["reward/failures/exception"] == 90


def test_alarm_trips_just_over_the_rate_within_the_window(user_file):
    """The window is the last `failure_window` samples: old successes leave it."""
    cfg = RewardConfig(functions=[fn(user_file, "fails_on_b")], max_failure_rate=0.25, failure_window=40,
                       failure_min_samples=10, isolated=False)
    with RewardRunner(cfg) as runner:
        runner.score([req("a")] * 30 + [req("b")] * 10)  # 10 of 40: exactly 25%, not more
        with pytest.raises(RewardAlarmError, match="11 of the last 40 scored samples"):
            runner.score([req("b")])  # the oldest success leaves the window


def test_alarm_disabled_with_rate_one_and_applies_under_every_policy(user_file):
    for policy in ("score", "drop_group", "stop"):
        cfg = RewardConfig(functions=[fn(user_file, "always_raises")], on_failure=policy,
                           max_consecutive_failures=1000, isolated=False)
        with RewardRunner(cfg) as runner:
            with pytest.raises(RewardAlarmError):
                runner.score([req("a")] * 40)
    cfg = RewardConfig(functions=[fn(user_file, "always_raises")], max_failure_rate=1.0, isolated=False)
    with RewardRunner(cfg) as runner:
        for _ in range(5):
            out = runner.score([req("a")] * 100)
        assert all(s.failure == "exception" for s in out)


# --- the start-up probe -----------------------------------------------------------------------


def test_probe_raises_naming_a_reward_that_raises(user_file):
    cfg = RewardConfig(functions=[RewardFunctionConfig("exact_match"), fn(user_file, "always_raises")])
    with RewardRunner(cfg) as runner:
        with pytest.raises(RewardProbeError) as e:
            runner.probe({"prompt": "2+2=", "answer": "4"})
        msg = str(e.value)
        assert "reward 'always_raises': exception on row 0" in msg
        assert "ValueError: the grader is broken for '4'" in msg  # the response is the answer
        assert "calls each reward once on the first dataset row" in msg and "'2+2='" in msg
        assert "exact_match" not in msg.split("failed on it:")[1]  # only the failing reward
        m = runner.metrics()
        assert m["reward/samples"] == 0 and m["reward/failures/total"] == 0
    assert isinstance(e.value, ValueError)


def test_probe_passes_a_healthy_reward_with_the_row(user_file):
    for isolated in (True, False):
        cfg = RewardConfig(functions=[fn(user_file, "needs_answer"), RewardFunctionConfig("exact_match")],
                           isolated=isolated)
        with RewardRunner(cfg) as runner:
            assert runner.probe({"prompt": "2+2=", "answer": 4}) is None
            # prompt_key and an explicit response
            runner.probe({"question": "2+2=", "answer": "x"}, prompt_key="question", response="x")
            with pytest.raises(RewardProbeError, match="'needs_answer': exception"):
                runner.probe({"prompt": "2+2=", "answer": 4}, response="5")
            assert runner.metrics()["reward/samples"] == 0


def test_probe_calls_group_rewards_with_a_group_of_one(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "group_chaos", group=True), RewardFunctionConfig("exact_match")])
    with RewardRunner(cfg) as runner:
        runner.probe({"prompt": "ok", "answer": "1"})
        with pytest.raises(RewardProbeError, match="(?s)'group_chaos': exception.*group boom"):
            runner.probe({"prompt": "raise", "answer": "1"})


def test_probe_times_out_a_hanging_reward(user_file):
    cfg = RewardConfig(functions=[fn(user_file, "sleepy")], timeout_s=1.0)
    with RewardRunner(cfg) as runner:
        asyncio.run(runner.astart())  # the bound is on the probe, not the start-up
        t0 = time.perf_counter()
        with pytest.raises(RewardProbeError, match="'sleepy': timeout on row 0"):
            runner.probe({"prompt": "p"}, response="hang")
        assert time.perf_counter() - t0 < 2.5
        m = runner.metrics()
        assert m["reward/worker_restarts"] == 0 and m["reward/failures/timeout"] == 0
        assert runner.score([req("abc")])[0].score == 3.0  # not left in the parallel mode


def test_probe_inside_a_running_event_loop_and_bad_prompt_key(user_file):
    with RewardRunner(RewardConfig(functions=[fn(user_file, "always_raises")])) as runner:

        async def main():
            runner.probe({"prompt": "p"})

        with pytest.raises(RewardProbeError, match="always_raises"):
            asyncio.run(main())
        with pytest.raises(ValueError, match="no field 'question'"):
            runner.probe({"prompt": "p"}, prompt_key="question")
