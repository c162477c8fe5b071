"""The rollout worker on the real engine: weight updates in the middle of generation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from buffer.prompts import PromptItem
from buffer.types import FinishReason, Group, Trajectory
from rewards.runner import RewardConfig
from rollout.engine import VLLMEngine
from rollout.worker import RolloutConfig, RolloutWorker
from tests.integration.conftest import cpu_engine_config

pytestmark = pytest.mark.integration
ROW = {"prompt": "12+34=", "answer": "46"}
ROOT = Path(__file__).resolve().parents[2]
# every response is made 56 tokens long (EOS is masked until then): updates land mid-response
LONG = {"max_tokens": 56, "workflow": f"{ROOT / 'scripts' / 'workloads.py'}:LongTailWorkflow",
        "workflow_kwargs": {"fraction": 1.0, "min_tokens": 56}}


def logprobs_under(model, prompt_ids, response_ids, eos_id: int = 1):
    """The engine samples these long responses with min_tokens, i.e. with EOS masked out
    and the rest renormalised; the reference applies the same processing."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
        if eos_id >= 0:  # (-1: EOS was not masked)
            logits[:, eos_id] = float("-inf")
        logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(-1, torch.tensor(response_ids).unsqueeze(-1)).squeeze(-1).tolist()


def logprobs_across_a_paused_update(old, new, prompt_ids, response_ids, cut: int, eos_id: int = 1):
    """What a request kept in the engine across an update samples from: the context up to
    token cut-2 was cached by the old weights; the new weights process token cut-1 (the
    last one the old weights sampled) and everything after it, attending to that cache."""
    with torch.no_grad():
        cache = old(input_ids=torch.tensor([prompt_ids + response_ids[:cut - 1]]), use_cache=True).past_key_values
        logits = new(input_ids=torch.tensor([response_ids[cut - 1:-1]]), past_key_values=cache).logits[0].float()
        logits[:, eos_id] = float("-inf")
        logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(-1, torch.tensor(response_ids[cut:]).unsqueeze(-1)).squeeze(-1).tolist()


def both_under_way(engine, tokens: int = 2) -> bool:
    """Two requests in the engine with at least `tokens` tokens each. Outputs reach the
    worker only when a request ends, so this reads vLLM's per-request output state."""
    states = list(engine.engine.output_processor.request_states.values())
    return len(states) == 2 and all(st.detokenizer.num_output_tokens() >= tokens for st in states)


async def generate_across_an_update(worker, payload: bytes, group_id: str):
    await worker.submit([PromptItem(prompt_id="p", prompt=ROW["prompt"], row=ROW, n_samples=2, group_id=group_id)])
    while not both_under_way(worker.engine):
        await asyncio.sleep(0)
    sync = await worker.update_weights(payload, worker.version + 1)
    got = await worker.collect(min_groups=1, timeout_s=60)
    return sync, got.groups[0]


@pytest.fixture(scope="module")
def mp_engine(model_path, loop_thread):
    """The model in a worker process of its own: a weight swap cannot label inside the load
    there, so the engine pauses around it (VLLMEngine.aswap_weights)."""
    eng = VLLMEngine(model_path, cpu_engine_config(executor="mp"))
    loop_thread.run(eng.astart())
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def make_worker(model_path, engine, loop_thread):
    def make(on_update: str, interrupt_by: str = "pause", on_engine=None) -> RolloutWorker:
        cfg = RolloutConfig(**LONG, on_update=on_update, interrupt_by=interrupt_by)
        worker = RolloutWorker(model_path, cfg, RewardConfig(isolated=False), engine=on_engine or engine)
        loop_thread.run(worker.astart())
        return worker
    return make


