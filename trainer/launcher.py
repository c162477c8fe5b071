"""Wires one run together: data, model, a rollout actor, a trainer actor, and the loop between.

The loop is the whole asynchronous algorithm, so it stays on one screen:

    admit new prompts while the staleness rule allows  ──>  rollout worker generates
    collect finished groups into the buffer            <──  (scored, versioned)
    when B groups wait and the trainer is idle: train one step on them
    when a step ends: the trainer's new weights go straight to the worker (v + 1)

Generation never stops for training; the worker is paused only for the ~50 ms a weight
load takes. Ray carries the two plain classes as actors, each pinned to its own core.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from buffer.arithmetic import ArithmeticSpec
from buffer.buffer import Ledger, StalenessManager, TrajectoryBuffer
from buffer.datasets import PromptData, arithmetic_data, file_data
from buffer.prompts import PromptPool
from buffer.types import Group
from trainer.config import GroveConfig
from trainer.metrics import MetricsLogger


@dataclass
class RunSummary:
    accuracy_before: float
    accuracy_after: float
    run_dir: Path
    steps: int
    ledger: dict[str, int]
    seconds: float


def load_data(cfg: GroveConfig) -> PromptData:
    task = cfg.task
    if task.name == "files":
        return file_data(task.train_files, task.eval_files, task.prompt_key)
    return arithmetic_data(
        ArithmeticSpec(
            seed=task.seed, num_train=task.num_train, num_eval=task.num_eval, ops=tuple(task.ops),
            max_digits=task.max_digits, max_digits_mul=task.max_digits_mul,
        )
    )


def resolve_model(cfg: GroveConfig, data: PromptData, log) -> str:
    if cfg.model.path:
        if not Path(cfg.model.path, "config.json").exists():
            raise FileNotFoundError(f"model.path={cfg.model.path!r} has no config.json (an HF model folder is expected)")
        return str(cfg.model.path)
    from trainer.warmup import ensure_default_model

    return str(ensure_default_model(cfg.model.tiny, cfg.model.warmup, data.train, data.fingerprint, log=log))


class StartupError(Exception):
    """Bad input found before any engine started: the message says what and where."""


def preflight(cfg: GroveConfig, say) -> tuple[PromptData, str]:
    """Everything that can fail on bad input, checked before Ray, vLLM or DeepSpeed start:
    the dataset rows, the model folder, and every reward against one dataset row."""
    from rewards.runner import RewardRunner

    try:
        data = load_data(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise StartupError(f"task: {err}") from err
    try:
        RewardRunner(cfg.reward, example_row=data.train[0], cwd=os.getcwd()).close()
    except Exception as err:  # import errors, bad specs, wrong signatures
        raise StartupError(f"reward: {err}") from err
    try:
        model_path = resolve_model(cfg, data, say)
    except (ValueError, FileNotFoundError) as err:
        raise StartupError(f"model: {err}") from err
    return data, model_path


def start_actors(cfg: GroveConfig, model_path: str):
    """A rollout actor and a trainer actor on a local Ray, one core each."""
    import ray

    from rollout.engine import engine_env
    from rollout.worker import RolloutWorker
    from trainer.policy_trainer import Trainer

    quiet = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
             "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=True,
                 configure_logging=True)
    rollout_env = {**quiet, **engine_env(cfg.rollout.engine)}
    worker = ray.remote(num_cpus=1, max_restarts=0)(RolloutWorker).options(
        runtime_env={"env_vars": rollout_env}).remote(model_path, cfg.rollout, cfg.reward, os.getcwd())
    trainer = ray.remote(num_cpus=1, max_restarts=0)(Trainer).options(
        runtime_env={"env_vars": quiet}).remote(model_path, cfg.trainer, cfg.algorithm, cfg.rollout.temperature)
    return worker, trainer


def train(cfg: GroveConfig, run_dir: Path) -> RunSummary:
    import ray

    started_at = time.perf_counter()
    logger = MetricsLogger(run_dir, dataclasses.asdict(cfg), cfg.logger.wandb, cfg.logger.wandb_mode,
                           cfg.logger.project, cfg.logger.console)
    say = logger.progress
    try:
        data, model_path = preflight(cfg, say)
        eval_rows = data.eval[: cfg.eval.max_rows]
        say(f"model: {model_path}")
        worker, trainer = start_actors(cfg, model_path)
        setup = ray.get([worker.astart.remote(), trainer.setup.remote()])
        say(f"engines ready: {setup}")
        before = ray.get(worker.evaluate.remote(eval_rows))
        logger.log(0, before)
        say(f"held-out accuracy before RL: {before['eval/accuracy']:.3f}")
        steps, ledger = run_loop(cfg, data, worker, trainer, logger, eval_rows)
        after = ray.get(worker.evaluate.remote(eval_rows))
        logger.log(steps, after)
        say(f"held-out accuracy after RL: {after['eval/accuracy']:.3f}")
        ray.get(trainer.save_pretrained.remote(str(run_dir / "final_model")))
        ray.get(worker.ashutdown.remote())
        return RunSummary(before["eval/accuracy"], after["eval/accuracy"], run_dir, steps, ledger,
                          time.perf_counter() - started_at)
    finally:
        logger.close()
        if ray.is_initialized():
            ray.shutdown()


class LoopState:
    """Where every group is, from the launcher's side: the ledger's evidence."""

    def __init__(self, cfg: GroveConfig) -> None:
        self.eta = cfg.buffer.max_staleness
        self.buffer = TrajectoryBuffer(self.eta)
        self.ledger = Ledger()
        self.running: dict[str, int] = {}  # group id -> start version, for groups generating
        self.partial_pool: list[Group] = []  # APRIL: unfinished groups waiting to resume
        self.was_partial: set[str] = set()
        self.filtered_in_a_row = 0

    def absorb(self, collected, dynamic_sampling: bool, max_filtered: int) -> None:
        """File what the worker handed over under the right state and count it."""
        for group in collected.groups:
            self.running.pop(group.group_id)
            self.ledger.finished += 1
            if dynamic_sampling and len(set(group.rewards)) == 1:
                self.ledger.filtered += 1
                self.filtered_in_a_row += 1
                if self.filtered_in_a_row > max_filtered:
                    raise RuntimeError(
                        f"dynamic sampling filtered {self.filtered_in_a_row} groups in a row (every response "
                        "in each scored the same): the task is too easy or too hard for this policy. Lower "
                        "the difficulty, raise algorithm.max_num_gen_batches, or set algorithm.dynamic_sampling=false."
                    )
                continue
            self.filtered_in_a_row = 0
            self.buffer.put(group)
        for group_id in collected.dropped:
            self.running.pop(group_id)
            self.ledger.dropped_by_reward += 1
        for group in collected.partial:
            self.running.pop(group.group_id)
            self.partial_pool.append(group)
            self.was_partial.add(group.group_id)
            self.ledger.partial += 1

    def summary(self, cancelled: int) -> dict[str, int]:
        return {**self.ledger.as_dict(), "unfinished_at_exit": cancelled, "buffered_at_exit": len(self.buffer),
                "partial_at_exit": len(self.partial_pool),
                "lost": self.ledger.lost(cancelled, len(self.buffer), len(self.partial_pool))}


def run_loop(cfg: GroveConfig, data: PromptData, worker, trainer, logger: MetricsLogger,
             eval_rows: list[dict]) -> tuple[int, dict[str, int]]:
    """The asynchronous loop from the module docstring; returns (versions, ledger)."""
    import ray

    batch_groups, total = cfg.trainer.batch_groups, cfg.trainer.total_steps
    april = cfg.rollout.overprovision > 1
    algo = cfg.algorithm
    max_filtered = algo.max_num_gen_batches * batch_groups
    pool = PromptPool(data.train, cfg.rollout.n_samples, seed=cfg.seed, prompt_key=cfg.task.prompt_key)
    gate = StalenessManager(batch_groups, cfg.buffer.max_staleness)
    state = LoopState(cfg)
    ledger = state.ledger
    version = 0  # trainer's
    synced = 0  # the worker's: admission follows the weights rollouts actually use
    collect_ref = worker.collect.remote(min_groups=1, timeout_s=2.0)
    train_ref = sync_ref = eval_ref = None
    step_metrics: dict[str, float] = {}
    batch_ages: list[int] = []
    partial_ratio = 0.0
    sync_started = 0.0
    loop_start = last_time = time.perf_counter()
    first_stats = last_stats = ray.get(worker.stats.remote())
    trainer_idle, trainer_idle_since = 0.0, loop_start

    while version < total or sync_ref is not None or eval_ref is not None:
        if version < total and state.partial_pool and synced == version:
            # APRIL: unfinished groups resume first, on the new weights, before new prompts
            mask_before = synced - state.eta
            for group in state.partial_pool:
                group.start_version = max(group.start_version, mask_before)
                state.running[group.group_id] = group.start_version
            worker.resume.remote(state.partial_pool, mask_before)
            ledger.resumed += len(state.partial_pool)
            state.partial_pool = []
        if version < total and not state.partial_pool:
            if april:  # keep overprovision x B groups in flight, once the new weights are in
                capacity = int(cfg.rollout.overprovision * batch_groups) - len(state.running) if synced == version else 0
            else:
                capacity = gate.capacity(synced, ledger.started - ledger.retired)
            if capacity > 0:
                items = pool.next(capacity, version=synced)
                state.running.update((item.group_id, synced) for item in items)
                worker.submit.remote(items)
                ledger.started += capacity
        if train_ref is None and version < total:
            # APRIL re-bases what it interrupts, so only AReaL-admitted groups bind the schedule.
            binding = () if april else state.running.values()
            batch = state.buffer.get(batch_groups, version, binding)
            if batch is not None:
                if april:
                    worker.interrupt_groups.remote()  # the rest comes back as partial groups
                train_ref = trainer.train_step.remote(batch)
                ledger.consumed += len(batch)
                batch_ages = [version - g.start_version for g in batch]
                partial_ratio = sum(g.group_id in state.was_partial for g in batch) / len(batch)
                state.was_partial.difference_update(g.group_id for g in batch)
                trainer_idle += time.perf_counter() - trainer_idle_since
        pending = [r for r in (collect_ref, train_ref, sync_ref, eval_ref) if r is not None]
        ready, _ = ray.wait(pending, num_returns=1)
        if collect_ref in ready:
            state.absorb(ray.get(collect_ref), algo.dynamic_sampling, max_filtered)
            collect_ref = worker.collect.remote(min_groups=1, timeout_s=2.0)
        if train_ref is not None and train_ref in ready:
            step_metrics = ray.get(train_ref)
            train_ref = None
            trainer_idle_since = time.perf_counter()
            version += 1
            sync_started = time.perf_counter()
            sync_ref = worker.update_weights.remote(trainer.export_weights.remote(), version)
        if sync_ref is not None and sync_ref in ready:
            sync = ray.get(sync_ref)
            sync_ref = None
            synced = version
            stats = ray.get(worker.stats.remote())
            now = time.perf_counter()
            ledger.samples_interrupted = int(stats["rollout/samples_interrupted"])
            wall = max(now - last_time, 1e-9)
            metrics = {
                **step_metrics,
                **stats,
                "weight_sync/apply_s": sync["weight_sync_apply_s"],
                "weight_sync/drain_s": sync["weight_sync_drain_s"],
                "weight_sync/load_s": sync["weight_sync_load_s"],
                "weight_sync/total_s": now - sync_started,
                "weight_sync/bytes": float(sync["weight_bytes"]),
                "rollout/requests_interrupted": float(sync["requests_interrupted"]),
                "rollout/tokens_per_s": (stats["rollout/tokens_generated"] - last_stats["rollout/tokens_generated"]) / wall,
                "rollout/idle_ratio": 1.0 - (stats["rollout/busy_s"] - last_stats["rollout/busy_s"]) / wall,
                "trainer/idle_ratio": trainer_idle / max(now - loop_start, 1e-9),
                "batch/partial_ratio": partial_ratio,
                "staleness/group_age_max": float(max(batch_ages)),
                "staleness/group_age_mean": sum(batch_ages) / len(batch_ages),
                "buffer/groups": float(len(state.buffer)),
                "buffer/partial_groups": float(len(state.partial_pool)),
                **{f"ledger/{k}": float(v) for k, v in ledger.as_dict().items()},
            }
            last_stats, last_time = stats, now
            if cfg.eval.every_steps and version % cfg.eval.every_steps == 0 and version < total:
                eval_ref = worker.evaluate.remote(eval_rows)
            logger.log(version, metrics, histograms={"staleness/group_age_hist": batch_ages})
            logger.progress(
                f"step {version}/{total}  reward={metrics['train/reward_mean']:.3f}  "
                f"loss={metrics['train/loss']:+.4f}  rollout_tok/s={metrics['rollout/tokens_per_s']:.0f}  "
                f"sync={metrics['weight_sync/total_s'] * 1000:.0f}ms  "
                f"versions={int(metrics['batch/version_min'])}..{int(metrics['batch/version_max'])}"
            )
        if eval_ref is not None and eval_ref in ready:
            result = ray.get(eval_ref)
            eval_ref = None
            logger.log(version, result)
            logger.progress(f"step {version}: held-out accuracy {result['eval/accuracy']:.3f}")

    cancelled = ray.get(worker.stop_generation.remote())  # in-flight groups, cancelled at exit
    for ref in (collect_ref, worker.collect.remote()):
        state.absorb(ray.get(ref), algo.dynamic_sampling, max_filtered=10**9)
    if cancelled != len(state.running):
        raise RuntimeError(f"worker cancelled {cancelled} groups but the launcher counts {len(state.running)} running")
    stats = ray.get(worker.stats.remote())
    ledger.samples_interrupted = int(stats["rollout/samples_interrupted"])
    wall = time.perf_counter() - loop_start
    summary = state.summary(cancelled)
    logger.log(version, {"run/rollout_idle_ratio": 1 - (stats["rollout/busy_s"] - first_stats["rollout/busy_s"]) / wall,
                         "run/trainer_idle_ratio": trainer_idle / wall, "run/loop_s": wall,
                         **{f"ledger/{k}": float(v) for k, v in summary.items()}})
    logger.progress(f"ledger: {summary}")
    if summary["lost"] != 0:
        raise RuntimeError(f"the ledger does not balance: {summary}")
    return version, summary
