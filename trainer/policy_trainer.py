"""The DeepSpeed side: groups in, one optimizer update, new weights out.

`train_step` is the whole story of a batch: rewards become group-relative advantages,
the current policy re-scores every response token, `algorithms.compute_policy_loss`
turns that into a loss with the engine's behaviour logprobs as the reference, and one
DeepSpeed step later the version goes up by one. `export_weights` then hands the new
weights to the rollout side as a safetensors blob.

A non-finite loss or gradient norm skips the optimizer update: nothing is applied, the
step's export is None (no weights travel; the rollout only relabels its version), and
`trainer.max_nonfinite_steps` such steps in a row stop the run. The version still counts
batches, the unit of admission and staleness.
"""

from __future__ import annotations

import bisect
import os
import socket
import time
from dataclasses import dataclass
from typing import Optional

import torch

from algorithms import AlgorithmConfig, PolicyLossInputs, compute_advantages, compute_policy_loss
from buffer.types import Group


@dataclass
class TrainerConfig:
    """Optimisation settings; the batch is `batch_groups` groups of rollout.n_samples each."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    grad_clip: float = 1.0
    zero_stage: int = 1
    bf16: bool = False
    batch_groups: int = 32
    # Optimizer updates per batch, each on a slice of its groups. With more than one, the
    # clip ratio π_θ/π_old binds from the second update on (PPO-style); the policy version
    # still counts batches, the unit of admission and staleness.
    minibatches: int = 1
    # Rows are forwarded in length buckets so a batch is not padded to its longest response.
    # A forward+backward pass costs about this many tokens' worth of fixed overhead; rows are
    # split only where the padding saved is worth more. 0 = one bucket per distinct length,
    # a huge value = one padded batch. ~128 suits a small model on CPU; a GPU wants thousands.
    bucket_overhead_tokens: int = 128
    total_steps: int = 600
    seed: int = 0
    cpu_cores: Optional[str] = None  # the core(s) this process is pinned to; null = no pinning
    num_threads: int = 1
    dist_backend: str = "auto"  # torch.distributed backend: auto = nccl where CUDA is, else gloo
    max_nonfinite_steps: int = 3  # this many steps in a row with a NaN/inf loss or gradient stop the run
    # torch.compile the model's forward (shapes dynamic) before DeepSpeed wraps it: steps
    # get faster (fused elementwise work) for tens of seconds of compiling at start-up
    # (docs/benchmarks.md). Worth it for long runs and for a trainer the rollout waits on;
    # off by default so short runs start fast.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"trainer.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.batch_groups < 1:
            raise ValueError(f"trainer.batch_groups must be >= 1, got {self.batch_groups}")
        if not 1 <= self.minibatches <= self.batch_groups:
            raise ValueError(f"trainer.minibatches must be in [1, trainer.batch_groups={self.batch_groups}], "
                             f"got {self.minibatches}")
        if self.lr <= 0:
            raise ValueError(f"trainer.lr must be > 0, got {self.lr}")
        if self.bucket_overhead_tokens < 0:
            raise ValueError(f"trainer.bucket_overhead_tokens must be >= 0, got {self.bucket_overhead_tokens}")
        if self.dist_backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"trainer.dist_backend={self.dist_backend!r} is not one of ['auto', 'gloo', 'nccl']")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"trainer.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pin_to_cores(cores: Optional[str], num_threads: int) -> None:
    if cores is not None:
        os.sched_setaffinity(0, {int(c) for c in str(cores).split(",")})
    torch.set_num_threads(num_threads)


class NonFiniteStepsError(RuntimeError):
    """Too many steps in a row had a NaN or inf loss or gradient norm."""


def dist_backend(name: str) -> str:
    if name != "auto":
        return name
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_single_process_group(backend: str = "auto") -> None:
    """DeepSpeed needs a process group; on one process, a group of size one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # A group of one on a fresh loopback port: an inherited MASTER_PORT (another job's, or
    # a parent process's own group) would collide.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist_backend(backend), auto_mpi_discovery=False)


