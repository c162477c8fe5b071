import re

import pytest

from buffer.arithmetic import OPS, ArithmeticSpec, generate_rows, make_arithmetic_dataset
from buffer.datasets import arithmetic_data


def test_rows_are_correct_labelled_and_reproducible():
    spec = ArithmeticSpec(seed=3, num_train=300, num_eval=50)
    rows = generate_rows(spec)
    assert rows == generate_rows(spec)
    assert rows != generate_rows(ArithmeticSpec(seed=4, num_train=300, num_eval=50))
    for row in rows:
        assert row["prompt"].endswith("=")
        left, right = row["prompt"][:-1].split(row["op"])
        assert str(OPS[row["op"]](int(left), int(right))) == row["answer"]
        assert row["difficulty"] == max(len(left), len(right))
        assert row["op"] in spec.ops
        if row["op"] == "*":
            assert row["difficulty"] <= spec.max_digits_mul
    assert {r["difficulty"] for r in rows} == {1, 2}


def test_splits_are_disjoint_hf_datasets():
    ds = make_arithmetic_dataset(ArithmeticSpec(num_train=500, num_eval=100))
    assert ds["train"].num_rows == 500 and ds["test"].num_rows == 100
    assert not set(ds["train"]["prompt"]) & set(ds["test"]["prompt"])
    assert set(ds["train"].column_names) == {"prompt_id", "prompt", "answer", "op", "difficulty"}


def test_bad_specs_fail_clearly():
    with pytest.raises(ValueError, match="unknown operators"):
        generate_rows(ArithmeticSpec(ops=("+", "%")))
    with pytest.raises(ValueError, match="unique arithmetic problems"):
        generate_rows(ArithmeticSpec(ops=("*",), max_digits_mul=1, num_train=200, num_eval=10))


def test_fingerprint_follows_content():
    a = arithmetic_data(ArithmeticSpec(num_train=50, num_eval=5))
    b = arithmetic_data(ArithmeticSpec(num_train=50, num_eval=5))
    c = arithmetic_data(ArithmeticSpec(num_train=50, num_eval=5, seed=1))
    assert a.fingerprint == b.fingerprint != c.fingerprint


# --- arithmetic_steps ------------------------------------------------------------------------

from buffer.arithmetic import StepsSpec, format_steps, generate_steps_rows, make_steps_dataset, solve_steps  # noqa: E402
from buffer.datasets import arithmetic_steps_data  # noqa: E402
from rewards.builtin import steps_answer  # noqa: E402


@pytest.mark.parametrize("operands, ops, steps, answer", [
    ([12, 7, 3, 4], "+*-", [(7, "*", 3, 21), (12, "+", 21, 33), (33, "-", 4, 29)], 29),  # the issue's example
    ([2, 3, 4, 5], "*+*", [(2, "*", 3, 6), (4, "*", 5, 20), (6, "+", 20, 26)], 26),  # every * first, left to right
    ([2, 3, 4], "**", [(2, "*", 3, 6), (6, "*", 4, 24)], 24),  # a chain, left to right
    ([10, 2, 3], "--", [(10, "-", 2, 8), (8, "-", 3, 5)], 5),  # left to right: not 10-(2-3)
    ([9, 8, 2, 3], "-*+", [(8, "*", 2, 16), (9, "-", 16, -7), (-7, "+", 3, -4)], -4),  # solve_steps itself allows < 0
])
def test_steps_follow_precedence_then_left_to_right(operands, ops, steps, answer):
    assert solve_steps(operands, list(ops)) == (steps, answer)
    assert eval("".join(f"{x}{op}" for x, op in zip(operands, ops)) + str(operands[-1])) == answer


def test_the_issue_example_formats_as_documented():
    steps, answer = solve_steps([12, 7, 3, 4], ["+", "*", "-"])
    assert format_steps(steps, answer) == "7*3=21;12+21=33;33-4=29;#29"


