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