@dataclass
class PackedBatch:
    """Groups flattened to padded tensors. Per-token tensors are (B, L-1): position t holds
    what is known about token t+1 of prompt+response, so logits line up without slicing."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    behaviour_logprobs: torch.Tensor  # (B, L-1)
    versions: torch.Tensor  # (B, L-1), -1 outside responses
    loss_mask: torch.Tensor  # (B, L-1) float
    rewards: torch.Tensor  # (B,)
    group_index: torch.Tensor  # (B,)
    num_tokens: int

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The same batch with every tensor on `device` (the model's)."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return PackedBatch(**moved)


def pack_groups(groups: list[Group], pad_id: int) -> PackedBatch:
    trajs = [t for g in groups for t in g.trajectories]
    group_index = [i for i, g in enumerate(groups) for _ in g.trajectories]
    for t in trajs:
        if t.reward is None:
            raise ValueError(f"trajectory {t.uid} reached the trainer without a reward")
    length = max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    batch = len(trajs)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    behaviour = torch.zeros((batch, length - 1))
    versions = torch.full((batch, length - 1), -1, dtype=torch.long)
    mask = torch.zeros((batch, length - 1))
    for row, t in enumerate(trajs):
        p, r = len(t.prompt_ids), len(t.response_ids)
        input_ids[row, : p + r] = torch.tensor(t.prompt_ids + t.response_ids)
        attention[row, : p + r] = 1
        span = slice(p - 1, p - 1 + r)
        behaviour[row, span] = torch.tensor(t.behaviour_logprobs)
        versions[row, span] = torch.tensor(t.versions)
        mask[row, span] = torch.tensor(t.loss_mask, dtype=torch.float)
    return PackedBatch(
        input_ids=input_ids,
        attention_mask=attention,
        behaviour_logprobs=behaviour,
        versions=versions,
        loss_mask=mask,
        rewards=torch.tensor([float(t.reward) for t in trajs]),
        group_index=torch.tensor(group_index),
        num_tokens=int(mask.sum()),
    )


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0, with_entropy: bool = False):
    """log π(token t+1 | tokens ≤ t) for every position, (B, L-1); with the entropy of
    each position's distribution too when asked."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    chosen = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return chosen
    return chosen, -(logprobs.exp() * logprobs).sum(-1)


def length_buckets(lengths: list[int], overhead_tokens: int) -> list[list[int]]:
    """Row indices grouped by length so that the padded work, Σ over buckets of
    (overhead_tokens + rows × longest row), is least.

    On a long-tail batch one padded forward pays for every short row at the longest row's
    length; a few buckets cut that to about the real tokens. Optimal over cuts between
    distinct lengths (an O(k²) dynamic programme, k = distinct lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ascending = [lengths[i] for i in order]
    distinct = sorted(set(lengths))
    count_upto = [bisect.bisect_right(ascending, d) for d in distinct]  # rows with length <= d
    best = [0.0] * (len(distinct) + 1)  # best[j]: least cost of the rows up to distinct[j-1]
    cut = [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        best[j] = float("inf")
        for i in range(j):  # the last bucket holds distinct[i:j]
            rows = count_upto[j - 1] - (count_upto[i - 1] if i else 0)
            cost = best[i] + overhead_tokens + rows * distinct[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], len(distinct)
    while j > 0:
        bounds.append((count_upto[cut[j] - 1] if cut[j] else 0, count_upto[j - 1]))
        j = cut[j]
    return [order[a:b] for a, b in reversed(bounds)]


def bucketed_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            temperature: float = 1.0, with_entropy: bool = False,
                            overhead_tokens: int = 128):
    """`token_logprobs` over right-padded rows, forwarded in length buckets, each cut to
    its own longest row. Causal attention makes the result the same as one padded pass
    (up to float rounding); positions past a row's end, which no loss reads, hold 0."""
    lengths = attention_mask.sum(-1)
    buckets = length_buckets(lengths.tolist(), overhead_tokens)
    if len(buckets) == 1:
        return token_logprobs(model, input_ids, attention_mask, temperature, with_entropy)
    width = input_ids.shape[1] - 1
    pieces: list[tuple[torch.Tensor, ...]] = []
    for rows in buckets:
        index = torch.tensor(rows, device=input_ids.device)
        n = int(lengths[index].max())
        out = token_logprobs(model, input_ids[index, :n], attention_mask[index, :n], temperature, with_entropy)
        out = out if with_entropy else (out,)
        pieces.append(tuple(torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in out))
    inverse = torch.tensor([i for rows in buckets for i in rows], device=input_ids.device).argsort()
    joined = tuple(torch.cat(parts)[inverse] for parts in zip(*pieces))
    return joined if with_entropy else joined[0]


