"""The reward API: registry, specs in every form (also in a fresh process), signature checks,
result normalisation."""

from __future__ import annotations

import doctest
import functools
import math
import pickle
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest

import rewards.api
from rewards.api import (
    RewardFailure,
    RewardResult,
    RewardSignatureError,
    RewardSpec,
    RewardSpecError,
    check_reward_signature,
    is_group_reward,
    normalize_result,
    register_reward,
    registered_rewards,
    resolve_reward,
)
from rewards.builtin import exact_match

ROW = {"prompt": "2+2=", "answer": "4", "difficulty": 1, "op": "+"}


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """A user's own reward file and package, outside the repo."""
    tmp_path = tmp_path_factory.mktemp("user")
    (tmp_path / "my_reward.py").write_text(textwrap.dedent(
        """
        from rewards.api import RewardResult, register_reward

        def my_fn(response, answer, **kwargs):
            return float(response.strip() == answer)

        def scaled(response, answer, scale=1.0, **kwargs):
            return scale * float(response.strip() == answer)

        class Judge:
            @staticmethod
            def score(response, **kwargs):
                return RewardResult(0.5, {"len": len(response)})

        @register_reward("user_registered_len")
        def by_len(response, **kwargs):
            return len(response)

        NOT_CALLABLE = 3
        """
    ))
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scoring.py").write_text("def half(**kwargs):\n    return 0.5\n")
    return tmp_path


# --- registry -------------------------------------------------------------------------------


def test_builtins_are_registered():
    names = registered_rewards()
    for n in ("exact_match", "math_verify", "regex_format", "overlong_penalty", "code_tests"):
        assert n in names


def test_register_decorator_forms():
    @register_reward
    def bare_name_reward_for_test(response, **kw):
        return 1.0

    @register_reward("named_reward_for_test", group=True)
    def g(prompt, responses, **kw):
        return [1.0] * len(responses)

    reg = registered_rewards()
    assert reg["bare_name_reward_for_test"] is bare_name_reward_for_test
    assert reg["named_reward_for_test"] is g
    assert is_group_reward(g) and not is_group_reward(bare_name_reward_for_test)
    assert is_group_reward(functools.partial(g, x=1))


def test_register_name_clash_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        @register_reward("exact_match")
        def other(response, **kw):
            return 0.0


# --- specs ----------------------------------------------------------------------------------


def test_registered_name_resolves():
    spec = RewardSpec.parse("exact_match")
    assert spec.target == "rewards.builtin:exact_match" and spec.name == "exact_match"
    assert spec.resolve() is exact_match


def test_dotted_path_both_forms():
    a = RewardSpec.parse("rewards.builtin.exact_match")
    b = RewardSpec.parse("rewards.builtin:exact_match")
    assert a.target == b.target == "rewards.builtin:exact_match"
    assert a.resolve() is b.resolve() is exact_match


def test_external_file_absolute_and_relative(user_dir):
    spec = RewardSpec.parse(f"{user_dir}/my_reward.py:my_fn")
    fn = spec.resolve()
    assert fn(response=" 4 ", answer="4") == 1.0
    rel = RewardSpec.parse("my_reward.py:my_fn", cwd=str(user_dir))
    assert rel.target == spec.target
    via_search = RewardSpec.parse("my_reward.py:my_fn", search_paths=[str(user_dir)])
    assert via_search.target == spec.target
    assert str(user_dir) in spec.sys_path


def test_external_package_dotted_with_search_paths(user_dir):
    spec = RewardSpec.parse("userpkg.scoring.half", search_paths=[str(user_dir)])
    assert spec.target == "userpkg.scoring:half"
    assert spec.resolve()() == 0.5
    assert RewardSpec.parse("userpkg.scoring:half", search_paths=[str(user_dir)]).resolve()() == 0.5


def test_attribute_chain_in_file(user_dir):
    fn = resolve_reward(f"{user_dir}/my_reward.py:Judge.score")
    assert fn(response="abc") == RewardResult(0.5, {"len": 3})


def test_dict_target_binds_kwargs(user_dir):
    spec = RewardSpec.parse({"_target_": f"{user_dir}/my_reward.py:scaled", "scale": 3.0})
    assert spec.kwargs == {"scale": 3.0}
    assert spec.resolve()(response="4", answer="4") == 3.0
    fn = resolve_reward({"_target_": "rewards.builtin.regex_format", "pattern": "^a"})
    assert isinstance(fn, functools.partial) and fn(response="abc") == 1.0


def test_callable_spec_becomes_importable(user_dir):
    fn = resolve_reward(f"{user_dir}/my_reward.py:my_fn")
    spec = RewardSpec.parse(fn)
    assert spec.target.endswith("my_reward.py:my_fn")
    assert RewardSpec.parse(exact_match).target == "rewards.builtin:exact_match"
    spec = RewardSpec.parse(functools.partial(exact_match, answer="1"))
    assert spec.kwargs == {"answer": "1"}


def test_registered_user_function_by_name(user_dir):
    resolve_reward(f"{user_dir}/my_reward.py:my_fn")  # importing the file registers its rewards
    spec = RewardSpec.parse("user_registered_len")
    assert spec.target.endswith("my_reward.py:by_len")
    assert spec.resolve()(response="abc") == 3


