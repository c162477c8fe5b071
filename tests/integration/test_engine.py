"""vLLM (CPU build) against transformers on the same weights, and live weight updates."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save
from transformers import AutoModelForCausalLM, AutoTokenizer

from buffer.types import FinishReason, Group, Trajectory
from trainer.logprobs import token_logprobs

pytestmark = pytest.mark.integration
PROMPTS = ["23+45=", "7*8=", "91-37=", "5-9="]


async def sample(engine, prompt_ids, n, max_tokens=6, temperature=1.0):
    out = []
    for i in range(n):
        seg = await engine.agenerate(prompt_ids, max_tokens, temperature=temperature, seed=1000 + i)
        out.append((seg.token_ids, seg.logprobs, seg.finish_reason))
    return out


def reference_logprobs(model, prompt_ids, tokens):
    ids = torch.tensor([prompt_ids + tokens])
    with torch.no_grad():
        lp = token_logprobs(model, ids, torch.ones_like(ids))
    return lp[0, len(prompt_ids) - 1:].tolist()


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


def test_vllm_logprobs_equal_transformers(engine, loop_thread, model_path, tokenizer):
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    # the session's engine may hold weights an earlier test loaded: start from the checkpoint
    loop_thread.run(engine.aload_weights(save(load_file(f"{model_path}/model.safetensors"))))
    checked = 0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        for tokens, logprobs, finish in loop_thread.run(sample(engine, ids, n=4)):
            assert finish in (FinishReason.STOP, FinishReason.LENGTH)
            assert len(tokens) == len(logprobs) > 0
            expected = reference_logprobs(hf, ids, tokens)
            assert max(abs(a - b) for a, b in zip(logprobs, expected)) < 1e-4
            checked += len(tokens)
    assert checked >= 16


def test_trainer_update_moves_vllm_to_the_trainers_new_weights(engine, loop_thread, trainer, tokenizer):
    """One real DeepSpeed step on engine samples, weights pushed live, logprobs match again."""
    ids = tokenizer.encode("38+47=")
    samples = loop_thread.run(sample(engine, ids, n=8))
    group = Group(group_id="g", prompt_id="p", prompt_text="38+47=", row={})
    for i, (tokens, logprobs, finish) in enumerate(samples):
        t = Trajectory(prompt_id="p", group_id="g", prompt_ids=ids)
        t.append_tokens(tokens, logprobs, version=0)
        t.reward, t.finish_reason = float(i % 2), finish
        group.trajectories.append(t)
    before_digest = loop_thread.run(engine.aweights_digest())
    version_before = trainer.version  # the session's trainer may have stepped in an earlier test
    metrics, weights = trainer.train_step_and_export([group])  # the launcher's call
    assert trainer.version == version_before + 1 and metrics["batch/version_max"] == 0
    assert weights == trainer.export_weights()  # exported after the step, not before
    loop_thread.run(engine.aload_weights(weights))  # engine idle: nothing in flight
    assert loop_thread.run(engine.aweights_digest()) != before_digest
    for new_tokens, new_logprobs, _ in loop_thread.run(sample(engine, ids, n=8)):
        trained = reference_logprobs(trainer.engine.module, ids, new_tokens)
        assert max(abs(a - b) for a, b in zip(new_logprobs, trained)) < 1e-4
    # and the update really changed the distribution the engine samples from
    moved = 0.0
    for tokens, old_logprobs, _ in samples:
        now = reference_logprobs(trainer.engine.module, ids, tokens)
        moved = max(moved, max(abs(a - b) for a, b in zip(now, old_logprobs)))
    assert moved > 1e-3


def test_default_engine_runs_the_model_inside_the_engine_core_process(engine):
    """executor=uniproc: the engine core has no separate model-worker process to spin-wait on."""
    import psutil

    names = [p.name() for p in psutil.Process().children(recursive=True)]
    assert any("EngineCore" in n for n in names), names
    assert not any("Worker" in n for n in names), names
