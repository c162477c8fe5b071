"""The two ways a weight update reaches vLLM's model (rollout/weight_sync.py) agree exactly,
and the in-place one also keeps a tied output layer in step with the embeddings."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout.engine import EngineConfig, VLLMEngine
from trainer.policy_trainer import token_logprobs

pytestmark = pytest.mark.integration
PROMPTS = ["23+45=", "7*8=", "91-37="]


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


async def greedy(engine: VLLMEngine, tokenizer) -> list[tuple[list[int], list[float]]]:
    out = []
    for prompt in PROMPTS:
        seg = await engine.agenerate(tokenizer.encode(prompt), 6, temperature=0.0)
        out.append((seg.token_ids, seg.logprobs))
    return out


async def load_and_generate(engine: VLLMEngine, loader: str, payload: bytes, tokenizer):
    engine.cfg = dataclasses.replace(engine.cfg, weight_loader=loader)
    await engine.aload_weights(payload)  # idle: the prefix cache of the old weights is dropped too
    return await greedy(engine, tokenizer)


def test_inplace_loader_matches_vllm_reload_exactly(engine, loop_thread, model_path):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    original = load_file(f"{model_path}/model.safetensors")
    first, second = save(perturbed(original, 1)), save(perturbed(original, 2))
    saved_cfg = engine.cfg
    try:
        # alternate so each loader takes over weights the other one left
        by_reload = loop_thread.run(load_and_generate(engine, "reload", first, tokenizer))
        by_inplace = loop_thread.run(load_and_generate(engine, "inplace", first, tokenizer))
        assert by_inplace == by_reload
        by_inplace_2 = loop_thread.run(load_and_generate(engine, "inplace", second, tokenizer))
        by_reload_2 = loop_thread.run(load_and_generate(engine, "reload", second, tokenizer))
        assert by_inplace_2 == by_reload_2
        assert by_inplace_2 != by_inplace  # the second update really changed the model
    finally:
        loop_thread.run(load_and_generate(engine, "reload", save(original), tokenizer))
        engine.cfg = saved_cfg


def test_inplace_loader_refuses_a_payload_missing_a_tensor(engine, loop_thread, model_path):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    original = load_file(f"{model_path}/model.safetensors")
    partial = {k: v for k, v in original.items() if k != "model.layers.1.mlp.down_proj.weight"}
    saved_cfg = engine.cfg
    try:
        with pytest.raises(Exception, match="unloaded"):
            loop_thread.run(load_and_generate(engine, "inplace", save(partial), tokenizer))
    finally:
        loop_thread.run(load_and_generate(engine, "inplace", save(original), tokenizer))
        engine.cfg = saved_cfg


def test_inplace_loader_keeps_a_tied_output_layer_in_step(loop_thread, model_path, tmp_path):
    """vLLM's CPU reload_weights leaves a tied lm_head stale (platform-vllm-cpu.md, pitfall 2);
    the in-place loader repacks the shared embedding, so logprobs follow the new weights."""
    tied_dir = tmp_path / "tied"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, tie_word_embeddings=True)
    model.tie_weights()
    model.save_pretrained(tied_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(tied_dir)
    tokenizer = AutoTokenizer.from_pretrained(tied_dir)

    new_state = perturbed({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, 3)
    model.load_state_dict(new_state, strict=False)
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, new_state["model.embed_tokens.weight"])

    engine = VLLMEngine(str(tied_dir), EngineConfig(cpu_cores=None, weight_loader="inplace"))
    loop_thread.run(engine.astart())
    try:
        loop_thread.run(engine.aload_weights(save(new_state)))
        checked = 0
        for prompt, (ids, logprobs) in zip(PROMPTS, loop_thread.run(greedy(engine, tokenizer))):
            prompt_ids = tokenizer.encode(prompt)
            full = torch.tensor([prompt_ids + ids])
            with torch.no_grad():
                expected = token_logprobs(model, full, torch.ones_like(full))[0, len(prompt_ids) - 1:].tolist()
            assert max(abs(a - b) for a, b in zip(logprobs, expected)) < 1e-4
            checked += len(ids)
        assert checked >= 6
    finally:
        engine.shutdown()