def test_lambda_spec_is_refused_with_advice():
    with pytest.raises(RewardSpecError, match="isolated=false"):
        RewardSpec.parse(lambda response, **kw: 1.0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_reward", "no reward registered as 'no_such_reward'"),
        ("nopkg_xyz.mod.fn", "no importable module"),
        ("nopkg_xyz.mod:fn", "cannot import module 'nopkg_xyz.mod'"),
        ("/nonexistent/dir/r.py:fn", "not found"),
        ("rewards.builtin:nope", "has no attribute 'nope'"),
        ("", "must be a name"),
        ({"fn": "x"}, "without '_target_'"),
    ],
)
def test_bad_specs_fail_clearly(spec, message):
    with pytest.raises(RewardSpecError, match=message):
        RewardSpec.parse(spec).resolve()


def test_not_callable_target(user_dir):
    with pytest.raises(RewardSpecError, match="not a function"):
        resolve_reward(f"{user_dir}/my_reward.py:NOT_CALLABLE")


def test_spec_pickles_and_resolves_in_a_fresh_process(user_dir, tmp_path_factory):
    specs = [
        RewardSpec.parse("exact_match"),
        RewardSpec.parse(f"{user_dir}/my_reward.py:scaled", kwargs={"scale": 2.0}),
        RewardSpec.parse("userpkg.scoring:half", search_paths=[str(user_dir)]),
    ]
    blob = tmp_path_factory.mktemp("blob") / "specs.pkl"
    blob.write_bytes(pickle.dumps(specs))
    repo = rewards.api.__file__.rsplit("/rewards/", 1)[0]
    code = textwrap.dedent(
        f"""
        import pickle, sys
        sys.path.insert(0, {repo!r})
        specs = pickle.load(open({str(blob)!r}, 'rb'))
        fns = [s.resolve() for s in specs]
        print(fns[0](response='4', answer='4'), fns[1](response='4', answer='4'), fns[2]())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1.0", "2.0", "0.5"]


# --- signatures -----------------------------------------------------------------------------


def test_signature_ok_for_builtins_and_kwargs():
    check_reward_signature(exact_match, ROW)
    check_reward_signature(lambda response, answer: 1.0, ROW)  # no **kwargs: called with what it names
    check_reward_signature(lambda response, prompt_ids=None, **kw: 1.0, ROW)
    check_reward_signature(lambda prompt, responses, **kw: [1.0], ROW, group=True)


def test_signature_missing_field_message(user_dir):
    def needs_solution(response, solution, **kwargs):
        return 1.0

    with pytest.raises(RewardSignatureError) as e:
        check_reward_signature(needs_solution, ROW, name="mine")
    msg = str(e.value)
    assert isinstance(e.value, TypeError)
    assert "needs_solution" in msg and "test_rewards_api.py" in msg and "'mine'" in msg
    assert "solution" in msg.split("does not supply:")[1].splitlines()[0]
    assert "available keyword arguments: prompt, response, prompt_ids, response_ids, finish_reason, answer, difficulty, op" in msg


def test_signature_positional_only_and_group_hints():
    def posonly(response, /, **kwargs):
        return 1.0

    with pytest.raises(RewardSignatureError, match="positional-only"):
        check_reward_signature(posonly, ROW)

    def looks_group(prompt, responses, **kwargs):
        return [1.0]

    with pytest.raises(RewardSignatureError, match="group=True"):
        check_reward_signature(looks_group, ROW)
    with pytest.raises(RewardSignatureError, match="not 'response'"):
        check_reward_signature(exact_match, ROW, group=True)


def test_signature_with_bound_kwargs():
    check_reward_signature(functools.partial(rewards.builtin.regex_format, pattern="x"), ROW)
    with pytest.raises(RewardSignatureError, match="pattern"):
        check_reward_signature(rewards.builtin.regex_format, ROW)


# --- results --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (1, (1.0, {})),
        (True, (1.0, {})),
        (0.25, (0.25, {})),
        (np.float32(0.5), (0.5, {})),
        (np.int64(2), (2.0, {})),
        (Fraction(1, 4), (0.25, {})),
        (RewardResult(1.0, {"a": 2}), (1.0, {"a": 2.0})),
        ({"score": 0.5, "len": 3}, (0.5, {"len": 3.0})),
    ],
)
def test_normalize_accepts_numbers(value, expected):
    assert normalize_result(value) == expected


@pytest.mark.parametrize(
    "value, kind",
    [
        (math.nan, "nan"),
        (math.inf, "nan"),
        (-math.inf, "nan"),
        ("1.0", "not_a_number"),
        (None, "not_a_number"),
        ([1.0], "not_a_number"),
        (np.array([1.0]), "not_a_number"),
        (RewardResult(1.0, {"x": "high"}), "not_a_number"),
        (RewardResult(1.0, {1: 2.0}), "not_a_number"),
        (RewardResult(math.nan), "nan"),
    ],
)
def test_normalize_rejects(value, kind):
    with pytest.raises(RewardFailure) as e:
        normalize_result(value)
    assert e.value.kind == kind


def test_api_doctests():
    res = doctest.testmod(rewards.api, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0 and res.attempted > 0