@pytest.mark.parametrize("interrupt_by, executor", [("abort", "uniproc"), ("pause", "uniproc"), ("pause", "mp")])
def test_interrupted_requests_resume_on_new_weights_with_exact_versions_and_logprobs(
        make_worker, trainer, loop_thread, interrupt_by, executor, request):
    import copy

    worker = make_worker("interrupt", interrupt_by, request.getfixturevalue("mp_engine") if executor == "mp" else None)
    loop_thread.run(worker.engine.aload_weights(trainer.export_weights()))  # engine == trainer, whatever ran before
    before = copy.deepcopy(trainer.engine.module)  # the weights the engine holds now
    group = _one_step_then_generate(worker, trainer, loop_thread, f"g-{interrupt_by}-{executor}")
    after = trainer.engine.module
    prompt_ids = group.trajectories[0].prompt_ids
    for traj in group.trajectories:
        assert traj.finish_reason is FinishReason.LENGTH and traj.num_response_tokens == 56
        v0 = worker.version - 1
        assert traj.versions == sorted(traj.versions) and set(traj.versions) == {v0, v0 + 1}
        cut = traj.versions.index(v0 + 1)
        assert 1 < cut < 56
        old = logprobs_under(before, prompt_ids, traj.response_ids)
        new = logprobs_under(after, prompt_ids, traj.response_ids)
        assert max(abs(a - b) for a, b in zip(traj.behaviour_logprobs[:cut], old[:cut])) < 1e-4
        if interrupt_by == "abort":  # the context was re-prefilled on the new weights
            assert max(abs(a - b) for a, b in zip(traj.behaviour_logprobs[cut:], new[cut:])) < 1e-4
        else:  # the context cached by the old weights was kept: the stamps say exactly where
            kept = logprobs_across_a_paused_update(before, after, prompt_ids, traj.response_ids, cut)
            assert max(abs(a - b) for a, b in zip(traj.behaviour_logprobs[cut:], kept)) < 1e-4
            assert max(abs(a - b) for a, b in zip(kept, new[cut:])) > 1e-4  # and that is not the same thing
        assert traj.loss_mask == [1] * 56
    assert worker.counts["samples_interrupted"] >= 2
    # abort: the engine was idle at the load, so no prefix cached by the old weights survives it
    assert worker.counts["prefix_cache_kept"] == (1 if interrupt_by == "pause" else 0)


@pytest.mark.parametrize("interrupt_by, executor", [("pause", "uniproc"), ("pause", "mp"), ("abort", "uniproc")])
def test_a_group_admitted_for_the_next_version_waits_for_its_weights(
        make_worker, trainer, loop_thread, interrupt_by, executor, request):
    """Admission follows the trainer, so a group admitted at version v can reach the worker
    before v's weights do. It must wait for them, then run on them alone: every token
    stamped v and sampled from v's weights (its logprobs are those of the new model, from
    the first token on), also when it is released while the load is still under way."""
    worker = make_worker("interrupt", interrupt_by, request.getfixturevalue("mp_engine") if executor == "mp" else None)
    loop_thread.run(worker.engine.aload_weights(trainer.export_weights()))
    _train_one_step(trainer)
    v0 = worker.version = trainer.version - 1  # the engine holds the previous weights
    loop_thread.run(worker.engine.alabel(v0))
    early = PromptItem(prompt_id="p", prompt=ROW["prompt"], row=ROW, n_samples=2, group_id=f"early-{request.node.name}",
                       start_version=v0 + 1)
    late = PromptItem(prompt_id="p", prompt=ROW["prompt"], row=ROW, n_samples=2, group_id=f"late-{request.node.name}",
                      start_version=v0 + 1)

    async def run():
        await worker.submit([PromptItem(prompt_id="p", prompt=ROW["prompt"], row=ROW, n_samples=2,
                                        group_id=f"old-{request.node.name}")])
        await worker.submit([early])  # arrives before its weights: held
        while sum(n >= 2 for n in _tokens_so_far(worker.engine)) < 2:  # the old group is under way
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        in_engine = len(_tokens_so_far(worker.engine))
        # the next group arrives while the update is under way
        update = asyncio.ensure_future(worker.update_weights(trainer.export_weights(), v0 + 1))
        await asyncio.sleep(0)
        await worker.submit([late])
        await update
        groups = []
        while len(groups) < 3:
            groups += (await worker.collect(min_groups=1, timeout_s=60)).groups
        return in_engine, {g.group_id.split("-")[0]: g for g in groups}

    in_engine, groups = loop_thread.run(run())
    assert in_engine == 2  # the held group sent nothing to the engine
    assert set(groups["old"].trajectories[0].versions) == {v0, v0 + 1}
    new_model = trainer.engine.module
    for name in ("early", "late"):
        for traj in groups[name].trajectories:
            assert traj.num_response_tokens == 56 and set(traj.versions) == {v0 + 1}
            expected = logprobs_under(new_model, traj.prompt_ids, traj.response_ids)
            assert max(abs(a - b) for a, b in zip(traj.behaviour_logprobs, expected)) < 1e-4


