"""Built-in rewards: exact match, math-verify, regex format, DAPO overlong shaping, code tests."""

from __future__ import annotations

import doctest
import json

import pytest

import rewards.builtin
from rewards.builtin import (
    code_tests,
    exact_match,
    extract_code,
    math_verify,
    overlong_penalty,
    overlong_shaping,
    regex_format,
    steps_answer,
)


def test_doctests():
    res = doctest.testmod(rewards.builtin, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0 and res.attempted >= 8


@pytest.mark.parametrize(
    "response, answer, score",
    [("42", 42, 1.0), (" 42\n", "42", 1.0), ("42", " 42 ", 1.0), ("042", 42, 0.0), ("4 2", "42", 0.0), ("", "", 1.0)],
)
def test_exact_match(response, answer, score):
    assert exact_match(response, answer=answer, difficulty=1, op="+") == score


@pytest.mark.parametrize("response, answer, score, format_ok, steps, steps_correct", [
    ("7*3=21;12+21=33;33-4=29;#29", "29", 1.0, 1.0, 3, 1.0),
    (" 7*3=21;12+21=33;33-4=29;#29\n", 29, 1.0, 1.0, 3, 1.0),  # surrounding whitespace
    ("7*3=21;12+21=33;33-4=28;#28", "29", 0.0, 1.0, 3, 2 / 3),  # wrong final answer, one wrong step
    ("7*3=20;12+20=32;32-4=29;#29", "29", 1.0, 1.0, 3, 1 / 3),  # right answer from wrong steps: scored
    ("#29", "29", 1.0, 1.0, 0, 0.0),  # no steps at all
    ("29", "29", 0.0, 0.0, 1, 0.0),  # no '#': no final answer
    ("7*3=21;12+21=33;33-4=", "29", 0.0, 0.0, 3, 2 / 3),  # cut off at max_tokens
    ("7*3=21;12+21=33;33-4=29;#029", "29", 0.0, 1.0, 3, 1.0),  # not the canonical integer
    ("7*3=21;12+21=33;33-4=29;#29.0", "29", 0.0, 0.0, 3, 1.0),
    ("7*3=21;#33;33-4=29;#29", "29", 1.0, 0.0, 3, 2 / 3),  # the last '#' counts; '#33' is a bad step
    ("7*3=21 12+21=33;#33", "33", 1.0, 0.0, 1, 0.0),  # malformed step
    ("", "29", 0.0, 0.0, 0, 0.0),
    ("#", "29", 0.0, 0.0, 0, 0.0),
    ("5-9=-4;-4+10=6;#6", "6", 1.0, 1.0, 2, 1.0),  # negative numbers parse
    ("7*3=21;12+21=33;#33#", "33", 0.0, 0.0, 3, 2 / 3),  # nothing after the last '#'; '#33' a bad step
])
def test_steps_answer(response, answer, score, format_ok, steps, steps_correct):
    result = steps_answer(response, answer=answer, difficulty=3, prompt="12+7*3-4=", warmup_target="...")
    assert result.score == score
    assert result.info == {"format_ok": format_ok, "steps": steps, "steps_correct": pytest.approx(steps_correct)}


def test_steps_answer_can_require_every_step():
    assert steps_answer("7*3=21;12+21=33;33-4=29;#29", answer="29", require_steps=True).score == 1.0
    assert steps_answer("7*3=20;12+20=32;32-4=29;#29", answer="29", require_steps=True).score == 0.0
    assert steps_answer("7*3=21;12+21=33;33-4=29; #29", answer="29", require_steps=True).score == 0.0


def test_steps_answer_is_registered_and_runs_in_the_runner():
    from rewards.api import resolve_reward
    from rewards.runner import RewardRequest, RewardRunner

    assert resolve_reward("steps_answer") is steps_answer
    cfg = {"functions": [{"fn": "steps_answer"}]}
    row = {"prompt": "2+3*4=", "answer": "14", "warmup_target": "3*4=12;2+12=14;#14", "difficulty": 2}
    with RewardRunner(cfg, example_row=row) as runner:
        good, bad = runner.score([RewardRequest(prompt=row["prompt"], response=r, fields=row)
                                  for r in ("3*4=12;2+12=14;#14", "3*4=12;2+12=15;#15")])
    assert (good.score, bad.score) == (1.0, 0.0)
    assert good.info["steps_correct"] == 1.0 and bad.info["steps_correct"] == 0.5


@pytest.mark.parametrize(
    "response, answer, score",
    [
        ("The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("so $x = 2$ and \\boxed{4}", "4", 1.0),
        ("\\boxed{4}", "\\boxed{4}", 1.0),
        ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
        ("\\boxed{5}", "4", 0.0),
        ("I give up", "4", 0.0),
        ("first 3 then \\boxed{7}", "7", 1.0),  # boxed wins over earlier numbers
    ],
)
def test_math_verify(response, answer, score):
    assert math_verify(response, answer=answer) == score


def test_math_verify_unparseable_gold_raises():
    with pytest.raises(ValueError, match="gold answer"):
        math_verify("\\boxed{1}", answer="")


def test_math_verify_outside_main_thread():
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        assert ex.submit(math_verify, "\\boxed{2}", answer="2").result() == 1.0


def test_regex_format_modes_and_flags():
    pat = r"^<think>.*</think>\s*\\boxed\{.+\}$"
    assert regex_format("<think>a\nb</think> \\boxed{3}", pattern=pat) == 1.0
    assert regex_format("\\boxed{3}", pattern=pat) == 0.0
    assert regex_format("xx ANSWER", pattern="answer", flags="i") == 1.0
    assert regex_format("xx answer", pattern="answer", mode="match") == 0.0
    assert regex_format("answer", pattern="answer", mode="fullmatch") == 1.0
    with pytest.raises(ValueError, match="mode"):
        regex_format("a", pattern="a", mode="nope")


@pytest.mark.parametrize(
    "length, expected",
    [(0, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (100, -1.0), (101, -1.0), (10_000, -1.0)],
)
def test_overlong_shaping_matches_dapo(length, expected):
    # L_max = 100, L_cache = 20: 0 up to 80, linear to -1 at 100, -1 beyond
    assert overlong_shaping(length, max_len=100, cache_len=20) == pytest.approx(expected)


def test_overlong_penalty_reward_and_errors():
    assert overlong_penalty(response_ids=[1] * 90, max_len=100, cache_len=20, factor=0.5) == pytest.approx(-0.25)
    assert overlong_penalty(response="x" * 90, max_len=100, cache_len=20) == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        overlong_shaping(5, max_len=10, cache_len=0)
    with pytest.raises(ValueError):
        overlong_penalty(response_ids=[1] * 5, max_len=10, cache_len=11)


def _dapo_r_len(length: int, l_max: int, l_cache: int) -> float:
    """DAPO (arXiv 2503.14476) eq. 13, written out independently."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return ((l_max - l_cache) - length) / l_cache
    return -1.0


@pytest.mark.parametrize("factor", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("l_max, l_cache", [(100, 20), (4096, 512), (16, 16), (10, 1)])
def test_overlong_penalty_is_dapo_r_len_on_the_token_count(l_max, l_cache, factor):
    """The one implementation of DAPO's overlong shaping (the runner's overlong_* options are
    gone). The token count wins over the text: here the text is always short."""
    for length in sorted({0, 1, l_max - l_cache, l_max - l_cache + 1, (2 * l_max - l_cache) // 2,
                          l_max - 1, l_max, l_max + 1, 3 * l_max}):
        if length < 0:
            continue
        got = overlong_penalty(response="x", response_ids=[7] * length, max_len=l_max, cache_len=l_cache,
                               factor=factor)
        assert got == pytest.approx(factor * _dapo_r_len(length, l_max, l_cache)), length


def test_extract_code():
    assert extract_code("a\n```python\nx=1\n```\nb\n```py\nx=2\n```") == "x=2\n"
    assert extract_code("```\ny=1\n```") == "y=1\n"
    assert extract_code("print(3)") == "print(3)"
    assert extract_code("```js\nno\n```\n```python\nyes\n```\n```text\nlog\n```") == "yes\n"


SUM = "```python\nimport sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n```"


def test_code_tests_stdin_stdout():
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}, {"input": "1 1", "output": "3"}]
    r = code_tests(SUM, tests=tests)
    assert r.score == pytest.approx(2 / 3)
    assert r.info == {"passed": 2.0, "total": 3.0, "timeouts": 0.0}
    assert code_tests(SUM, tests=tests, mode="all").score == 0.0


def test_code_tests_apps_format_json_and_row_field():
    io = json.dumps({"inputs": ["2 3"], "outputs": ["5"]})
    assert code_tests(SUM, input_output=io).score == 1.0
    assert code_tests(SUM, test_cases=[{"input": "2 2", "output": "4"}]).score == 1.0


def test_code_tests_asserts_and_timeouts():
    code = "```python\ndef add(a, b):\n    return a + b\n```"
    r = code_tests(code, tests=["assert add(1, 2) == 3", "assert add(1, 1) == 3", "assert add(0, 0) == 0"])
    assert r.info["passed"] == 2.0 and r.score == pytest.approx(2 / 3)
    hang = code_tests("while True: pass", tests=[{"input": "", "output": "x"}], cpu_time_s=0.5, wall_time_s=1)
    assert hang.score == 0.0 and hang.info["timeouts"] == 1.0


def test_code_tests_bad_input():
    with pytest.raises(ValueError, match="no tests"):
        code_tests(SUM)
    with pytest.raises(ValueError, match="fn_name"):
        code_tests(SUM, tests={"fn_name": "f", "inputs": [], "outputs": []})
    with pytest.raises(ValueError, match="empty"):
        code_tests(SUM, tests=[])
