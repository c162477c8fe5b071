"""task=gsm8k (configs/task/gsm8k.yaml, docs/recipes/gsm8k.md) without a GPU: the config
composes with a real-model profile, GSM8K-format JSONL and parquet files load, the start-up
check passes on them, `math_verify` scores right and wrong answers correctly, and the recipe's
chat-template preprocessing script works."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from omegaconf import OmegaConf

from rewards.runner import RewardConfig, RewardRequest, RewardRunner
from trainer.cli import CONFIG_DIR, load_config
from trainer.launcher import load_data, preflight

RECIPE = CONFIG_DIR / "task" / "gsm8k.yaml"
DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes" / "gsm8k.md"

# Rows in GSM8K's own format: the solution ends with "#### <number>", after other numbers.
ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
               "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
    {"question": "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she "
                 "needs. Her parents decided to give her $15 for that purpose, and her grandparents twice as much "
                 "as her parents. How much more money does Betty need to buy the wallet?",
     "answer": "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\n"
               "Betty's grandparents gave her 15 * 2 = $<<15*2=30>>30.\n"
               "This means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"},
    {"question": "Jan's farm earns $1500 a day. How much does it earn in 12 days?",
     "answer": "In 12 days it earns 1500 * 12 = $<<1500*12=18000>>18000.\n#### 18000"},
]
FINAL = ["72", "10", "5", "18000"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows) -> Path:
    datasets.Dataset.from_list(list(rows)).to_parquet(str(path))
    return path


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", ROWS), write_parquet(tmp_path / "test.parquet", ROWS[:2])


def compose(files, *extra):
    train, test = files
    return load_config(["model=hf", "model.path=/models/Qwen2.5-0.5B-Instruct", "task=gsm8k",
                        f"task.train_files={train}", f"task.eval_files={test}", "cluster=gpu_local", *extra])


@pytest.mark.parametrize("algorithm", ["grpo", "dapo"])
def test_the_recipe_composes_with_a_real_model_and_the_gpu_profile(files, algorithm):
    cfg = compose(files, f"algorithm={algorithm}")
    assert (cfg.task.name, cfg.task.prompt_key) == ("files", "question")
    assert cfg.task.train_files == str(files[0]) and cfg.task.eval_files == str(files[1])
    assert cfg.model.path == "/models/Qwen2.5-0.5B-Instruct"
    assert cfg.cluster.name == "gpu_local" and cfg.rollout.engine.dtype == "bfloat16" and cfg.trainer.bf16
    assert cfg.algorithm.name == algorithm
    assert cfg.algorithm.dynamic_sampling == (algorithm == "dapo")


def test_the_recipe_alone_composes_with_its_default_file_names():
    cfg = load_config(["task=gsm8k"])
    assert (cfg.task.train_files, cfg.task.eval_files) == ("data/gsm8k/train.jsonl", "data/gsm8k/test.jsonl")


def test_the_recipe_sets_its_reward_lengths_and_learning_rate(files):
    cfg = compose(files)
    assert [f.fn for f in cfg.reward.functions] == ["math_verify"]
    assert (cfg.rollout.max_tokens, cfg.rollout.eval_max_tokens, cfg.rollout.engine.max_model_len) == (1024, 1024, 1536)
    assert cfg.trainer.lr == pytest.approx(1e-6)
    cfg = compose(files, "rollout.max_tokens=256", "trainer.lr=3e-6")  # the command line still wins
    assert (cfg.rollout.max_tokens, cfg.trainer.lr) == (256, 3e-6)


def test_jsonl_and_parquet_rows_load_with_the_question_as_prompt(tmp_path):
    for train, test in ((write_jsonl(tmp_path / "a.jsonl", ROWS), write_parquet(tmp_path / "b.parquet", ROWS)),
                        (write_parquet(tmp_path / "c.parquet", ROWS), write_jsonl(tmp_path / "d.jsonl", ROWS[:1]))):
        data = load_data(compose((train, test)))
        assert [r["question"] for r in data.train] == [r["question"] for r in ROWS]
        assert data.eval[0]["answer"].endswith("#### 72")


def recipe_reward() -> RewardConfig:
    """The reward configs/task/gsm8k.yaml sets, read from the file itself."""
    return RewardConfig.from_any(OmegaConf.to_container(OmegaConf.load(RECIPE).reward))


def test_the_reward_scores_right_and_wrong_answers():
    rows = ROWS
    with RewardRunner(recipe_reward(), example_row=rows[0]) as runner:
        runner.probe(rows[0], prompt_key="question")  # the start-up check `grove train` makes
        cases = []
        for row, final in zip(rows, FINAL):
            wrong = str(int(final) + 1)
            cases += [(row, f"Let me compute step by step. So the answer is \\boxed{{{final}}}.", 1.0),
                      (row, f"Working it out: ... \n#### {final}", 1.0),
                      (row, f"I think it is \\boxed{{{wrong}}}.", 0.0),
                      (row, f"First {final}, then one more: the total is {wrong}.\n#### {wrong}", 0.0),
                      (row, "I don't know.", 0.0)]
        cases.append((rows[3], "So it is \\boxed{18,000} dollars.", 1.0))  # thousands separators
        scored = runner.score([RewardRequest(row["question"], response, fields=row) for row, response, _ in cases])
    for (row, response, expected), result in zip(cases, scored):
        assert result.failure is None, (response, result)
        assert result.score == expected, (row["answer"][-10:], response, result)


def test_the_start_up_check_passes_on_gsm8k_files(tmp_path, files):
    """`preflight` (no engines) on the recipe with a stand-in model folder: rows, reward probe,
    sampler, workflow and transport. The reward is the recipe's own."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = compose(files, f"model.path={model}", "logger=none")
    cfg.reward = recipe_reward()
    data, model_path = preflight(cfg, lambda text: None)
    assert model_path == str(model) and len(data.train) == len(ROWS)


def prep_script() -> str:
    match = re.search(r"<!-- gsm8k-prep -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, "docs/recipes/gsm8k.md has no ```python block after <!-- gsm8k-prep -->"
    return match.group(1)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_the_documented_preprocessing_writes_chat_prompts(tmp_path):
    from trainer.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()  # any tokenizer with a chat template will do
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(tmp_path / "tok")
    script = tmp_path / "prep_gsm8k.py"
    script.write_text(prep_script())
    source = write_parquet(tmp_path / "train.parquet", ROWS)
    target = tmp_path / "train_chat.jsonl"
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "tok"), str(source), str(target)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["answer"] for r in rows] == [r["answer"] for r in ROWS]
    for row in rows:
        assert row["prompt"].startswith("<|im_start|>user\n" + row["question"] + "\n")
        assert "\\boxed{}" in row["prompt"] and row["prompt"].endswith("<|im_start|>assistant\n")
    data = load_data(compose((target, target), "task.prompt_key=prompt"))
    assert data.train[0]["prompt"] == rows[0]["prompt"]