def _train_one_step(trainer) -> None:
    """A real DeepSpeed step on a tiny group, so the trainer's weights differ from the engine's."""
    g = Group(group_id="warm", prompt_id="p", prompt_text=ROW["prompt"], row=ROW)
    for reward in (0.0, 1.0):
        t = Trajectory(prompt_id="p", group_id="warm", prompt_ids=[3, 4, 12, 5, 6, 16])
        t.append_tokens([6, 8, 1], [-1.0, -1.0, -0.1], trainer.version)
        t.reward, t.finish_reason = reward, FinishReason.STOP
        g.trajectories.append(t)
    trainer.train_step([g])


def _one_step_then_generate(worker, trainer, loop_thread, group_id):
    """A real trainer step changes the weights; generation straddles their arrival."""
    _train_one_step(trainer)
    worker.version = trainer.version - 1  # the engine still holds the previous weights
    loop_thread.run(worker.engine.alabel(worker.version))
    sync, group = loop_thread.run(generate_across_an_update(worker, trainer.export_weights(), group_id))
    assert (sync["requests_interrupted"] >= 1) == (worker.cfg.on_update != "wait")
    return group


@pytest.mark.parametrize("interrupt_by", ["abort", "pause"])
def test_interrupt_newest_keeps_old_tokens_as_context_only(make_worker, trainer, loop_thread, interrupt_by):
    worker = make_worker("interrupt_newest", interrupt_by)
    group = _one_step_then_generate(worker, trainer, loop_thread, f"g-mask-{interrupt_by}")
    for traj in group.trajectories:
        cut = traj.versions.index(max(traj.versions))
        assert 0 < cut and traj.loss_mask == [0] * cut + [1] * (56 - cut)


def test_wait_mode_lets_requests_finish_on_the_old_weights(make_worker, trainer, loop_thread):
    worker = make_worker("wait")
    group = _one_step_then_generate(worker, trainer, loop_thread, "g-wait")
    for traj in group.trajectories:
        assert len(set(traj.versions)) == 1 and traj.num_response_tokens == 56
    assert worker.counts["samples_interrupted"] == 0


@pytest.fixture(scope="module")
def make_april_worker(model_path, engine, loop_thread):
    def make(interrupt_by: str) -> RolloutWorker:
        cfg = RolloutConfig(**LONG, on_update="wait", interrupt_by=interrupt_by, overprovision=2.0)
        worker = RolloutWorker(model_path, cfg, RewardConfig(isolated=False), engine=engine)
        loop_thread.run(worker.astart())
        return worker
    return make


def _tokens_so_far(engine) -> list[int]:
    return [st.detokenizer.num_output_tokens() for st in engine.engine.output_processor.request_states.values()]


