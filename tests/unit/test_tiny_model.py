from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.tiny_model import ALPHABET, TinyModelSpec, build_char_tokenizer, build_tiny_model, save_model_folder


def test_char_tokenizer_round_trips_every_character():
    tok = build_char_tokenizer()
    text = ALPHABET + "  12 + 34 = 46\n"
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_saved_folder_loads_back_with_identical_tokenization(tmp_path):
    tok = build_char_tokenizer()
    spec = TinyModelSpec()
    model = build_tiny_model(spec, tok)
    save_model_folder(model, tok, tmp_path)
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "99*9=891 and -5 ?"
    assert loaded_tok.encode(text) == tok.encode(text)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.model_type == "qwen2"
    assert loaded.config.tie_word_embeddings is False  # vLLM-CPU reload leaves tied heads stale
    assert loaded.config.hidden_size // loaded.config.num_attention_heads >= 32
    assert loaded.config.eos_token_id == tok.eos_token_id


def test_head_size_below_what_vllm_accepts_is_refused():
    import pytest

    with pytest.raises(ValueError, match="head size"):
        build_tiny_model(TinyModelSpec(hidden_size=64, num_heads=4), build_char_tokenizer())


# --- the model each built-in task gets --------------------------------------------------------

import dataclasses  # noqa: E402

from buffer.arithmetic import StepsSpec, generate_steps_rows  # noqa: E402
from trainer.cli import load_config  # noqa: E402
from trainer.launcher import load_data  # noqa: E402
from trainer.warmup import WarmupConfig, cache_key, eval_max_new_tokens, is_correct, sft_target, warm_up  # noqa: E402

# The default task's cached model: existing caches and `grove prepare` stay valid only while
# this key stays the same (it hashes the spec, the warm-up config and the task's rows).
DEFAULT_MODEL_KEY = "63a19c469aecc20a"


def test_the_default_task_keeps_its_model_and_its_cache_key():
    cfg = load_config([])
    assert cfg.task.name == "arithmetic" and cfg.model.tiny == TinyModelSpec()
    assert (cfg.model.tiny.max_positions, cfg.rollout.engine.max_model_len) == (64, 64)
    assert (cfg.rollout.max_tokens, cfg.rollout.eval_max_tokens) == (8, 8)
    assert [f.fn for f in cfg.reward.functions] == ["exact_match"]
    assert cache_key(cfg.model.tiny, cfg.model.warmup, load_data(cfg).fingerprint) == DEFAULT_MODEL_KEY


def test_arithmetic_steps_grows_the_context_to_fit_and_gets_its_own_model():
    cfg = load_config(["task=arithmetic_steps"])
    assert cfg.task.name == "arithmetic_steps"
    assert [f.fn for f in cfg.reward.functions] == ["steps_answer"]
    data = load_data(cfg)
    rows = data.train + data.eval
    longest_response = max(len(r["warmup_target"]) + 1 for r in rows)  # + <eos>
    longest_prompt = max(len(r["prompt"]) for r in rows)
    assert longest_response <= cfg.rollout.max_tokens == cfg.rollout.eval_max_tokens
    assert longest_prompt + cfg.rollout.max_tokens <= cfg.rollout.engine.max_model_len <= cfg.model.tiny.max_positions
    assert cfg.model.tiny.max_positions > TinyModelSpec().max_positions
    assert dataclasses.replace(cfg.model.tiny, max_positions=TinyModelSpec().max_positions) == TinyModelSpec()
    assert cache_key(cfg.model.tiny, cfg.model.warmup, data.fingerprint) != DEFAULT_MODEL_KEY
    # the command line still wins over what the task picks
    cfg = load_config(["task=arithmetic_steps", "rollout.max_tokens=64", "reward.functions=[{fn: exact_match}]"])
    assert cfg.rollout.max_tokens == 64 and [f.fn for f in cfg.reward.functions] == ["exact_match"]


def test_warm_up_targets_and_judging_follow_the_rows():
    plain = {"prompt": "2+3=", "answer": "5"}
    steps = {"prompt": "2+3*4=", "answer": "14", "warmup_target": "3*4=12;2+12=14;#14"}
    assert sft_target(plain) == "5" and sft_target(steps) == steps["warmup_target"]
    assert eval_max_new_tokens([plain]) == 8  # as before this task existed
    assert eval_max_new_tokens([plain, steps]) == len(steps["warmup_target"]) + 8
    assert is_correct(" 5\n", plain) and not is_correct("5;#5", plain)
    assert is_correct("3*4=12;2+12=14;#14", steps) and is_correct("#14", steps)
    assert not is_correct("14", steps) and not is_correct("3*4=12;2+12=14;#15", steps)


def test_warm_up_runs_on_step_by_step_rows():
    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(max_positions=128), tok)
    rows = generate_steps_rows(StepsSpec(num_train=40, num_eval=0))
    lines: list[str] = []
    cfg = WarmupConfig(target_accuracy=1.0, max_steps=2, batch_size=8, eval_every=1, eval_rows=4)
    report = warm_up(model, tok, rows, cfg, log=lines.append)
    assert report["steps"] == 2 and 0.0 <= report["accuracy"] <= 1.0 and len(lines) == 2
