"""The trainer in pieces trains as it does whole: micro-batches accumulate to the one
full-batch update, two ranks (ZeRO 1, 2, 3) compute the single-rank gradient of the same
batch, a non-finite micro-batch or rank skips the whole update everywhere, and the ZeRO-3
export, gathered module by module, equals the ZeRO-1 export.

The two-rank runs are real processes (this file's __main__, over gloo on loopback), each
given the whole batch as the launcher's rank actors will be."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algorithms import AlgorithmConfig
from buffer.types import FinishReason, Group, Trajectory

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# Small enough that a rank's share is several micro-batches, not always as many as the
# other rank's (stand-ins run), and the output layer several chunks, some empty.
SPLIT = dict(max_tokens_per_micro_batch=48, logits_chunk_tokens=7)
WHOLE = dict(bucket_overhead_tokens=10**9)  # one padded micro-batch, one output-layer chunk


def groups_of_several_lengths(seed: int = 0, nan_row: bool = False) -> list[Group]:
    """Three groups of four, prompts and responses of many lengths, mixed rewards."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g, lengths in enumerate(([3, 3, 9, 14], [5, 5, 5, 30], [1, 2, 20, 7])):
        group = Group(group_id=f"g{g}", prompt_id=f"p{g}", prompt_text="", row={})
        prompt = torch.randint(2, 90, (4 + 3 * g,), generator=gen).tolist()
        for i, n in enumerate(lengths):
            t = Trajectory(prompt_id=f"p{g}", group_id=f"g{g}", prompt_ids=prompt)
            behaviour = (-0.5 - torch.rand(n, generator=gen) * 3).tolist()
            if nan_row and (g, i) == (1, 3):
                behaviour[0] = math.nan
            t.append_tokens(torch.randint(2, 90, (n,), generator=gen).tolist(), behaviour, 0)
            if i == 2:
                t.loss_mask[:2] = [0] * min(2, n)  # a masked span: trained tokens != response tokens
            t.reward, t.finish_reason = float((i + g) % 2) + 0.25 * i, FinishReason.STOP
            group.trajectories.append(t)
        groups.append(group)
    return groups


def make_trainer(model_path: str, algorithm: AlgorithmConfig | None = None, **cfg):
    from trainer.policy_trainer import Trainer, TrainerConfig

    rank = cfg.pop("rank", 0)
    port = cfg.pop("master_port", None)
    config = TrainerConfig(**{"cpu_cores": None, "num_threads": 1, "lr": 1e-3, **cfg})
    trainer = Trainer(model_path, config, algorithm or AlgorithmConfig(), rank=rank,
                      master_addr="127.0.0.1" if port else None, master_port=port)
    trainer.setup()
    return trainer


def capture_gradients(trainer) -> dict[str, torch.Tensor]:
    """Record the accumulated (rank-reduced) gradient of every update just before its
    step, into the returned dict (the last update's). A collective under ZeRO."""
    from deepspeed.utils import safe_get_full_grad

    grads: dict[str, torch.Tensor] = {}
    step = trainer._step

    def recording_step():
        for name, p in trainer.engine.module.named_parameters():
            grads[name] = safe_get_full_grad(p).detach().float().cpu().clone()
        return step()

    trainer._step = recording_step
    return grads