@pytest.mark.parametrize("interrupt_by", ["abort", "pause"])
def test_april_batch_boundary_hands_requests_to_the_next_weights(make_april_worker, trainer, loop_thread,
                                                                  interrupt_by):
    """APRIL's interrupt at a batch boundary: nothing is lost, and the group ends on the next
    weights with every token stamped by the version that sampled it. pause holds the
    requests in the engine (no token is sampled until the new weights are in); abort hands
    the group back as partial, to be resumed (re-prefilled) after the load."""
    worker = make_april_worker(interrupt_by)
    loop_thread.run(worker.engine.aload_weights(trainer.export_weights()))
    v0 = worker.version = trainer.version
    loop_thread.run(worker.engine.alabel(v0))

    async def run():
        await worker.submit([PromptItem(prompt_id="p", prompt=ROW["prompt"], row=ROW, n_samples=2,
                                        group_id=f"april-{interrupt_by}")])
        while not both_under_way(worker.engine):
            await asyncio.sleep(0)
        interrupted = await worker.interrupt_groups()
        held, busy = _tokens_so_far(worker.engine), worker.stats()["rollout/busy_s"]
        await asyncio.sleep(0.3)  # the trainer's step would run now
        partial = await worker.collect(min_groups=1 if interrupt_by == "abort" else 0, timeout_s=30)
        return interrupted, held, _tokens_so_far(worker.engine), partial, worker.stats()["rollout/busy_s"] - busy

    interrupted, held, later, partial, busy_while_held = loop_thread.run(run())
    assert interrupted == [f"april-{interrupt_by}"]  # the group whose two requests were stopped
    if interrupt_by == "pause":
        assert later == held and not partial.partial and not partial.groups  # held in place
        assert busy_while_held < 0.05  # held is idle time, not busy
    else:
        assert len(partial.partial) == 1 and not partial.groups
        for traj in partial.partial[0].trajectories:
            assert traj.finish_reason is FinishReason.ABORTED and 2 <= traj.num_response_tokens < 56
            assert set(traj.versions) == {v0}
    _train_one_step(trainer)
    sync = loop_thread.run(worker.update_weights(trainer.export_weights(), v0 + 1))
    assert sync["requests_interrupted"] == (2 if interrupt_by == "pause" else 0)
    if interrupt_by == "abort":
        loop_thread.run(worker.resume(partial.partial))
    got = loop_thread.run(worker.collect(min_groups=1, timeout_s=60))
    assert len(got.groups) == 1 and not got.partial
    for traj in got.groups[0].trajectories:
        assert traj.finish_reason is FinishReason.LENGTH and traj.num_response_tokens == 56
        assert traj.versions == sorted(traj.versions) and set(traj.versions) == {v0, v0 + 1}
        assert len(traj.behaviour_logprobs) == 56


def test_a_seeded_item_generates_after_its_context_and_is_trained_on_its_prompt(make_worker, trainer, loop_thread):
    """In-context seeding: the engine sees context + prompt; the trajectory keeps the
    context apart, so the trainer scores the response under the prompt alone, and its
    behaviour logprobs are exactly those under context + prompt."""
    worker = make_worker("interrupt")
    loop_thread.run(worker.engine.aload_weights(trainer.export_weights()))
    worker.version = trainer.version
    loop_thread.run(worker.engine.alabel(worker.version))
    item = PromptItem(prompt_id="p", prompt=ROW["prompt"], row=ROW, n_samples=2, group_id="seeded",
                      start_version=worker.version, context="1+2=3\n")

    async def run():
        await worker.submit([item])
        return (await worker.collect(min_groups=1, timeout_s=60)).groups[0]

    group = loop_thread.run(run())
    for traj in group.trajectories:
        assert traj.prompt_ids == worker.tokenizer.encode(ROW["prompt"])
        assert traj.context_ids == worker.tokenizer.encode("1+2=3\n")
        expected = logprobs_under(trainer.engine.module, traj.context_ids + traj.prompt_ids, traj.response_ids)
        assert max(abs(a - b) for a, b in zip(traj.behaviour_logprobs, expected)) < 1e-4


class EchoEnv:
    """For the multi-turn test: every turn ends at a digit; the environment answers '+3='
    until the third turn."""

    def __init__(self) -> None:
        self.turns = 0

    def reset(self, row):
        return ""

    def step(self, action):
        self.turns += 1
        return "+3=", 0.0, self.turns >= 3


