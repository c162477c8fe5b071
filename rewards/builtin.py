"""Built-in rewards, registered by name: ``exact_match``, ``steps_answer``, ``math_verify``,
``regex_format``, ``overlong_penalty`` and ``code_tests``.

Each is an ordinary reward function (see :mod:`rewards.api`); arguments that are not dataset
fields (``pattern``, ``max_len``, ...) are bound from the config's ``kwargs``::

    reward:
      functions:
        - {fn: math_verify}
        - {fn: regex_format, weight: 0.1, kwargs: {pattern: '^<think>.*</think>.*\\\\boxed\\{.*\\}'}}
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from functools import lru_cache
from typing import Any

from rewards.api import RewardResult, register_reward

__all__ = [
    "code_tests",
    "exact_match",
    "extract_code",
    "math_verify",
    "overlong_penalty",
    "overlong_shaping",
    "regex_format",
    "steps_answer",
]


@register_reward("exact_match")
def exact_match(response: str, answer: Any, **kwargs: Any) -> float:
    """1.0 if the response equals the answer after stripping surrounding whitespace, else 0.0.

    The verifier of the built-in arithmetic task (rows have ``prompt``, ``answer``,
    ``difficulty``, ``op``).

    >>> exact_match(" 42\\n", answer=42)
    1.0
    >>> exact_match("41", answer="42")
    0.0
    """
    return 1.0 if response.strip() == str(answer).strip() else 0.0


_STEP = re.compile(r"(-?\d+)([-+*])(-?\d+)=(-?\d+)")
_ANSWER = re.compile(r"-?\d+")
_STEP_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@register_reward("steps_answer")
def steps_answer(response: str, answer: Any, *, require_steps: bool = False, **kwargs: Any) -> RewardResult:
    """1.0 if the integer after the response's last ``#`` equals the answer, else 0.0.

    The verifier of the built-in ``arithmetic_steps`` task, whose responses write one step per
    operation and then the final answer: ``7*3=21;12+21=33;33-4=29;#29``. Only the final answer
    is scored (surrounding whitespace ignored; ``029`` or ``29.0`` are wrong). Info, for
    logging: ``format_ok`` (1.0 if the whole response is ``step;step;...;#<int>``),
    ``steps`` (how many steps it wrote before the last ``#``) and ``steps_correct`` (the
    fraction of those, split on ``;``, that read ``a<op>b=c`` with ``c`` right; 0.0 for none).
    A response with no ``#`` scores 0.0; its steps are still counted.
    With ``require_steps=True`` (config ``kwargs``) the score also needs ``format_ok`` and
    every step right.

    >>> r = steps_answer("7*3=21;12+21=33;33-4=29;#29", answer="29")
    >>> r.score, r.info["format_ok"], r.info["steps_correct"]
    (1.0, 1.0, 1.0)
    >>> r = steps_answer("7*3=21;12+21=34;34-4=29;#29", answer=29)  # right answer, 2 wrong steps
    >>> r.score, r.info["steps_correct"]
    (1.0, 0.3333333333333333)
    >>> steps_answer("7*3=21;12+21=33;#33", answer="29").score
    0.0
    """
    text = response.strip()
    body, hash_, final = text.rpartition("#")
    if not hash_:  # no final answer (e.g. cut off at max_tokens): its steps still count for info
        body, final = text, ""
    correct = bool(hash_) and final.strip() == str(answer).strip() and bool(_ANSWER.fullmatch(final.strip()))
    written = [s for s in body.split(";") if s.strip()]
    right = 0
    for step in written:
        m = _STEP.fullmatch(step.strip())
        right += bool(m) and _STEP_OPS[m.group(2)](int(m.group(1)), int(m.group(3))) == int(m.group(4))
    format_ok = (
        bool(hash_)
        and bool(_ANSWER.fullmatch(final))
        and (body == "" or (body.endswith(";") and all(_STEP.fullmatch(s) for s in body[:-1].split(";"))))
    )
    steps_correct = right / len(written) if written else 0.0
    if require_steps:
        correct = correct and format_ok and right == len(written)
    info = {"format_ok": float(format_ok), "steps": float(len(written)), "steps_correct": steps_correct}
    return RewardResult(1.0 if correct else 0.0, info)


# --- math ------------------------------------------------------------------------------------


def _load_math_verify():
    import math_verify  # noqa: F401 - imported for its side effect of loading sympy once

    return math_verify


@lru_cache(maxsize=4096)
def _parse_gold(answer: str, timeout: int | None):
    mv = _load_math_verify()
    gold = mv.parse(answer, parsing_timeout=timeout)
    if not gold and "$" not in answer and "\\boxed" not in answer:
        gold = mv.parse(f"${answer}$", parsing_timeout=timeout)
    return gold


@register_reward("math_verify")
def math_verify(response: str, answer: Any, **kwargs: Any) -> float:
    """1.0 if the response's final answer is mathematically equal to ``answer``, via math-verify.

    The prediction is extracted from the response with ``\\boxed{...}`` first, then LaTeX
    ``$...$``, then plain expressions. ``answer`` may be bare (``"1/2"``, ``"\\frac{1}{2}"``) or
    boxed. A gold answer that cannot be parsed raises ``ValueError`` (a data problem, reported
    as an ``exception`` failure, not a silent 0).

    >>> math_verify("so the answer is \\\\boxed{\\\\frac{1}{2}}", answer="0.5")
    1.0
    >>> math_verify("I get \\\\boxed{3}", answer="2")
    0.0
    """
    mv = _load_math_verify()
    # math-verify's own timeouts use SIGALRM, which exists only in the main thread; elsewhere
    # (in-process runner threads) the runner's timeout is the guard.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = _parse_gold(str(answer), timeout)
    if not gold:
        raise ValueError(f"math_verify: cannot parse the gold answer {str(answer)[:200]!r}")
    pred = mv.parse(
        response,
        extraction_config=[mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()],
        extraction_mode="first_match",
        parsing_timeout=timeout,
    )
    if not pred:
        return 0.0
    return 1.0 if mv.verify(gold, pred, timeout_seconds=timeout) else 0.0


math_verify.__grove_warmup__ = _load_math_verify  # workers import sympy before the first call


# --- format ----------------------------------------------------------------------------------

_FLAGS = {"s": re.DOTALL, "m": re.MULTILINE, "i": re.IGNORECASE, "x": re.VERBOSE}


@lru_cache(maxsize=256)
def _compile(pattern: str, flags: str) -> re.Pattern:
    value = 0
    for f in flags:
        value |= _FLAGS[f]
    return re.compile(pattern, value)


@register_reward("regex_format")
def regex_format(response: str, *, pattern: str, mode: str = "search", flags: str = "s", **kwargs: Any) -> float:
    """1.0 if the response matches ``pattern``, else 0.0.

    ``mode`` is ``"search"`` (anywhere), ``"match"`` (at the start) or ``"fullmatch"``;
    ``flags`` is a string of ``s`` (DOTALL, the default), ``m``, ``i``, ``x``.

    >>> regex_format("<think>hm</think> 4", pattern=r"^<think>.*</think>")
    1.0
    >>> regex_format("4", pattern=r"<think>", mode="fullmatch")
    0.0
    """
    if mode not in ("search", "match", "fullmatch"):
        raise ValueError(f"regex_format: mode must be search, match or fullmatch, not {mode!r}")
    return 1.0 if getattr(_compile(pattern, flags), mode)(response) else 0.0


# --- overlong shaping (DAPO) -----------------------------------------------------------------


def overlong_shaping(length: int, max_len: int, cache_len: int) -> float:
    """DAPO's soft overlong punishment R_len for a response of ``length`` tokens.

    0 if L <= max_len - cache_len; (max_len - cache_len - L) / cache_len in between; -1 if
    L > max_len. The reward :func:`overlong_penalty` adds it, times a factor.

    >>> overlong_shaping(80, max_len=100, cache_len=20)
    0.0
    >>> overlong_shaping(90, max_len=100, cache_len=20)
    -0.5
    >>> overlong_shaping(101, max_len=100, cache_len=20)
    -1.0
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"overlong shaping needs 0 < cache_len <= max_len, got {cache_len}, {max_len}")
    expected = max_len - cache_len
    if length <= expected:
        return 0.0
    if length <= max_len:
        return (expected - length) / cache_len
    return -1.0


