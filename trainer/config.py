"""The typed schema behind `configs/`: every YAML group is checked against these dataclasses.

Hydra composes `configs/config.yaml` and the command-line overrides onto `GroveConfig`,
so a misspelt key or a value of the wrong type fails before anything starts, and the
`__post_init__` checks below refuse combinations that would silently do the wrong thing.
Each package owns the dataclass for its own knobs (`AlgorithmConfig`, `RewardConfig`,
`RolloutConfig`, ...); this file only gathers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from algorithms import AlgorithmConfig
from buffer.sampling import SamplingConfig
from buffer.scheduler import RENAMED_STRAGGLER_POLICIES, STRAGGLER_POLICIES
from rewards.runner import RewardConfig
from rollout.config import RolloutConfig
from trainer.policy_trainer import TrainerConfig
from trainer.tiny_model import TinyModelSpec
from trainer.warmup import WarmupConfig


@dataclass
class ModelConfig:
    """`path` names an HF model folder; null builds (or reuses) the built-in tiny model."""

    path: Optional[str] = None
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)


@dataclass
class TaskConfig:
    """Where prompts come from: a built-in arithmetic generator, or json/parquet files."""

    name: str = "arithmetic"  # "arithmetic", "arithmetic_steps" (generated) or "files"
    seed: int = 0
    num_train: int = 4000
    num_eval: int = 400
    ops: str = "+-*"
    max_digits: int = 2  # arithmetic: digits of + and - operands
    max_digits_mul: int = 1  # arithmetic: digits of * operands
    min_ops: int = 2  # arithmetic_steps: operations per expression (= difficulty), min..max
    max_ops: int = 6
    max_operand: int = 20  # arithmetic_steps: + and - operands are 1..max_operand
    max_operand_mul: int = 9  # arithmetic_steps: operands next to a * are 2..max_operand_mul
    max_value: int = 999  # arithmetic_steps: every intermediate result lies in 0..max_value
    train_files: Optional[str] = None  # for name=files: a path or glob
    eval_files: Optional[str] = None
    prompt_key: str = "prompt"

    def __post_init__(self) -> None:
        if self.name not in ("arithmetic", "arithmetic_steps", "files"):
            raise ValueError(f"task.name={self.name!r} must be 'arithmetic', 'arithmetic_steps' or 'files'")
        if self.name == "files" and not (self.train_files and self.eval_files):
            raise ValueError("task.name=files needs task.train_files and task.eval_files")


@dataclass
class BufferConfig:
    max_staleness: int = 1  # η: no consumed token is more than η versions old
    # A group still generating when it is due (started η versions ago): `proceed` trains
    # without it, and when it arrives its tokens older than η are kept as context only
    # (counted in ledger.masked_tokens); `wait` holds the trainer until it finishes, so
    # every token is trained on. At η = 0 the two are the same: admission starts only one
    # batch of groups per version, so a batch cannot fill before all of them finish.
    stragglers: str = "proceed"


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class ClusterConfig:
    """Where the engines run. A profile in `configs/cluster/` sets this and the engine
    settings that differ between a CPU box and GPUs (pinning, dtype, eager mode). The
    trainer ranks and the rollout workers each hold a bundle of a Ray placement group
    (trainer/placement.py), on a local Ray or on an existing cluster alike."""

    name: str = "cpu_local"
    # null: a Ray of this run's own on this machine. "auto" (the cluster `ray start` made
    # on this machine), "host:port" or "ray://host:10001": connect to an existing cluster.
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # CPUs the local Ray may use; null = all (not used with cluster.address)
    rollout_cpus: float = 1.0  # CPUs Ray reserves per rollout worker actor
    trainer_cpus: float = 1.0  # CPUs Ray reserves per trainer rank
    rollout_gpus: float = 0.0  # GPUs per rollout worker actor
    trainer_gpus: float = 0.0  # GPUs per trainer rank
    # Ray placement strategies: PACK keeps the trainer ranks on as few nodes as possible
    # (their collectives stay inside a node); SPREAD puts rollout workers on different nodes.
    trainer_placement: str = "PACK"
    rollout_placement: str = "SPREAD"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD, for the rollout workers
    placement_timeout_s: float = 120.0  # Ray must place every actor within this, or the run stops, saying what is missing

    def __post_init__(self) -> None:
        for key in ("trainer_placement", "rollout_placement"):
            if getattr(self, key) not in PLACEMENT_STRATEGIES:
                raise ValueError(f"cluster.{key}={getattr(self, key)!r} is not one of {list(PLACEMENT_STRATEGIES)}")
        for kind in ("rollout", "trainer"):
            cpus, gpus = getattr(self, f"{kind}_cpus"), getattr(self, f"{kind}_gpus")
            if cpus < 0 or gpus < 0 or cpus + gpus <= 0:
                raise ValueError(f"cluster.{kind}_cpus={cpus} and cluster.{kind}_gpus={gpus}: each {kind} actor needs "
                                 "some CPU or GPU (both >= 0, not both 0)")
        if self.placement_timeout_s <= 0:
            raise ValueError(f"cluster.placement_timeout_s must be > 0, got {self.placement_timeout_s}")


@dataclass
class WeightSyncConfig:
    """How each version's weights reach the rollout engines: a registered transport
    (object_store) or a dotted path to your own (trainer/interfaces.py:WeightTransport)."""

    transport: str = "object_store"
    bucket_mb: float = 64.0  # broadcast: the most a bucket (hence a receiver's extra memory) holds
    delta: bool = False  # broadcast: send only the buckets whose bytes changed since the last version
    backend: str = "auto"  # broadcast: gloo | nccl | auto (nccl where CUDA is)
    timeout_s: float = 60.0  # broadcast: a member that does not answer within this fails the sync


@dataclass
class EvalConfig:
    every_steps: int = 50  # held-out evaluation every N trainer versions; 0 = only before/after
    max_rows: int = 400


@dataclass
class LoggerConfig:
    wandb: bool = True
    wandb_mode: Optional[str] = None  # null: online when WANDB_API_KEY is set, else offline
    project: str = "grove"
    console: bool = True
    console_every: int = 10  # a status line every this many steps, and the first and last (0: those two only)
    samples_every: int = 50  # a table of a few trained prompts and responses every this many steps (0: never)
    samples_per_step: int = 4


@dataclass
class GroveConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    output_root: str = "runs"
    run_name: str = "run"

    def __post_init__(self) -> None:
        eta = self.buffer.max_staleness
        if eta < 0:
            raise ValueError(f"buffer.max_staleness must be >= 0, got {eta}")
        if self.buffer.stragglers in RENAMED_STRAGGLER_POLICIES:
            raise ValueError(f"buffer.stragglers={self.buffer.stragglers!r} was renamed: set "
                             f"buffer.stragglers={RENAMED_STRAGGLER_POLICIES[self.buffer.stragglers]}")
        if self.buffer.stragglers not in STRAGGLER_POLICIES:
            raise ValueError(f"buffer.stragglers={self.buffer.stragglers!r} is not one of {list(STRAGGLER_POLICIES)}")
        if eta > 0 and not self.algorithm.decoupled and self.algorithm.tis == "none":
            raise ValueError(
                f"buffer.max_staleness={eta} trains on samples up to {eta} policy versions old, but "
                "algorithm.decoupled=false and algorithm.tis=none leave that off-policy gap uncorrected. "
                "Set algorithm.decoupled=true (AReaL's decoupled PPO) or algorithm.tis=token, "
                "or buffer.max_staleness=0 for synchronous training."
            )
        if self.rollout.overprovision > 1 and eta < 1:
            raise ValueError(
                f"rollout.overprovision={self.rollout.overprovision} (APRIL) carries unfinished groups into the "
                "next policy version, which buffer.max_staleness=0 forbids. Set buffer.max_staleness=1 "
                "(partial tokens older than that are masked out of the loss) or rollout.overprovision=1."
            )
        if self.rollout.workflow == "tree" and self.algorithm.novelty_sharpening:
            raise ValueError(
                "algorithm.novelty_sharpening (XRPO) sharpens one advantage per response, but rollout.workflow=tree "
                "gives per-token segment advantages (algorithm.tree_advantage): set algorithm.novelty_sharpening=false, "
                "or use rollout.workflow=group")
        sync = self.weight_sync
        if sync.transport == "broadcast":
            if self.rollout.max_restarts > 0:
                raise ValueError(
                    "weight_sync.transport=broadcast forms one process group with every engine at start-up, which "
                    "a replacement worker cannot join in this version: set rollout.max_restarts=0 (a dead worker "
                    "then stops the run) or weight_sync.transport=object_store")
            if int(self.rollout.engine.extra_args.get("tensor_parallel_size", 1)) > 1:
                raise ValueError("weight_sync.transport=broadcast sends whole tensors to one model worker per engine; "
                                 "with tensor_parallel_size > 1 use weight_sync.transport=object_store")
            if sync.bucket_mb <= 0 or sync.timeout_s <= 0 or sync.backend not in ("auto", "gloo", "nccl"):
                raise ValueError(f"weight_sync: bucket_mb and timeout_s must be > 0 and backend auto|gloo|nccl, "
                                 f"got {sync.bucket_mb}, {sync.timeout_s}, {sync.backend!r}")
        cluster, workers, ranks = self.cluster, self.rollout.num_workers, self.trainer.world_size
        wanted = workers * cluster.rollout_cpus + ranks * cluster.trainer_cpus
        if cluster.address is None and cluster.num_cpus is not None and wanted > cluster.num_cpus:
            share = cluster.num_cpus / (workers + ranks)
            raise ValueError(
                f"rollout.num_workers={workers} x cluster.rollout_cpus={cluster.rollout_cpus} + trainer.world_size="
                f"{ranks} x cluster.trainer_cpus={cluster.trainer_cpus} = {wanted:g} CPUs, but cluster.num_cpus="
                f"{cluster.num_cpus}: Ray could never place them all. Set cluster.rollout_cpus={share:g} and "
                f"cluster.trainer_cpus={share:g} (the actors share the CPUs) or raise cluster.num_cpus."
            )
        needs = self.algorithm.requires_sampler
        if needs is not None and self.sampling.name != needs:
            raise ValueError(
                f"algorithm={self.algorithm.name} needs its {needs!r} prompt sampler, but sampling.name="
                f"{self.sampling.name!r}: without it the run would not be {self.algorithm.name}. Drop the "
                f"sampling override (algorithm={self.algorithm.name} selects sampling={needs}), or set sampling={needs}."
            )


def register_configs() -> None:
    """Register the schema so `configs/config.yaml` can name it first in its defaults."""
    store = ConfigStore.instance()
    store.store(name="grove_schema", node=GroveConfig)
