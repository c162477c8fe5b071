"""The built-in default model: a tiny Qwen2 with a character tokenizer, built offline.

Nothing can be downloaded on the machines Grove is tested on, so the default policy is
made here: a character-level `tokenizers` tokenizer saved as a standard HF folder, and
a randomly initialised Qwen2ForCausalLM small enough to train on one CPU core. The
embeddings are untied on purpose: vLLM's CPU `reload_weights` leaves a tied lm_head
stale (see shared/reference/platform-vllm-cpu.md, pitfall 2). Grove's default in-place
weight loader handles tied models too (tests/integration/test_weight_loaders.py).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

PAD, EOS = "<pad>", "<eos>"
ALPHABET = string.digits + "+-*/=()., " + string.ascii_letters + "?!:;'\"<>[]{}#%&@^_|~$\n"


@dataclass
class TinyModelSpec:
    """Shape of the built-in model. Head size must be one vLLM's CPU kernels accept (32+)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_positions: int = 64  # prompt + response; task=arithmetic_steps raises it to 128
    seed: int = 0


def build_char_tokenizer() -> Qwen2Tokenizer:
    """One token per character, as a genuine Qwen2 (byte-level BPE) tokenizer with no merges.

    transformers loads any qwen2 checkpoint's tokenizer as Qwen2Tokenizer, whose byte-level
    pipeline spells a space as "Ġ"; writing the vocabulary in that byte-level alphabet keeps
    the round trip exact in transformers and in vLLM alike.
    """
    byte_char = bytes_to_unicode()
    vocab = {PAD: 0, EOS: 1}
    for ch in ALPHABET:
        vocab.setdefault(byte_char[ord(ch)], len(vocab))
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token=EOS, pad_token=PAD)


def build_tiny_model(spec: TinyModelSpec, tokenizer: Qwen2Tokenizer) -> Qwen2ForCausalLM:
    import torch

    if spec.hidden_size % spec.num_heads or spec.hidden_size // spec.num_heads < 32:
        raise ValueError(
            f"model.hidden_size={spec.hidden_size} / num_heads={spec.num_heads} gives a head size "
            "below 32 or not whole; vLLM's CPU attention needs head sizes of 32, 64, 80, 96, 112, 128, ..."
        )
    vocab_size = ((len(tokenizer) + 31) // 32) * 32  # padded, as real checkpoints are
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    return Qwen2ForCausalLM(config)


def save_model_folder(model, tokenizer, path: Path) -> None:
    """A standard HF folder: vLLM and transformers both load it with from_pretrained."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
