"""`trainer.compile=true` trains exactly as the eager trainer does, up to float rounding,
and its warm-up compiles without touching the weights or the optimizer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load

from algorithms import AlgorithmConfig
from buffer.types import FinishReason, Group, Trajectory
from trainer.policy_trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.integration


def groups_of_several_lengths() -> list[Group]:
    """Rows of different lengths, so train_step forwards more than one bucket, one of them
    a single row (the shapes the warm-up compiles for)."""
    gen = torch.Generator().manual_seed(0)
    groups = []
    for g, lengths in enumerate(([3, 3, 9, 9], [5, 5, 5, 30])):
        group = Group(group_id=f"g{g}", prompt_id=f"p{g}", prompt_text="", row={})
        for i, n in enumerate(lengths):
            t = Trajectory(prompt_id=f"p{g}", group_id=f"g{g}", prompt_ids=[3, 4, 12, 5, 6])
            t.append_tokens(torch.randint(2, 90, (n,), generator=gen).tolist(), [-1.5] * n, 0)
            t.reward, t.finish_reason = float(i % 2), FinishReason.STOP
            group.trajectories.append(t)
        groups.append(group)
    return groups


def test_compiled_trainer_steps_as_the_eager_one(model_path):
    cfg = dict(cpu_cores=None, num_threads=2, lr=1e-3, bucket_overhead_tokens=0)
    eager = Trainer(model_path, TrainerConfig(**cfg), AlgorithmConfig())
    compiled = Trainer(model_path, TrainerConfig(**cfg, compile=True), AlgorithmConfig())
    eager.setup()
    setup = compiled.setup()
    assert setup["trainer_compile_s"] > 0
    assert compiled.export_weights() == eager.export_weights()  # the warm-up changed no weight
    for step in range(2):  # the second step also checks the optimizer state the first left
        batch = groups_of_several_lengths()
        m_eager, m_compiled = eager.train_step(batch), compiled.train_step(batch)
        assert m_compiled["train/loss"] == pytest.approx(m_eager["train/loss"], abs=1e-5)
        assert m_compiled["train/grad_norm"] == pytest.approx(m_eager["train/grad_norm"], rel=1e-4)
        w_eager, w_compiled = load(eager.export_weights()), load(compiled.export_weights())
        assert max(float((w_eager[k] - w_compiled[k]).abs().max()) for k in w_eager) < 1e-5
    assert m_eager["train/grad_norm"] > 0 and compiled.version == eager.version == 2