@register_reward("overlong_penalty")
def overlong_penalty(
    response: str = "", response_ids: list[int] | None = None, *, max_len: int, cache_len: int,
    factor: float = 1.0, **kwargs: Any,
) -> float:
    """DAPO's overlong reward shaping: ``factor * overlong_shaping(len(response_ids), max_len,
    cache_len)``, a reward to list next to the task's reward (the one way to get this shaping)::

        reward.functions=[{fn: exact_match}, {fn: overlong_penalty, kwargs: {max_len: 4096, cache_len: 512}}]

    Uses the response's token count when ``response_ids`` are given, else its character count.
    ``max_len`` is DAPO's L_max, ``cache_len`` its L_cache (``0 < cache_len <= max_len``).

    >>> overlong_penalty(response_ids=[0] * 90, max_len=100, cache_len=20)
    -0.5
    >>> overlong_penalty(response_ids=[0] * 101, max_len=100, cache_len=20, factor=0.5)
    -0.5
    """
    length = len(response_ids) if response_ids is not None else len(response)
    return factor * overlong_shaping(length, max_len, cache_len)


# --- code ------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str, language: str = "python") -> str:
    """The last fenced code block (preferring ones tagged ``language``), else the whole text.

    >>> extract_code("try:\\n```python\\nprint(1)\\n```\\n")
    'print(1)\\n'
    """
    blocks = _FENCE.findall(response)
    tagged = [code for tag, code in blocks if tag.lower() in (language, language[:2])]
    if tagged:
        return tagged[-1]
    if blocks:
        return blocks[-1][1]
    return response