def test_a_multiturn_episode_samples_its_turns_and_appends_observations_as_context(model_path, engine, trainer,
                                                                                    loop_thread):
    """Tokens in, tokens out: the observation tokens sit between the turns with mask 0, and
    every token the model sampled has the logprob transformers gives it in that very
    context (prompt + earlier turns + observations), under the weights that sampled it."""
    cfg = RolloutConfig(max_tokens=40, workflow="multiturn",
                        workflow_kwargs={"env": f"{__name__}:EchoEnv", "stop": list("0123456789"), "max_turns": 3})
    worker = RolloutWorker(model_path, cfg, RewardConfig(isolated=False), engine=engine)
    loop_thread.run(worker.astart())
    # the warmed-up model as built, not the session trainer's (other tests have trained it
    # on made-up rewards, after which it may no longer answer in digits)
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    loop_thread.run(worker.engine.aload_weights((Path(model_path) / "model.safetensors").read_bytes()))
    worker.version = trainer.version
    loop_thread.run(worker.engine.alabel(worker.version))

    async def run():
        await worker.submit([PromptItem(prompt_id="p", prompt=ROW["prompt"], row=ROW, n_samples=4,
                                        group_id="turns", start_version=worker.version)])
        return (await worker.collect(min_groups=1, timeout_s=60)).groups[0]

    group = loop_thread.run(run())
    observation = worker.tokenizer.encode("+3=")
    seen_observations = 0
    for traj in group.trajectories:
        context = [i for i, m in enumerate(traj.loss_mask) if m == 0]
        runs = [context[i:i + 3] for i in range(0, len(context), 3)]
        for positions in runs:  # each observation is exactly '+3=', right after a digit
            assert [traj.response_ids[i] for i in positions] == observation
            assert worker.tokenizer.decode([traj.response_ids[positions[0] - 1]]).isdigit()
        seen_observations += len(runs)
        expected = logprobs_under(reference, traj.prompt_ids, traj.response_ids, eos_id=-1)
        sampled = [(a, b) for a, b, m in zip(traj.behaviour_logprobs, expected, traj.loss_mask) if m]
        assert max(abs(a - b) for a, b in sampled) < 1e-4
    assert seen_observations >= 2  # (the tiny model answers in digits: its turns end at one)


def test_eval_workflow_evaluates_each_row_as_a_greedy_episode_with_the_environment(model_path, engine, loop_thread):
    """`rollout.eval_workflow=true`: held-out rows run through the multi-turn workflow, so
    the responses scored hold the environment's observations; greedy, so two evaluations
    agree. A workflow without `aevaluate` is refused at start-up, naming the setting."""
    kwargs = {"env": f"{__name__}:EchoEnv", "stop": list("0123456789"), "max_turns": 3}
    worker = RolloutWorker(model_path, RolloutConfig(eval_max_tokens=40, workflow="multiturn", workflow_kwargs=kwargs,
                                                     eval_workflow=True),
                           RewardConfig(isolated=False), engine=engine)
    loop_thread.run(worker.astart())
    rows = [ROW, {**ROW, "prompt": "7+5="}, {**ROW, "prompt": "9+9="}]
    metrics, records = loop_thread.run(worker.evaluate_samples(rows))
    again = loop_thread.run(worker.evaluate_samples(rows))[1]
    assert [r["response"] for r in records] == [r["response"] for r in again]
    assert any("+3=" in r["response"] for r in records), [r["response"] for r in records]
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0
    assert metrics["eval/env_failed"] == 0.0 and all(r["episode_info"]["turns"] >= 1 for r in records)

    with pytest.raises(ValueError, match=r"rollout.eval_workflow=true.*'group'.*aevaluate.*eval_workflow=false"):
        RolloutWorker(model_path, RolloutConfig(eval_workflow=True), RewardConfig(isolated=False), engine=engine)