def batch_statistics(batch: PackedBatch, advantages: torch.Tensor, version: int) -> dict[str, float]:
    """What practitioners read first: advantage spread, dead groups, lengths, staleness."""
    lengths = batch.loss_mask.sum(-1)
    groups = batch.group_index.unique()
    zero_variance = sum(float(batch.rewards[batch.group_index == g].std(unbiased=False)) < 1e-8 for g in groups)
    trained = batch.loss_mask > 0
    ages = (version - batch.versions[trained]).float()
    return {
        "adv/mean": float(advantages.mean()),
        "adv/std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
        "adv/min": float(advantages.min()),
        "adv/max": float(advantages.max()),
        "batch/zero_variance_group_frac": zero_variance / len(groups),
        "response/length_mean": float(lengths.mean()),
        "response/length_min": float(lengths.min()),
        "response/length_max": float(lengths.max()),
        "staleness/token_age_mean": float(ages.mean()) if ages.numel() else 0.0,
        "staleness/token_age_max": float(ages.max()) if ages.numel() else 0.0,
    }


class Trainer:
    """A DeepSpeed engine around a causal LM, plus the policy version it has reached."""

    def __init__(self, model_path: str, cfg: TrainerConfig, algorithm: AlgorithmConfig,
                 temperature: float = 1.0) -> None:
        self.model_path = model_path
        self.cfg = cfg
        self.algorithm = algorithm
        self.temperature = temperature
        self.version = 0
        self._busy_seconds = 0.0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._applied = True  # whether the last step changed the weights

    def setup(self) -> dict[str, float]:
        start = time.perf_counter()
        pin_to_cores(self.cfg.cpu_cores, self.cfg.num_threads)
        torch.manual_seed(self.cfg.seed)
        init_single_process_group(self.cfg.dist_backend)
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
            betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
        )
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.cfg.grad_clip,
            "zero_optimization": {"stage": self.cfg.zero_stage, "stage3_param_persistence_threshold": 0},
            # bf16 steps skip on a non-finite gradient as fp32 ZeRO steps do (see _apply)
            "bf16": {"enabled": self.cfg.bf16, "check_grad_overflow": True},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        metrics = {}
        if self.cfg.compile:  # before DeepSpeed wraps it: the warm-up must not reach its gradient hooks
            compile_start = time.perf_counter()
            # The forward only, not the module's whole call: DeepSpeed adds forward hooks to
            # the module, which dynamo would otherwise trace in the first real step, after
            # the warm-up; outside the compiled region they run eagerly.
            model.forward = torch.compile(model.forward, dynamic=True)
            self._warm_up_compiled(model)
            metrics["trainer_compile_s"] = time.perf_counter() - compile_start
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.reference = None
        if self.algorithm.needs_reference:  # only then: a frozen copy costs a model's memory
            self.reference = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).eval()
            self.reference.requires_grad_(False)
            self.reference.to(self.engine.device)
        return {"trainer_setup_s": time.perf_counter() - start, **metrics}

    def _warm_up_compiled(self, model) -> None:
        """Compile now, not in the first steps the rollout waits on: forward and backward on
        token rows shaped as train_step's buckets come (several rows, padded or not, and a
        single row, whose size-1 dimension compiles separately), plus the no-grad forward.
        The gradients are taken with autograd.grad, so nothing reaches the parameters'
        .grad, and the weights and the optimizer stay untouched."""
        model.train()  # as train_step runs it: the mode is part of what was compiled
        params = [p for p in model.parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(0)
        for rows, length, padded in ((3, 12, True), (2, 9, False), (1, 7, False)):
            ids = torch.randint(2, model.config.vocab_size, (rows, length), generator=generator)
            mask = torch.ones_like(ids)
            if padded:
                mask[-1, length // 2:] = 0
            logprobs, entropy = token_logprobs(model, ids, mask, self.temperature, with_entropy=True)
            torch.autograd.grad((logprobs * mask[:, 1:]).sum() + entropy.sum(), params, allow_unused=True)
            with torch.no_grad():
                token_logprobs(model, ids, mask, self.temperature)

    def _logprobs(self, model, batch: PackedBatch, rows: slice | torch.Tensor = slice(None),
                  with_entropy: bool = False):
        return bucketed_token_logprobs(model, batch.input_ids[rows], batch.attention_mask[rows], self.temperature,
                                       with_entropy, self.cfg.bucket_overhead_tokens)

    def train_step(self, groups: list[Group]) -> dict[str, float]:
        """One policy version from these groups: `minibatches` optimizer updates; returns
        metrics and bumps the version."""
        start = time.perf_counter()
        algo = self.algorithm
        batch = pack_groups(groups, self.tokenizer.pad_token_id).to(self.engine.device)
        self.engine.train()
        mask = batch.loss_mask
        recompute = algo.decoupled and algo.prox_mode == "recompute"
        # π_prox of decoupled PPO (AReaL) is these weights before this step's updates. With
        # one update per batch that is the gradient pass itself, so no extra forward is paid.
        prox = ref = None
        with torch.no_grad():
            if algo.novelty_sharpening or (recompute and self.cfg.minibatches > 1):
                prox = self._logprobs(self.engine, batch)
            if self.reference is not None:
                ref = self._logprobs(self.reference, batch)
        seq_mean = None
        if algo.novelty_sharpening:  # XRPO scores novelty by the response's mean logprob
            seq_mean = (prox * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        advantages = compute_advantages(batch.rewards, batch.group_index, algo, seq_mean_logprobs=seq_mean)
        metrics_sum: dict[str, float] = {}
        losses = []
        applied = 0
        for rows in torch.arange(len(groups)).chunk(self.cfg.minibatches):
            rows = torch.isin(batch.group_index, rows)
            logprobs, entropy = self._logprobs(self.engine, batch, rows, with_entropy=True)
            if not algo.decoupled:
                old = batch.behaviour_logprobs[rows]
            elif recompute:
                old = prox[rows] if prox is not None else logprobs.detach()
            else:
                old = None  # log-linear approximation from the version stamps
            out = compute_policy_loss(
                PolicyLossInputs(
                    logprobs=logprobs,
                    old_logprobs=old,
                    advantages=advantages[rows],
                    loss_mask=mask[rows],
                    behav_logprobs=batch.behaviour_logprobs[rows],
                    ref_logprobs=None if ref is None else ref[rows],
                    entropy=entropy if algo.entropy_coef > 0 else entropy.detach(),
                    versions=batch.versions[rows].clamp(min=0),
                    current_version=self.version,
                ),
                algo,
            )
            applied += self._apply(out.loss)
            losses.append(float(out.loss.detach()))
            for key, value in out.metrics.items():
                metrics_sum[key] = metrics_sum.get(key, 0.0) + float(value) / self.cfg.minibatches
        stats = batch_statistics(batch, advantages, self.version)
        self._count_nonfinite(applied)
        self.version += 1
        seconds = time.perf_counter() - start
        self._busy_seconds += seconds
        all_versions = batch.versions[batch.versions >= 0]
        trained_versions = batch.versions[batch.loss_mask > 0]  # what η bounds
        oldest_trained = trained_versions.min() if trained_versions.numel() else self.version - 1
        metrics = {f"loss/{k}": v for k, v in metrics_sum.items()}
        metrics.update(stats)
        metrics.update(
            {
                "train/loss": sum(losses) / len(losses),
                "train/reward_mean": float(batch.rewards.mean()),
                "train/num_trajectories": float(len(batch.rewards)),
                "train/num_tokens": float(batch.num_tokens),
                "train/step_s": seconds,
                "train/tokens_per_s": batch.num_tokens / seconds,
                "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                "train/updates_applied": float(applied),
                "train/nonfinite_skipped_total": float(self.nonfinite_total),
                "train/version": float(self.version),
                "batch/version_min": float(all_versions.min()),
                "batch/version_max": float(all_versions.max()),
                "batch/age_max": float(self.version - 1 - oldest_trained),
                "batch/context_age_max": float(self.version - 1 - all_versions.min()),
            }
        )
        return metrics

    def train_step_and_export(self, groups: list[Group]) -> tuple[dict[str, float], bytes]:
        """`train_step`, then `export_weights`, as one actor call with two results: the
        launcher hands the second straight to the rollout worker, so the push starts the
        moment the step ends instead of after a round trip through the driver. If the step
        fails, both results carry its error, and no weights go out; if it changed nothing
        (every update skipped as non-finite), the export is None."""
        metrics = self.train_step(groups)
        return metrics, self.export_weights() if self._applied else None

    def _apply(self, loss: torch.Tensor) -> bool:
        """Backward and one optimizer update, unless the loss or the gradient norm is not
        finite: then nothing is applied. Returns whether the update was applied."""
        if not torch.isfinite(loss.detach()):
            self.engine.zero_grad()
            return False
        self.engine.backward(loss)
        if self.cfg.zero_stage == 0:
            # without ZeRO, DeepSpeed hands the step straight to the torch optimizer, which
            # would apply NaN: check the gradient here
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            if grads and not torch.isfinite(torch.stack([g.detach().norm() for g in grads]).norm()):
                self.engine.zero_grad()
                return False
        skipped = self.engine.skipped_steps
        self.engine.step()  # ZeRO optimizers skip a step whose gradient norm is not finite
        return self.engine.skipped_steps == skipped

    def _count_nonfinite(self, applied: int) -> None:
        self._applied = applied > 0
        skipped = self.cfg.minibatches - applied
        self.nonfinite_total += skipped
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + skipped if skipped else 0
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            raise NonFiniteStepsError(
                f"trainer: {self.nonfinite_in_a_row} optimizer updates in a row had a NaN or inf loss or gradient "
                f"norm (trainer.max_nonfinite_steps={self.cfg.max_nonfinite_steps}); each was skipped, nothing "
                f"applied. Usual causes: a learning rate too high (trainer.lr={self.cfg.lr}), rewards of extreme "
                "magnitude, or bf16 overflow. Lower trainer.lr, check the rewards, or set trainer.bf16=false."
            )

    def export_weights(self) -> bytes:
        """The current weights as a safetensors blob in HF checkpoint naming."""
        from safetensors.torch import save

        module = self.engine.module
        if self.cfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
        else:
            state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        return save(state)

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import load

        module = self.engine.module
        module.save_pretrained(path, state_dict=load(self.export_weights()))
        self.tokenizer.save_pretrained(path)

    def stats(self) -> dict[str, float]:
        return {"trainer/busy_s": self._busy_seconds, "trainer/version": float(self.version)}
