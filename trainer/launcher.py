"""Wires one run together: data, model, a rollout actor, a trainer actor, and the loop between.

The loop is the whole asynchronous algorithm, so it stays on one screen:

    admit new prompts while the staleness rule allows  ──>  rollout worker generates
    collect finished groups into the buffer            <──  (scored, versioned)
    when B groups wait and the trainer is idle: train one step on them
    when a step ends: the trainer's new weights go straight to the worker (v + 1)

Generation never stops for training; the engine stops only for a weight load's own
work, between two of its steps (about 2 ms on the built-in model: see
docs/benchmarks.md). Admission follows the trainer's version: the groups a step's end
admits go to the worker at once, and it holds them until that step's weights are on
their way into the engine. Ray carries the two plain classes as actors, each pinned to
its own core.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from buffer.arithmetic import ArithmeticSpec
from buffer.datasets import PromptData, arithmetic_data, file_data
from buffer.prompts import PromptPool
from buffer.scheduler import RolloutScheduler
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


@dataclass
class PendingSync:
    """A weight push on its way to the rollout worker, with the step it came from."""

    ref: object
    version: int
    batch_ages: list[int]
    partial_ratio: float
    step_metrics: dict[str, float] | None = None  # set when the step's own result arrives
    started: float = 0.0  # when the step ended, as the driver saw it


def run_loop(cfg: GroveConfig, data: PromptData, worker, trainer, logger: MetricsLogger,
             eval_rows: list[dict]) -> tuple[int, dict[str, int]]:
    """The asynchronous loop from the module docstring; returns (versions, ledger)."""
    import ray

    total = cfg.trainer.total_steps
    algo = cfg.algorithm
    pool = PromptPool(data.train, cfg.rollout.n_samples, seed=cfg.seed, prompt_key=cfg.task.prompt_key)
    sched = RolloutScheduler(cfg.trainer.batch_groups, cfg.buffer.max_staleness, cfg.rollout.overprovision,
                             algo.dynamic_sampling, algo.max_num_gen_batches, cfg.buffer.stragglers)
    ledger = sched.ledger
    version = 0  # the trainer's; admission follows it, and the worker holds what it admits
    # until that version's weights are in the engine (so no slot waits for a round trip)
    collect_ref = worker.collect.remote(min_groups=1, timeout_s=2.0)
    train_ref = eval_ref = None
    syncs: deque[PendingSync] = deque()  # weight pushes in flight, oldest first
    loop_start = last_time = time.perf_counter()
    first_stats = last_stats = ray.get(worker.stats.remote())
    trainer_idle, trainer_idle_since = 0.0, loop_start
    # Idle time split by cause: a full batch is buffered but a straggler is due (deadline
    # wait), or too few groups have finished (the rollout is the bottleneck).
    straggler_wait, idle_mark, full_batch_waiting = 0.0, loop_start, False
    trained_tokens = 0.0

    while version < total or syncs or eval_ref is not None:
        if version < total:
            resume, _ = sched.partials_to_resume(version)
            if resume:
                worker.resume.remote(resume, version)
            capacity = sched.capacity(version)
            if capacity > 0:
                items = pool.next(capacity, version=version)
                sched.started([item.group_id for item in items], version)
                worker.submit.remote(items)
        if train_ref is None and version < total:
            batch = sched.next_batch(version)
            if batch is not None:
                if sched.april:
                    if cfg.rollout.interrupt_by == "pause":
                        sched.hold_running()  # the rest waits in the engine for the next weights
                    worker.interrupt_groups.remote()  # (with abort: comes back as partial groups)
                # the step's weights go to the worker as soon as the step ends, trainer to
                # worker, without waiting for the driver to see the step finish
                train_ref, weights_ref = trainer.train_step_and_export.options(num_returns=2).remote(batch)
                syncs.append(PendingSync(worker.update_weights.remote(weights_ref, version + 1), version + 1,
                                         [version - g.start_version for g in batch], sched.partial_ratio(batch)))
                trainer_idle += time.perf_counter() - trainer_idle_since
        sync_ref = syncs[0].ref if syncs else None
        pending = [r for r in (collect_ref, train_ref, sync_ref, eval_ref) if r is not None]
        ready, _ = ray.wait(pending, num_returns=1)
        if sync_ref in ready and syncs[0].step_metrics is None:
            ready.append(train_ref)  # the weights came out of that step, so it has ended too
        now = time.perf_counter()
        if train_ref is None and full_batch_waiting and version < total:
            straggler_wait += now - idle_mark
        idle_mark = now
        if collect_ref in ready:
            got = ray.get(collect_ref)
            sched.absorb(got.groups, got.dropped, got.partial)
            collect_ref = worker.collect.remote(min_groups=1, timeout_s=2.0)
        full_batch_waiting = len(sched.buffer) >= cfg.trainer.batch_groups
        if train_ref is not None and train_ref in ready:
            step_metrics = ray.get(train_ref)
            trained_tokens += step_metrics["train/num_tokens"]
            train_ref = None
            trainer_idle_since = time.perf_counter()
            version += 1
            syncs[-1].step_metrics, syncs[-1].started = step_metrics, time.perf_counter()
        if sync_ref is not None and sync_ref in ready:
            done = syncs.popleft()
            sync = ray.get(done.ref)
            stats = sync["stats"]  # taken as the load finished: no second round trip to a busy actor
            now = time.perf_counter()
            ledger.samples_interrupted = int(stats["rollout/samples_interrupted"])
            wall = max(now - last_time, 1e-9)
            metrics = {
                **done.step_metrics,
                **stats,
                "weight_sync/apply_s": sync["weight_sync_apply_s"],
                "weight_sync/drain_s": sync["weight_sync_drain_s"],
                "weight_sync/load_s": sync["weight_sync_load_s"],
                "weight_sync/total_s": now - done.started,
                "weight_sync/bytes": float(sync["weight_bytes"]),
                "rollout/requests_interrupted": float(sync["requests_interrupted"]),
                "rollout/tokens_per_s": (stats["rollout/tokens_generated"] - last_stats["rollout/tokens_generated"]) / wall,
                "rollout/idle_ratio": 1.0 - (stats["rollout/busy_s"] - last_stats["rollout/busy_s"]) / wall,
                "trainer/idle_ratio": trainer_idle / max(now - loop_start, 1e-9),
                "trainer/straggler_wait_ratio": straggler_wait / max(now - loop_start, 1e-9),
                "rollout/concurrency_mean": (stats["rollout/request_s"] - last_stats["rollout/request_s"]) / wall,
                "batch/partial_ratio": done.partial_ratio,
                "staleness/group_age_max": float(max(done.batch_ages)),
                "staleness/group_age_mean": sum(done.batch_ages) / len(done.batch_ages),
                "buffer/groups": float(len(sched.buffer)),
                "buffer/partial_groups": float(len(sched.partial_pool)),
                **{f"ledger/{k}": float(v) for k, v in ledger.as_dict().items()},
            }
            last_stats, last_time = stats, now
            if cfg.eval.every_steps and done.version % cfg.eval.every_steps == 0 and done.version < total:
                eval_ref = worker.evaluate.remote(eval_rows)
            logger.log(done.version, metrics, histograms={"staleness/group_age_hist": done.batch_ages})
            logger.progress(
                f"step {done.version}/{total}  reward={metrics['train/reward_mean']:.3f}  "
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
    sched.dynamic_sampling = False  # at exit, file everything as it is
    for ref in (collect_ref, worker.collect.remote()):
        got = ray.get(ref)
        sched.absorb(got.groups, got.dropped, got.partial)
    if cancelled != len(sched.running):
        raise RuntimeError(f"worker cancelled {cancelled} groups but the launcher counts {len(sched.running)} running")
    stats = ray.get(worker.stats.remote())
    ledger.samples_interrupted = int(stats["rollout/samples_interrupted"])
    wall = time.perf_counter() - loop_start
    summary = sched.summary(cancelled)
    logger.log(version, {"run/rollout_idle_ratio": 1 - (stats["rollout/busy_s"] - first_stats["rollout/busy_s"]) / wall,
                         "run/trainer_idle_ratio": trainer_idle / wall, "run/loop_s": wall,
                         "run/trainer_straggler_wait_ratio": straggler_wait / wall,
                         "run/rollout_concurrency_mean": (stats["rollout/request_s"] - first_stats["rollout/request_s"]) / wall,
                         **{f"ledger/{k}": float(v) for k, v in summary.items()}})
    logger.progress(f"ledger: {summary}")
    masked_share = summary["masked_tokens"] / max(summary["masked_tokens"] + trained_tokens, 1.0)
    if masked_share > 0.2:
        logger.progress(
            f"note: {masked_share:.0%} of the generated tokens were kept as context only, not trained on "
            f"(older than buffer.max_staleness={cfg.buffer.max_staleness} when consumed). A larger "
            "buffer.max_staleness or trainer.batch_groups leaves slow groups more time"
            + ("." if sched.april else "; buffer.stragglers=wait trains every token at the price of the "
               "trainer waiting for them") + " See docs/async.md.")
    if summary["lost"] != 0:
        raise RuntimeError(f"the ledger does not balance: {summary}")
    return version, summary
