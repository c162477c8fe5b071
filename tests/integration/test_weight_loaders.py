"""The ways a weight update reaches vLLM's model (rollout/weight_sync.py) agree: inplace
with vLLM's reload exactly (same kernels), live to float rounding (torch's GEMM instead of
vLLM's packed one) with the same greedy tokens; and the direct loaders also keep a tied
output layer in step with the embeddings."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout.engine import VLLMEngine
from tests.integration.conftest import cpu_engine_config
from trainer.logprobs import token_logprobs

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


def same_generations(a, b, tolerance: float) -> bool:
    return all(ids_a == ids_b and max(abs(x - y) for x, y in zip(lp_a, lp_b)) <= tolerance
               for (ids_a, lp_a), (ids_b, lp_b) in zip(a, b))


def assert_samples_match_transformers(engine: VLLMEngine, loop_thread, tokenizer, model) -> None:
    """The engine's greedy samples carry the logprobs transformers computes for them."""
    checked = 0
    for prompt, (ids, logprobs) in zip(PROMPTS, loop_thread.run(greedy(engine, tokenizer))):
        prompt_ids = tokenizer.encode(prompt)
        full = torch.tensor([prompt_ids + ids])
        with torch.no_grad():
            expected = token_logprobs(model, full, torch.ones_like(full))[0, len(prompt_ids) - 1:].tolist()
        assert max(abs(a - b) for a, b in zip(logprobs, expected)) < 1e-4
        checked += len(ids)
    assert checked >= 6


@pytest.mark.parametrize("loader, tolerance", [("inplace", 0.0), ("live", 1e-5)])
def test_direct_loader_matches_vllm_reload(engine, loop_thread, model_path, loader, tolerance):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    original = load_file(f"{model_path}/model.safetensors")
    first, second = save(perturbed(original, 1)), save(perturbed(original, 2))
    saved_cfg = engine.cfg
    try:
        # alternate so each loader takes over weights the other one left (live <-> packed)
        by_reload = loop_thread.run(load_and_generate(engine, "reload", first, tokenizer))
        by_direct = loop_thread.run(load_and_generate(engine, loader, first, tokenizer))
        assert same_generations(by_direct, by_reload, tolerance)
        by_direct_2 = loop_thread.run(load_and_generate(engine, loader, second, tokenizer))
        by_reload_2 = loop_thread.run(load_and_generate(engine, "reload", second, tokenizer))
        assert same_generations(by_direct_2, by_reload_2, tolerance)
        assert by_direct_2 != by_direct  # the second update really changed the model
        # and a direct load after a direct load (nothing to stage or unpack in between)
        by_direct_3 = loop_thread.run(load_and_generate(engine, loader, first, tokenizer))
        assert same_generations(by_direct_3, by_reload, tolerance)
    finally:
        loop_thread.run(load_and_generate(engine, "reload", save(original), tokenizer))
        engine.cfg = saved_cfg


def test_a_live_engine_decodes_live_from_its_first_token(engine, loop_thread, model_path):
    """With weight_loader=live the engine leaves vLLM's packed form at start-up, with the
    checkpoint's own weights, and samples what transformers computes from them."""
    assert engine.cfg.weight_loader == "live" and engine.live_from_start
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    assert_samples_match_transformers(engine, loop_thread, tokenizer, model)


@pytest.mark.parametrize("loader", ["inplace", "live"])
def test_direct_loader_refuses_a_payload_missing_a_tensor(engine, loop_thread, model_path, loader):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    original = load_file(f"{model_path}/model.safetensors")
    partial = {k: v for k, v in original.items() if k != "model.layers.1.mlp.down_proj.weight"}
    saved_cfg = engine.cfg
    try:
        with pytest.raises(Exception, match="unloaded"):
            loop_thread.run(load_and_generate(engine, loader, save(partial), tokenizer))
    finally:
        loop_thread.run(load_and_generate(engine, loader, save(original), tokenizer))
        engine.cfg = saved_cfg


@pytest.mark.parametrize("loader", ["inplace", "live"])
def test_direct_loader_keeps_a_tied_output_layer_in_step(loop_thread, model_path, tmp_path, loader):
    """vLLM's CPU reload_weights leaves a tied lm_head stale (platform-vllm-cpu.md, pitfall 2);
    the in-place loader repacks the shared embedding, the live one multiplies by it as it
    is, so logprobs follow the new weights either way."""
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

    engine = VLLMEngine(str(tied_dir), cpu_engine_config(weight_loader=loader))
    loop_thread.run(engine.astart())
    try:
        assert engine.live_from_start == (loader == "live")  # the tied checkpoint too goes live at start
        loop_thread.run(engine.aload_weights(save(new_state)))
        assert_samples_match_transformers(engine, loop_thread, tokenizer, model)
    finally:
        engine.shutdown()


def test_a_compiled_engine_takes_live_updates_in_place(loop_thread, model_path):
    """vLLM's compiled forward (enforce_eager=false) calls the packed CPU kernels it was traced
    with, so "live" loads as "inplace" there: the engine starts (it used to die on its first
    step) and every update reaches the model."""
    engine = VLLMEngine(model_path, cpu_engine_config(weight_loader="live", enforce_eager=False))
    loop_thread.run(engine.astart())
    try:
        assert not engine.live_from_start
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        assert_samples_match_transformers(engine, loop_thread, tokenizer, model)
        for seed in (4, 5):  # two updates: the second replaces weights the first repacked
            new_state = perturbed(load_file(f"{model_path}/model.safetensors"), seed)
            loop_thread.run(engine.aload_weights(save(new_state), seed))
            model.load_state_dict(new_state)
            assert_samples_match_transformers(engine, loop_thread, tokenizer, model)
    finally:
        engine.shutdown()