def _normalise_output(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return lines


def _load_tests(tests: Any) -> tuple[str, list]:
    """``("io", [(stdin, expected_stdout), ...])`` or ``("assert", [statement, ...])``."""
    if isinstance(tests, str):
        stripped = tests.strip()
        if stripped[:1] in "[{":
            try:
                return _load_tests(json.loads(stripped))
            except ValueError:
                pass
        return "assert", [tests]
    if isinstance(tests, dict):
        if "fn_name" in tests:
            raise ValueError("code_tests: call-based tests (fn_name) are not supported; use stdin/stdout or asserts")
        inputs, outputs = tests.get("inputs"), tests.get("outputs")
        if inputs is None or outputs is None or len(inputs) != len(outputs):
            raise ValueError("code_tests: a dict of tests needs 'inputs' and 'outputs' lists of equal length")
        return "io", [(str(i), str(o)) for i, o in zip(inputs, outputs)]
    if isinstance(tests, (list, tuple)):
        if all(isinstance(t, str) for t in tests):
            return "assert", list(tests)
        if all(isinstance(t, dict) for t in tests):
            return "io", [(str(t.get("input", t.get("stdin", ""))), str(t.get("output", t.get("stdout", ""))))
                          for t in tests]
    raise ValueError(f"code_tests: unsupported tests format {type(tests).__name__}")


_ASSERT_HARNESS = """

def __grove_run_tests(__tests):
    __passed = 0
    for __t in __tests:
        try:
            exec(__t, globals())
            __passed += 1
        except BaseException:
            pass
    print({marker!r}, __passed, flush=True)

__grove_run_tests({tests!r})
"""


@register_reward("code_tests")
def code_tests(
    response: str,
    tests: Any = None,
    *,
    mode: str = "fraction",
    cpu_time_s: float = 2.0,
    wall_time_s: float = 5.0,
    memory_mb: int = 512,
    max_tests: int | None = None,
    **kwargs: Any,
) -> RewardResult:
    """Run the response's Python code against test cases in the sandbox (:mod:`rewards.sandbox`).

    ``tests`` (or a row field ``test_cases`` / ``input_output``) is one of:

    * stdin/stdout pairs: ``[{"input": "1 2\\n", "output": "3"}, ...]`` or
      ``{"inputs": [...], "outputs": [...]}`` (APPS/TACO style), possibly as a JSON string;
      outputs are compared line by line, ignoring trailing whitespace; one fresh sandbox each;
    * assert statements: ``["assert add(1, 2) == 3", ...]`` or one string of code; run after
      the code, in one sandbox. The code runs in the same process as these asserts, so a
      program written to cheat can fake them: prefer stdin/stdout tests where that matters.

    Score: the fraction of tests passed (``mode="fraction"``) or 1.0 only if all pass
    (``mode="all"``). Info: ``passed``, ``total``, ``timeouts``. Each run gets
    ``cpu_time_s``/``wall_time_s``/``memory_mb``; set the runner's ``timeout_s`` above
    ``len(tests) * wall_time_s``.

    >>> r = code_tests("```python\\nprint(sum(map(int, input().split())))\\n```",
    ...                tests=[{"input": "1 2", "output": "3"}])      # doctest: +SKIP
    >>> r.score, r.info["passed"]                                    # doctest: +SKIP
    (1.0, 1.0)
    """
    from rewards.sandbox import SandboxLimits, run_untrusted

    if tests is None:
        tests = kwargs.get("test_cases", kwargs.get("input_output"))
    if tests is None:
        raise ValueError("code_tests: no tests given (pass `tests`, or a row field test_cases / input_output)")
    if mode not in ("fraction", "all"):
        raise ValueError(f"code_tests: mode must be 'fraction' or 'all', not {mode!r}")
    kind, cases = _load_tests(tests)
    if max_tests is not None:
        cases = cases[:max_tests]
    if not cases:
        raise ValueError("code_tests: the test list is empty")
    code = extract_code(response)
    limits = SandboxLimits(cpu_time_s=cpu_time_s, wall_time_s=wall_time_s, memory_bytes=memory_mb * 2**20)
    passed = timeouts = 0
    if kind == "io":
        for stdin, expected in cases:
            r = run_untrusted(code, stdin=stdin, limits=limits)
            timeouts += r.killed_reason in ("wall_time", "cpu_time")
            passed += r.ok and _normalise_output(r.stdout) == _normalise_output(expected)
    else:
        marker = "__grove_tests_passed_" + secrets.token_hex(8)
        program = code + _ASSERT_HARNESS.format(marker=marker, tests=list(cases))
        r = run_untrusted(program, limits=limits)
        timeouts += r.killed_reason in ("wall_time", "cpu_time")
        for line in reversed(r.stdout.splitlines()):
            if line.startswith(marker + " "):
                passed = min(int(line.split()[1]), len(cases))
                break
    total = len(cases)
    score = passed / total if mode == "fraction" else float(passed == total)
    return RewardResult(score, {"passed": float(passed), "total": float(total), "timeouts": float(timeouts)})
