import pytest

from buffer.datasets import file_data
from buffer.prompts import PromptPool, check_rows

ROWS = [{"prompt_id": str(i), "prompt": f"{i}+0=", "answer": str(i)} for i in range(5)]


def test_pool_visits_every_row_once_per_epoch_and_reshuffles():
    pool = PromptPool(ROWS, n_samples=4, seed=1)
    first = [item.prompt_id for item in pool.next(5)]
    second = [item.prompt_id for item in pool.next(5)]
    assert sorted(first) == sorted(second) == [r["prompt_id"] for r in ROWS]
    assert pool.epoch == 1
    item = pool.next(1, version=7)[0]
    assert item.n_samples == 4 and item.start_version == 7 and item.row["answer"] == item.prompt_id


def test_pool_resumes_from_its_state():
    pool = PromptPool(ROWS, n_samples=2, seed=3)
    pool.next(3)
    state = pool.state_dict()
    expected = [i.prompt_id for i in pool.next(6)]
    resumed = PromptPool(ROWS, n_samples=2, seed=0)
    resumed.load_state_dict(state)
    assert [i.prompt_id for i in resumed.next(6)] == expected


def test_bad_rows_name_the_row_and_field():
    with pytest.raises(ValueError, match="row 1: field 'prompt' must be a non-empty string"):
        check_rows([{"prompt": "ok"}, {"prompt": ""}], "train")
    with pytest.raises(ValueError, match="is empty"):
        check_rows([], "eval")


def test_file_data_loads_jsonl_and_rejects_bad_rows(tmp_path):
    good = tmp_path / "train.jsonl"
    good.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    data = file_data(str(good), str(good))
    assert [r["answer"] for r in data.train] == ["2", "4"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"question": "2+2=", "answer": "4"}\n')
    with pytest.raises(ValueError, match="split 'train' row 1"):
        file_data(str(bad), str(good))
    with pytest.raises(ValueError, match="cannot tell the format"):
        file_data(str(tmp_path / "rows.csv"), str(good))