def test_steps_rows_are_correct_labelled_bounded_and_reproducible():
    spec = StepsSpec(seed=3, num_train=600, num_eval=100)
    rows = generate_steps_rows(spec)
    assert rows == generate_steps_rows(spec)
    assert rows != generate_steps_rows(StepsSpec(seed=4, num_train=600, num_eval=100))
    for row in rows:
        prompt, target = row["prompt"], row["warmup_target"]
        assert prompt.endswith("=") and set(prompt[:-1]) <= set("0123456789+-*")  # no division, no signs
        assert eval(prompt[:-1]) == int(row["answer"])  # Python's precedence agrees
        ops = [c for c in prompt if c in "+-*"]
        assert row["difficulty"] == len(ops) and spec.min_ops <= len(ops) <= spec.max_ops
        written, final = target.split("#")
        assert final == row["answer"]
        steps = written.split(";")[:-1]
        assert len(steps) == len(ops) and written.endswith(";")
        assert not re.search(r"(^|[^0-9])-", target)  # every "-" subtracts: no negative numbers
        for step in steps:
            left, c = step.split("=")
            assert eval(left) == int(c) and 0 <= int(c) <= spec.max_value
        assert steps_answer(target, answer=row["answer"]).info == {"format_ok": 1.0, "steps": len(ops),
                                                                   "steps_correct": 1.0}
        for operand_text in prompt[:-1].replace("*", "+").replace("-", "+").split("+"):
            assert 1 <= int(operand_text) <= spec.max_operand
    assert {r["difficulty"] for r in rows} == {2, 3, 4, 5, 6}
    assert set(rows[0]) == {"prompt_id", "prompt", "answer", "warmup_target", "difficulty"}


def test_multiplication_operands_are_single_digits_from_two():
    for row in generate_steps_rows(StepsSpec(num_train=300, num_eval=0)):
        tokens = row["prompt"][:-1].replace("*", " * ").replace("+", " + ").replace("-", " - ").split()
        for i, tok in enumerate(tokens):
            if tok == "*":
                assert 2 <= int(tokens[i - 1]) <= 9 and 2 <= int(tokens[i + 1]) <= 9


def test_response_lengths_follow_the_number_of_steps_and_fit_the_rollout_budget():
    rows = generate_steps_rows(StepsSpec())
    by_level: dict[int, list[int]] = {}
    for row in rows:
        by_level.setdefault(row["difficulty"], []).append(len(row["warmup_target"]) + 1)  # + <eos>
    assert min(min(v) for v in by_level.values()) >= 8
    # 6 steps of at most "999+999=999;" and "#999": 77 tokens with <eos>, within max_tokens=80
    assert max(max(v) for v in by_level.values()) <= 77
    means = [sum(by_level[d]) / len(by_level[d]) for d in sorted(by_level)]
    assert means == sorted(means) and means[-1] > 2 * means[0]  # longer with every step
    counts = [len(by_level[d]) for d in sorted(by_level)]
    assert max(counts) < 1.2 * min(counts)  # difficulty drawn uniformly


def test_steps_splits_are_disjoint_and_fingerprinted():
    ds = make_steps_dataset(StepsSpec(num_train=500, num_eval=100))
    assert ds["train"].num_rows == 500 and ds["test"].num_rows == 100
    assert not set(ds["train"]["prompt"]) & set(ds["test"]["prompt"])
    a = arithmetic_steps_data(StepsSpec(num_train=50, num_eval=5))
    b = arithmetic_steps_data(StepsSpec(num_train=50, num_eval=5))
    c = arithmetic_steps_data(StepsSpec(num_train=50, num_eval=5, seed=1))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.fingerprint != arithmetic_data(ArithmeticSpec(num_train=50, num_eval=5)).fingerprint


def test_bad_steps_specs_fail_clearly():
    with pytest.raises(ValueError, match="unknown operators"):
        generate_steps_rows(StepsSpec(ops=("+", "/")))
    with pytest.raises(ValueError, match="min_ops"):
        generate_steps_rows(StepsSpec(min_ops=4, max_ops=3))
    with pytest.raises(ValueError, match="max_value"):
        generate_steps_rows(StepsSpec(ops=("*",), min_ops=6, max_ops=6, max_value=50))
    with pytest.raises(ValueError, match="unique expressions"):
        generate_steps_rows(StepsSpec(ops=("+",), min_ops=1, max_ops=1, max_operand=3, num_train=20, num_eval=0))
