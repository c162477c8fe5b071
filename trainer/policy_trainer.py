"""The DeepSpeed side: groups in, one optimizer update, new weights out.

`train_step` is the whole story of a batch: rewards become group-relative advantages
(a tree group's, per token from `algorithm.tree_advantage`, its shared prefixes trained once),
the current policy re-scores every response token, `algorithms.compute_policy_loss`
turns that into a loss with the engine's behaviour logprobs as the reference, and one
DeepSpeed step later the version goes up by one. `export_weights` then hands the new
weights to the rollout side as a safetensors blob.

Memory follows the micro-batch, not the batch. Each (mini)batch is one optimizer update,
run as micro-batches of length-sorted rows (`length_buckets`, at most
`trainer.max_tokens_per_micro_batch` padded tokens each) whose gradients accumulate in
DeepSpeed. The loss denominators are the whole (mini)batch's (`algorithms.loss_denominators`),
so each micro-batch's loss is its exact share of the batch loss and the accumulated
gradient is the full-batch gradient in every aggregation mode. The chosen-token logprob
and the entropy come from the model's last hidden states and its output layer in chunks
of positions, each recomputed in the backward pass (`chunked_head_logprobs`): the fp32
(positions x vocabulary) logits never exist for more than one chunk.

Several ranks: `Trainer(..., rank=r, world_size=M, master_addr=..., master_port=...)`, one
process each, every one given the WHOLE batch by `train_step`. Each rank deterministically
takes its share of every update's rows, balanced by tokens (`split_by_tokens`), and the
ranks run the same number of micro-batches (a rank short of work runs zero-loss ones), so
ZeRO's collectives pair up. DeepSpeed averages the ranks' gradients; each rank's loss is
scaled by M, so the update is the single-rank update of the same batch. Rank 0 alone
returns the exported weights; under ZeRO-3 every rank must call `export_weights` (the
parameters are gathered module by module, a collective).

A non-finite loss or gradient norm skips the optimizer update: nothing is applied, the
step's export is None (no weights travel; the rollout only relabels its version), and
`trainer.max_nonfinite_steps` such steps in a row stop the run. The version still counts
batches, the unit of admission and staleness.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from algorithms import (
    AlgorithmConfig,
    LossDenominators,
    PolicyLossInputs,
    compute_advantages,
    compute_policy_loss,
    loss_denominators,
)
from algorithms.losses import importance_weights, loglinear_prox
from buffer.types import Group
from trainer.batching import PackedBatch, UpdatePlan, batch_statistics, pack_groups, plan_update, row_advantages
from trainer.broadcast_sender import BroadcastSender
from trainer.distributed import gathered_state_dict, init_process_group, pin_to_cores, rendezvous_address
from trainer.logprobs import install_policy_forward, supports_chunked_head, token_logprobs


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
    # A (mini)batch runs as micro-batches of at most this many tokens (rows x their padded
    # length, prompt + response), gradients accumulated to one optimizer update: activation
    # memory follows this, not the batch. A longer row is a micro-batch of its own. The
    # built-in model's whole default batch (256 rows x 64 positions) fits in one.
    max_tokens_per_micro_batch: int = 16384
    # The chosen-token logprob and entropy are taken from the output layer this many
    # positions at a time, each chunk recomputed in the backward pass: the fp32 logits
    # peak at about 4 x chunk x vocabulary x 4 bytes (1024 x 152k: ~2.5 GB), whatever the
    # micro-batch. Only trained (loss-mask) positions are scored.
    logits_chunk_tokens: int = 1024
    # Trainer ranks (processes; GPUs on a GPU machine), DeepSpeed data parallel with
    # ZeRO `zero_stage`. Every rank gets the whole batch and trains its share of the
    # tokens; the update equals the single-rank one. The launcher starts the ranks.
    world_size: int = 1
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
        if self.max_tokens_per_micro_batch < 1:
            raise ValueError(f"trainer.max_tokens_per_micro_batch must be >= 1, got {self.max_tokens_per_micro_batch}")
        if self.logits_chunk_tokens < 1:
            raise ValueError(f"trainer.logits_chunk_tokens must be >= 1, got {self.logits_chunk_tokens}")
        if self.world_size < 1:
            raise ValueError(f"trainer.world_size must be >= 1, got {self.world_size}")




class NonFiniteStepsError(RuntimeError):
    """Too many steps in a row had a NaN or inf loss or gradient norm."""




# compute_policy_loss's metrics that are means over the trained tokens before rejection
# (the off-policy weights'); the others are over the tokens rejection keeps.
_OVER_TRAINED_TOKENS = ("is_weight_mean", "is_clipped_frac", "rejected_frac")


class Trainer(BroadcastSender):
    """A DeepSpeed engine around a causal LM, plus the policy version it has reached.

    One rank of `world_size` (default trainer.world_size): every rank is constructed with
    its rank and rank 0's address (`rendezvous_address`), or gets the address in `setup`,
    which joins the process group. Then every rank receives the same calls with the same
    arguments: `train_step(groups)` with the whole batch, `train_step_and_export`,
    `export_weights` and `save_pretrained` (whose results count on rank 0 only)."""

    def __init__(self, model_path: str, cfg: TrainerConfig, algorithm: AlgorithmConfig,
                 temperature: float = 1.0, rank: int = 0, world_size: Optional[int] = None,
                 master_addr: Optional[str] = None, master_port: Optional[int] = None) -> None:
        self.model_path = model_path
        self.cfg = cfg
        self.algorithm = algorithm
        self.temperature = temperature
        self.rank = rank
        self.world_size = cfg.world_size if world_size is None else world_size
        if not 0 <= rank < self.world_size:
            raise ValueError(f"trainer rank {rank} is not in [0, world_size={self.world_size})")
        self.master_addr = master_addr
        self.master_port = master_port
        self.version = 0
        self._busy_seconds = 0.0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._applied = True  # whether the last step changed the weights

    def rendezvous(self) -> tuple[str, int]:
        """`rendezvous_address()` of this rank's machine: call it on rank 0 before `setup`."""
        return rendezvous_address()

    def setup(self, master_addr: Optional[str] = None, master_port: Optional[int] = None) -> dict[str, float]:
        start = time.perf_counter()
        pin_to_cores(self.cfg.cpu_cores, self.cfg.num_threads)
        torch.manual_seed(self.cfg.seed)
        init_process_group(self.cfg.dist_backend, self.rank, self.world_size, master_addr or self.master_addr,
                           master_port or self.master_port)
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
            betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
        )
        ds_config = {
            # One optimizer update per (mini)batch of any number of micro-batches: train_step
            # marks the accumulation boundary itself (set_gradient_accumulation_boundary) and
            # scales the losses, so DeepSpeed's own count and loss scaling stay at 1.
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.cfg.grad_clip,
            "zero_optimization": {"stage": self.cfg.zero_stage, "stage3_param_persistence_threshold": 0},
            # bf16 steps skip on a non-finite gradient as fp32 ZeRO steps do (see _step)
            "bf16": {"enabled": self.cfg.bf16, "check_grad_overflow": True},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        metrics = {}
        compile_start = time.perf_counter()
        if self.cfg.compile:  # before DeepSpeed wraps it: the warm-up must not reach its gradient hooks
            # The forward only, not the module's whole call: DeepSpeed adds forward hooks to
            # the module, which dynamo would otherwise trace in the first real step, after
            # the warm-up; outside the compiled region they run eagerly. With the chunked
            # output layer, the compiled forward is the base model's (all but the head).
            target = getattr(model, model.base_model_prefix) if supports_chunked_head(model) else model
            target.forward = torch.compile(target.forward, dynamic=True)
        install_policy_forward(model)
        if self.cfg.compile:
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

    # --- the plan of a step -------------------------------------------------------------

    def _plan(self, batch: PackedBatch, num_groups: int) -> list[UpdatePlan]:
        """One plan per (mini)batch, each a slice of the groups: this rank's micro-batches."""
        lengths = batch.attention_mask.sum(-1).tolist()
        scored = (batch.loss_mask > 0).sum(-1).tolist()
        plans = []
        for groups in torch.arange(num_groups, device=batch.group_index.device).chunk(self.cfg.minibatches):
            rows = torch.isin(batch.group_index, groups).nonzero().flatten().tolist()
            plans.append(plan_update(rows, lengths, scored, self.rank, self.world_size, self.cfg.bucket_overhead_tokens,
                                     self.cfg.max_tokens_per_micro_batch, self.cfg.logits_chunk_tokens))
        return plans

    def _micro_inputs(self, batch: PackedBatch, rows: list[int]):
        """Row indices and tensor width of a micro-batch: its rows cut to its longest."""
        index = torch.tensor(rows, device=batch.input_ids.device)
        return index, int(batch.attention_mask[index].sum(-1).max())

    def _stand_in_logprobs(self, chunks: int) -> torch.Tensor:
        """A rank short of rows runs this instead: one row of pad tokens through the model
        (its ZeRO collectives must pair with the other ranks'), with `chunks` positions."""
        ids = torch.full((1, chunks + 1), self.tokenizer.pad_token_id, dtype=torch.long, device=self.engine.device)
        return token_logprobs(self.engine, ids, torch.ones_like(ids), self.temperature, num_chunks=chunks)

    @torch.no_grad()
    def _score(self, model, batch: PackedBatch, plans: list[UpdatePlan], engine: bool = True) -> torch.Tensor:
        """No-grad logprobs (B, L-1) of this rank's rows of `plans` (0 elsewhere and off the
        loss mask). Through the engine, stand-ins run too, to pair ZeRO-3's gathers."""
        out = torch.zeros_like(batch.loss_mask)
        for plan in plans:
            for rows, chunks in zip(plan.micro_batches, plan.head_chunks):
                if rows is None:
                    if engine:
                        self._stand_in_logprobs(chunks)
                    continue
                index, width = self._micro_inputs(batch, rows)
                out[index, : width - 1] = token_logprobs(
                    model, batch.input_ids[index, :width], batch.attention_mask[index, :width], self.temperature,
                    positions=batch.loss_mask[index, : width - 1] > 0, num_chunks=chunks)
        return out

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def _denominators(self, batch: PackedBatch, plan: UpdatePlan, prox: Optional[torch.Tensor]) -> LossDenominators:
        """The whole (mini)batch's loss denominators, before any of its micro-batches runs.

        Every rank holds the whole batch, so the trained-token and sequence counts are
        global as they stand. Rejection (algorithm.rejection) drops tokens from them by
        π_old/π_behav, which needs this rank's π_old first (a no-grad pass when π_old is the
        current policy) and a sum over ranks."""
        algo = self.algorithm
        longest = float(batch.response_lengths.max())
        if algo.rejection == "none":
            return loss_denominators(batch.loss_mask[plan.rows], max_response_length=longest)
        if not plan.split:  # the one micro-batch is the whole batch: its own counts are right
            return LossDenominators(length=longest)
        behav = batch.behaviour_logprobs
        if not algo.decoupled:
            old = behav
        elif algo.prox_mode == "recompute":
            old = prox  # train_step computed it before this update's weights changed
        else:
            current = self._score(self.engine, batch, [plan])
            versions = batch.versions.clamp(min=0)
            old = loglinear_prox(behav, current, versions, v_prox=self.version, v_current=self.version + 1)
        mine = [i for rows in plan.micro_batches if rows is not None for i in rows]
        index = torch.tensor(mine, dtype=torch.long, device=behav.device)
        mask = batch.loss_mask[index]
        _, keep, _ = importance_weights(
            old[index], behav[index], mask, decoupled=algo.decoupled, tis=algo.tis, tis_cap=algo.tis_cap,
            rejection=algo.rejection, rejection_low=algo.rejection_low, rejection_high=algo.rejection_high)
        kept = mask * keep
        counts = torch.stack([kept.sum(), (kept.sum(-1) > 0).sum().to(kept.dtype)]).double()
        tokens, sequences = self._all_reduce(counts).tolist()
        return LossDenominators(tokens=tokens, sequences=sequences, length=longest)

    # --- a step ---------------------------------------------------------------------------

    def train_step(self, groups: list[Group]) -> dict[str, float]:
        """One policy version from these groups: `minibatches` optimizer updates; returns
        metrics and bumps the version. With several ranks, every rank is given the same,
        whole, batch, and returns the same metrics."""
        start = time.perf_counter()
        algo = self.algorithm
        if algo.novelty_sharpening and any(g.tree_parents for g in groups):
            raise ValueError("algorithm.novelty_sharpening sharpens one advantage per response, but this batch has "
                             "tree groups (rollout.workflow=tree), whose advantages are per segment "
                             f"(algorithm.tree_advantage={algo.tree_advantage!r}): "
                             "set algorithm.novelty_sharpening=false")
        batch = pack_groups(groups, self.tokenizer.pad_token_id, algo.tree_advantage,
                            algo.adv_eps).to(self.engine.device)
        self.engine.train()
        mask = batch.loss_mask
        plans = self._plan(batch, len(groups))
        recompute = algo.decoupled and algo.prox_mode == "recompute"
        # π_prox of decoupled PPO (AReaL) is these weights before this step's updates. With
        # one update per batch that is the gradient pass itself, so no extra forward is paid
        # (unless rejection needs it for the denominators before a split update starts).
        prox = ref = None
        rejection_first = algo.rejection != "none" and any(plan.split for plan in plans)
        if algo.novelty_sharpening or (recompute and (self.cfg.minibatches > 1 or rejection_first)):
            prox = self._score(self.engine, batch, plans)
        if self.reference is not None:
            ref = self._score(self.reference, batch, plans, engine=False)
        seq_mean = None
        if algo.novelty_sharpening:  # XRPO scores novelty by the response's mean logprob
            seq_mean = self._all_reduce((prox * mask).sum(-1) / mask.sum(-1).clamp(min=1))  # each row is one rank's
        advantages = compute_advantages(batch.rewards, batch.group_index, algo, seq_mean_logprobs=seq_mean)
        advantages = row_advantages(batch, advantages)  # (B,), or (B, L-1) with tree groups
        metrics_sum: dict[str, float] = {}
        losses = []
        applied = 0
        for plan in plans:
            ok, loss, metrics = self._update(batch, plan, advantages, prox, ref)
            applied += ok
            losses.append(loss)
            for key, value in metrics.items():
                metrics_sum[key] = metrics_sum.get(key, 0.0) + value / self.cfg.minibatches
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
                "train/micro_batches": float(sum(len(plan.micro_batches) for plan in plans)),
                "train/nonfinite_skipped_total": float(self.nonfinite_total),
                "train/version": float(self.version),
                "batch/version_min": float(all_versions.min()),
                "batch/version_max": float(all_versions.max()),
                "batch/age_max": float(self.version - 1 - oldest_trained),
                "batch/context_age_max": float(self.version - 1 - all_versions.min()),
            }
        )
        return metrics

    def _update(self, batch: PackedBatch, plan: UpdatePlan, advantages: torch.Tensor,
                prox: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> tuple[bool, float, dict[str, float]]:
        """One optimizer update over `plan`: each micro-batch's forward, loss (with the whole
        batch's denominators) and backward, gradients accumulated; then one step. Returns
        whether it was applied, the batch loss and the loss metrics: means over the
        micro-batches and ranks weighted by the tokens each mean was taken over (maxima for
        *_max), so they are the whole batch's."""
        algo = self.algorithm
        recompute = algo.decoupled and algo.prox_mode == "recompute"
        denominators = self._denominators(batch, plan, prox)
        loss_sum = 0.0
        weighted: dict[str, tuple[float, float]] = {}  # key: (Σ value x tokens, Σ tokens)
        maxima: dict[str, float] = {}
        last = len(plan.micro_batches) - 1
        for k, (rows, chunks) in enumerate(zip(plan.micro_batches, plan.head_chunks)):
            if rows is None:  # nothing of this rank's here: zero loss, same collectives
                logprobs = self._stand_in_logprobs(chunks)
                self._backward(logprobs.sum() * 0.0, boundary=k == last, anchor=logprobs)
                continue
            index, width = self._micro_inputs(batch, rows)
            cut = (index, slice(0, width - 1))
            mask = batch.loss_mask[cut]
            logprobs, entropy = token_logprobs(
                self.engine, batch.input_ids[index, :width], batch.attention_mask[index, :width], self.temperature,
                with_entropy=True, positions=mask > 0, num_chunks=chunks)
            if not algo.decoupled:
                old = batch.behaviour_logprobs[cut]
            elif recompute:
                old = prox[cut] if prox is not None else logprobs.detach()
            else:
                old = None  # log-linear approximation from the version stamps
            out = compute_policy_loss(
                PolicyLossInputs(
                    logprobs=logprobs,
                    old_logprobs=old,
                    advantages=advantages[index] if advantages.dim() == 1 else advantages[cut],
                    loss_mask=mask,
                    behav_logprobs=batch.behaviour_logprobs[cut],
                    ref_logprobs=None if ref is None else ref[cut],
                    entropy=entropy if algo.entropy_coef > 0 else entropy.detach(),
                    versions=batch.versions[cut].clamp(min=0),
                    current_version=self.version,
                ),
                algo,
                denominators,
            )
            # DeepSpeed averages the ranks' gradients; the denominators already make the
            # ranks' losses add up to the batch loss
            self._backward(out.loss * self.world_size, boundary=k == last, anchor=logprobs)
            loss_sum += float(out.loss.detach())
            trained = float(mask.sum())
            kept = trained * (1 - float(out.metrics.get("rejected_frac", 0.0)))  # what the loss keeps
            for key, value in out.metrics.items():
                if key.endswith("_max"):
                    maxima[key] = max(maxima.get(key, -math.inf), float(value))
                else:  # the off-policy weights' metrics are over the trained tokens, the rest over the kept
                    tokens = trained if key in _OVER_TRAINED_TOKENS else kept
                    value_sum, token_sum = weighted.get(key, (0.0, 0.0))
                    weighted[key] = (value_sum + float(value) * tokens, token_sum + tokens)
        applied = self._step()
        parts = [(loss_sum, weighted, maxima)]
        if self.world_size > 1:
            import torch.distributed as dist

            parts = [None] * self.world_size
            dist.all_gather_object(parts, (loss_sum, weighted, maxima))
        metrics = {}
        for key in {key for p in parts for key in p[1]}:
            value_sum, token_sum = (sum(p[1][key][i] for p in parts if key in p[1]) for i in (0, 1))
            metrics[key] = value_sum / token_sum if token_sum else 0.0
        for key in {key for p in parts for key in p[2]}:
            metrics[key] = max(p[2][key] for p in parts if key in p[2])
        return applied, sum(p[0] for p in parts), metrics

    def train_step_and_export(self, groups: list[Group]) -> tuple[dict[str, float], Optional[bytes]]:
        """`train_step`, then `export_weights`, as one actor call with two results: the
        launcher hands the second straight to the rollout worker, so the push starts the
        moment the step ends instead of after a round trip through the driver. If the step
        fails, both results carry its error, and no weights go out; if it changed nothing
        (every update skipped as non-finite), the export is None. With several ranks every
        rank makes this call; rank 0's export is the weights, the others' None."""
        metrics = self.train_step(groups)
        if not self._applied:
            return metrics, None
        if self._bucket_plan is not None:  # the broadcast transport: a ticket now, the buckets in broadcast_send
            return metrics, self.broadcast_ticket(self.version)
        return metrics, self.export_weights()

    def export_versioned(self) -> tuple[int, Optional[bytes]]:
        """The version and its weights together, so that a late-joining engine (a replaced
        rollout worker) can never get one version's weights labelled with another."""
        return self.version, self.export_weights()

    def weights_state(self) -> dict[str, torch.Tensor]:
        """The policy's weights by checkpoint name, gathered under ZeRO-3 (a collective)."""
        if self.cfg.zero_stage == 3:
            return gathered_state_dict(self.engine.module, keep=self.rank == 0)
        return {k: v.detach() for k, v in self.engine.module.state_dict().items()}

    def _backward(self, loss: torch.Tensor, boundary: bool, anchor: Optional[torch.Tensor] = None) -> bool:
        """Accumulate one micro-batch's gradient; `boundary` marks the update's last one,
        where ZeRO reduces the gradients across ranks. Returns whether the loss was finite.

        A non-finite loss is caught before its backward, which then carries NaN into the
        gradient on purpose (`anchor`, the micro-batch's logprobs, times NaN): the reduction
        takes it to every rank, and the update's step is skipped there, as a whole, by
        DeepSpeed's overflow check (see `_step`). Skipping the backward instead would leave
        the ranks' collectives unpaired and the micro-batches before it accumulated."""
        finite = bool(torch.isfinite(loss.detach()))
        if not finite:
            loss = (anchor if anchor is not None else loss).sum() * float("nan")
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)
        return finite

    def _step(self) -> bool:
        """The one optimizer update of the accumulated gradient, unless its norm is not
        finite: then nothing is applied. Returns whether the update was applied."""
        if self.cfg.zero_stage == 0:
            # without ZeRO, DeepSpeed hands the step straight to the torch optimizer, which
            # would apply NaN: check the (already reduced) gradient here
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            if grads and not torch.isfinite(torch.stack([g.detach().norm() for g in grads]).norm()):
                self.engine.zero_grad()
                return False
        if not self.engine.is_gradient_accumulation_boundary():  # the last backward must have marked it
            raise RuntimeError("trainer: optimizer step outside a gradient accumulation boundary")
        skipped = self.engine.skipped_steps
        self.engine.step()  # ZeRO optimizers skip a step whose gradient norm is not finite
        return self.engine.skipped_steps == skipped

    def _apply(self, loss: torch.Tensor) -> bool:
        """Backward and one optimizer update of a single micro-batch, unless the loss or
        the gradient norm is not finite: then nothing is applied. Returns whether the
        update was applied."""
        self._backward(loss, boundary=True)
        return self._step()

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

    def export_weights(self) -> Optional[bytes]:
        """The current weights as a safetensors blob in HF checkpoint naming, on rank 0;
        None on the other ranks. Under ZeRO-3 every rank must call it: the parameters are
        gathered one module at a time (`gathered_state_dict`), a collective."""
        from safetensors.torch import save

        module = self.engine.module
        if self.cfg.zero_stage == 3:
            state = gathered_state_dict(module, keep=self.rank == 0)
        elif self.rank == 0:
            state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        return save(state) if self.rank == 0 else None

    def save_pretrained(self, path: str) -> None:
        """The current model and tokenizer as an HF folder, written by rank 0; every rank
        calls it (see `export_weights`)."""
        from safetensors.torch import load

        blob = self.export_weights()
        if self.rank == 0:
            self.engine.module.save_pretrained(path, state_dict=load(blob))
            self.tokenizer.save_pretrained(path)

    def stats(self) -> dict[str, float]:
        return {"trainer/busy_s": self._busy_seconds, "trainer/version": float(self.version)}