def weights(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(blob)


def assert_close_grads(got: dict, want: dict, rel: float = 1e-5) -> float:
    assert got.keys() == want.keys()
    scale = max(float(g.abs().max()) for g in want.values())
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= rel * scale, f"gradient differs by {worst:.3g} (largest gradient {scale:.3g})"
    print(f"gradient: max |difference| / max |gradient| = {worst / scale:.2g}")
    return worst / scale


def assert_close_updates(got: dict, want: dict, grads: dict, lr: float = 1e-3) -> None:
    """Weights after Adam's first step, lr x g / (|g| + 1e-8): equal up to float rounding
    where the gradient is not ~0; where it is (|g| < 1e-5 of the largest), the step turns
    rounding noise into up to lr, so only the bound is checked there."""
    scale = max(float(g.abs().max()) for g in grads.values())
    for k in want:
        diff, clear = (got[k] - want[k]).abs(), grads[k].abs() > 1e-5 * scale
        assert float(diff[clear].max()) < 1e-6 if bool(clear.any()) else True, k
        assert float(diff.max()) <= 2 * lr, k


# --- one rank, micro-batched ---------------------------------------------------------------


ALGORITHMS = {
    "grpo": {},  # token-mean, decoupled PPO with token TIS
    "dr_grpo_null_constant": dict(advantage="mean_only", loss_agg="seq-mean-token-sum-norm"),
    "gspo": dict(policy_loss="gspo", loss_agg="seq-mean-token-mean", clip_low=3e-4, clip_high=4e-4),
    "seq_sum_rejection_loglinear": dict(loss_agg="seq-mean-token-sum", prox_mode="loglinear", rejection="token",
                                        rejection_low=0.3, rejection_high=3.0),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_micro_batches_accumulate_to_the_one_batch_update(model_path, name):
    algorithm = AlgorithmConfig(**ALGORITHMS[name])
    whole, split = make_trainer(model_path, algorithm, **WHOLE), make_trainer(model_path, algorithm, **SPLIT)
    g_whole, g_split = capture_gradients(whole), capture_gradients(split)
    batch = groups_of_several_lengths()
    m_whole, m_split = whole.train_step(batch), split.train_step(batch)
    assert m_whole["train/micro_batches"] == 1 and m_split["train/micro_batches"] >= 3
    assert m_split["train/loss"] == pytest.approx(m_whole["train/loss"], rel=1e-5, abs=1e-7)
    assert m_split["train/grad_norm"] == pytest.approx(m_whole["train/grad_norm"], rel=1e-5)
    assert_close_grads(g_split, g_whole)
    for key in ("loss/ratio_mean", "loss/is_weight_mean", "loss/entropy"):  # token-weighted across micro-batches
        assert m_split[key] == pytest.approx(m_whole[key], rel=1e-5)


def test_a_non_finite_micro_batch_skips_the_whole_update(model_path):
    tr = make_trainer(model_path, **SPLIT)
    before = weights(tr.export_weights())
    metrics, blob = tr.train_step_and_export(groups_of_several_lengths(nan_row=True))
    assert metrics["train/micro_batches"] >= 3 and metrics["train/updates_applied"] == 0 and blob is None
    after = weights(tr.export_weights())
    assert all(torch.equal(before[k], after[k]) for k in before)  # the finite micro-batches left nothing
    metrics, blob = tr.train_step_and_export(groups_of_several_lengths(seed=1))
    assert metrics["train/updates_applied"] == 1 and blob is not None  # the next batch trains normally
    assert any(not torch.equal(before[k], v) for k, v in weights(blob).items())


# --- two ranks ---------------------------------------------------------------------------


# Every cross-rank path at once: novelty (π_prox sums over ranks), a reference model (KL),
# the entropy's gradient, and rejection (kept-token counts summed over ranks); ~40% rejected.
RANK_ALGORITHMS = {
    "grpo": {},
    "everything": dict(novelty_sharpening=True, kl_coef=0.05, entropy_coef=0.01, rejection="token",
                       rejection_low=1e-4, rejection_high=10.0, loss_agg="seq-mean-token-mean"),
}


def rank_main(model_path: str, rank: int, world_size: int, port: int, stage: int, algorithm: str, out: str) -> None:
    """One rank of a two-rank run: a step on the whole batch, then a batch whose only NaN
    row lands on one rank. Saves the gradients, metrics and exports."""
    tr = make_trainer(model_path, AlgorithmConfig(**RANK_ALGORITHMS[algorithm]), zero_stage=stage, rank=rank,
                      world_size=world_size, master_port=port, **SPLIT)
    grads = capture_gradients(tr)
    metrics, blob = tr.train_step_and_export(groups_of_several_lengths())
    first = {k: v.clone() for k, v in grads.items()}
    nan_metrics, nan_blob = tr.train_step_and_export(groups_of_several_lengths(seed=2, nan_row=True))
    after_nan = tr.export_weights()
    torch.save({"grads": first, "metrics": metrics, "blob": blob, "nan_metrics": nan_metrics,
                "nan_blob": nan_blob, "after_nan": after_nan}, out)


def run_two_ranks(model_path: str, stage: int, algorithm: str, tmp: Path) -> list[dict]:
    from trainer.distributed import _free_port

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.integration.test_trainer_ranks", model_path, str(rank),
                               "2", str(port), str(stage), algorithm, str(tmp / f"rank{rank}.pt")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-4000:]
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def one_rank(model_path):
    """The references, by algorithm: one rank, ZeRO-1, the whole batch in one micro-batch."""
    cache = {}

    def reference(algorithm: str) -> dict:
        if algorithm not in cache:
            tr = make_trainer(model_path, AlgorithmConfig(**RANK_ALGORITHMS[algorithm]), **WHOLE)
            grads = capture_gradients(tr)
            metrics, blob = tr.train_step_and_export(groups_of_several_lengths())
            cache[algorithm] = {"grads": dict(grads), "metrics": metrics, "blob": blob}
        return cache[algorithm]

    return reference


@pytest.mark.parametrize("stage, algorithm", [(1, "grpo"), (2, "grpo"), (3, "grpo"), (3, "everything")])
def test_two_ranks_compute_the_one_rank_update(model_path, one_rank, stage, algorithm, tmp_path):
    ranks = run_two_ranks(model_path, stage, algorithm, tmp_path)
    one_rank = one_rank(algorithm)
    ref = one_rank["metrics"]
    for r in ranks:  # every rank reports the whole batch's numbers
        assert r["metrics"]["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-5, abs=1e-7)
        assert r["metrics"]["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=1e-5)
        for key in ("loss/ratio_mean", "loss/rejected_frac", "loss/kl", "loss/entropy", "adv/max"):
            if key in ref:
                assert r["metrics"][key] == pytest.approx(ref[key], rel=1e-5), key
        assert r["metrics"]["train/updates_applied"] == 1
        assert_close_grads(r["grads"], one_rank["grads"])
    assert ranks[1]["blob"] is None and ranks[0]["blob"] is not None  # rank 0 alone exports
    got, want = weights(ranks[0]["blob"]), weights(one_rank["blob"])
    assert sorted(got) == sorted(want)  # the same names (ZeRO-3: gathered module by module)
    assert_close_updates(got, want, one_rank["grads"])
    # a NaN in one rank's share skips the update on both ranks, and nothing changes
    assert [r["nan_metrics"]["train/updates_applied"] for r in ranks] == [0, 0]
    assert ranks[0]["nan_blob"] is None and ranks[0]["after_nan"] == ranks[0]["blob"]


def test_the_zero3_export_equals_the_zero1_export_after_the_same_steps(model_path):
    """One rank each: the module-by-module ZeRO-3 gather gives ZeRO-1's state dict, names
    and order included, and the same weights before and after a step."""
    from trainer.distributed import gathered_state_dict

    zero1, zero3 = make_trainer(model_path), make_trainer(model_path, zero_stage=3)
    assert zero3.export_weights() == zero1.export_weights()  # before any step: the very same bytes
    assert list(gathered_state_dict(zero3.engine.module)) == list(zero1.engine.module.state_dict())
    grads = capture_gradients(zero1)
    zero1.train_step(groups_of_several_lengths()), zero3.train_step(groups_of_several_lengths())
    assert_close_updates(weights(zero3.export_weights()), weights(zero1.export_weights()), grads)


if __name__ == "__main__":  # one rank of run_two_ranks
    model_path, rank, world_size, port, stage, algorithm, out = sys.argv[1:]
    rank_main(model_path, int(rank), int(world_size), int(port), int(stage), algorithm, out)
    print(json.dumps({"rank": int(rank), "done": True}))
