"""Wires one run together: check the inputs, start the engines, run the orchestrator, save.

    preflight (data, rewards, model)  ->  Ray actors: rollout worker(s), trainer
    held-out accuracy before  ->  Orchestrator.run()  ->  held-out accuracy after  ->  final_model/

The loop itself is `trainer.orchestrator.Orchestrator`. Ray carries the plain classes
(`RolloutWorker`, `Trainer`) as actors, placed by the platform profile (`cluster.*`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from buffer.arithmetic import ArithmeticSpec
from buffer.datasets import PromptData, arithmetic_data, file_data
from buffer.sampling import build_sampler
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
    if task.name == "arithmetic_steps":
        from buffer.arithmetic import StepsSpec
        from buffer.datasets import arithmetic_steps_data

        return arithmetic_steps_data(
            StepsSpec(
                seed=task.seed, num_train=task.num_train, num_eval=task.num_eval, ops=tuple(task.ops),
                min_ops=task.min_ops, max_ops=task.max_ops, max_operand=task.max_operand,
                max_operand_mul=task.max_operand_mul, max_value=task.max_value,
            )
        )
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
    the dataset rows, the plug-ins named by path, the model folder, and every reward,
    called once on the first dataset row."""
    from rewards.runner import RewardRunner
    from rollout.workflow import build_workflow
    from trainer.clients import build_transport

    try:
        data = load_data(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise StartupError(f"task: {err}") from err
    try:
        with RewardRunner(cfg.reward, example_row=data.train[0], cwd=os.getcwd()) as rewards:
            rewards.probe(data.train[0], prompt_key=cfg.task.prompt_key)
    except Exception as err:  # import errors, bad specs, wrong signatures, a reward that raises
        raise StartupError(f"reward: {err}") from err
    try:
        build_workflow(cfg.rollout.workflow, dict(cfg.rollout.workflow_kwargs), os.getcwd())
        make_sampler(cfg, data)
        build_transport(cfg.weight_sync.transport, os.getcwd())
    except (ValueError, TypeError, ImportError) as err:
        raise StartupError(str(err)) from err
    try:
        model_path = resolve_model(cfg, data, say)
    except (ValueError, FileNotFoundError) as err:
        raise StartupError(f"model: {err}") from err
    if cfg.rollout.chat_template:
        from transformers import AutoTokenizer

        if not getattr(AutoTokenizer.from_pretrained(model_path), "chat_template", None):
            raise StartupError(f"rollout.chat_template=true, but the tokenizer of {model_path} has no chat template: "
                               "set rollout.chat_template=false, or format the prompts in the dataset")
    return data, model_path


QUIET = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
         "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}


def start_actors(cfg: GroveConfig, model_path: str) -> tuple[list, object]:
    """`rollout.num_workers` rollout worker actors and the trainer actor on Ray, with the
    resources the platform profile gives them (`cluster.*`)."""
    import ray

    from trainer.policy_trainer import Trainer

    if not ray.is_initialized():
        ray.init(num_cpus=cfg.cluster.num_cpus, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=True, configure_logging=True)
    workers = [start_rollout_actor(cfg, model_path) for _ in range(cfg.rollout.num_workers)]
    trainer = ray.remote(num_cpus=cfg.cluster.trainer_cpus, num_gpus=cfg.cluster.trainer_gpus, max_restarts=0)(
        Trainer).options(runtime_env={"env_vars": QUIET}).remote(model_path, cfg.trainer, cfg.algorithm,
                                                                  cfg.rollout.temperature)
    return workers, trainer


def start_rollout_actor(cfg: GroveConfig, model_path: str):
    """One rollout worker actor (not started: call `astart`)."""
    import ray

    from rollout.engine import engine_env
    from rollout.worker import RolloutWorker

    return ray.remote(num_cpus=cfg.cluster.rollout_cpus, num_gpus=cfg.cluster.rollout_gpus, max_restarts=0)(
        RolloutWorker).options(runtime_env={"env_vars": {**QUIET, **engine_env(cfg.rollout.engine)}}).remote(
        model_path, cfg.rollout, cfg.reward, os.getcwd())


def make_sampler(cfg: GroveConfig, data: PromptData):
    algo = cfg.algorithm
    return build_sampler(cfg.sampling, data.train, cfg.rollout.n_samples, cfg.seed, cfg.task.prompt_key,
                         dynamic_sampling=algo.dynamic_sampling,
                         max_filtered=algo.max_num_gen_batches * cfg.trainer.batch_groups, cwd=os.getcwd())


def build_orchestrator(cfg: GroveConfig, data: PromptData, workers: list, trainer, logger: MetricsLogger,
                       model_path: str):
    """The orchestrator over these actors, with the configured sampler and transport, and
    a factory that replaces a dead worker (it updates `workers` in place)."""
    from trainer.clients import RayRolloutClient, RayRolloutFactory, RayTrainerClient, build_transport
    from trainer.orchestrator import LoopConfig, Orchestrator

    key = cfg.task.prompt_key
    clients = [RayRolloutClient(f"rollout worker {i}", w, key) for i, w in enumerate(workers)]
    factory = RayRolloutFactory(lambda: start_rollout_actor(cfg, model_path), trainer, workers, key)
    return Orchestrator(LoopConfig.from_config(cfg), make_sampler(cfg, data), clients,
                        RayTrainerClient("trainer", trainer),
                        build_transport(cfg.weight_sync.transport, os.getcwd(), trainer), logger,
                        data.eval[: cfg.eval.max_rows], factory)


def open_weight_group(cfg: GroveConfig, workers: list, trainer) -> None:
    """The broadcast transport's group: the trainer (rank 0) and each engine's model worker
    join concurrently, then every engine gets the bucket plan."""
    import ray

    sync = cfg.weight_sync
    world = 1 + len(workers)
    address, port = checked(ray.get, trainer.free_port.remote(), "weight group address")
    opened = trainer.broadcast_open.remote(address, port, world, sync.backend, sync.bucket_mb, sync.timeout_s,
                                           sync.delta)
    joins = [w.join_weight_group.remote(address, port, i + 1, world, sync.backend, sync.timeout_s)
             for i, w in enumerate(workers)]
    plan = checked(ray.get, opened, "the trainer joining the weight group")
    checked(ray.get, joins, "the engines joining the weight group")
    checked(ray.get, [w.set_weight_plan.remote(plan) for w in workers], "sending the bucket plan")


def train(cfg: GroveConfig, run_dir: Path) -> RunSummary:
    import ray

    from trainer.orchestrator import RunError

    started_at = time.perf_counter()
    logger = MetricsLogger(run_dir, dataclasses.asdict(cfg), cfg.logger.wandb, cfg.logger.wandb_mode,
                           cfg.logger.project, cfg.logger.console, cfg.logger.console_every, cfg.trainer.total_steps)
    say = logger.say  # logger.progress, which also draws the default model's warm-up bar
    try:
        data, model_path = preflight(cfg, say)
        eval_rows = data.eval[: cfg.eval.max_rows]
        say(f"model: {model_path}")
        with logger.activity("starting the engines"):
            workers, trainer = start_actors(cfg, model_path)
            if cfg.logger.samples_every:  # the sample table's responses as text (loaded while the engines start)
                logger.use_tokenizer(model_path)
            setup = checked(ray.get, [*(w.astart.remote() for w in workers), trainer.setup.remote()],
                            "engine start-up")
        say(f"engines ready: {setup}")
        if cfg.weight_sync.transport == "broadcast":
            open_weight_group(cfg, workers, trainer)
        key = cfg.task.prompt_key
        with logger.activity("held-out evaluation before RL"):
            before = checked(ray.get, workers[0].evaluate.remote(eval_rows, key), "held-out evaluation before RL")
        logger.log(0, before)
        say(f"held-out accuracy before RL: {before['eval/accuracy']:.3f}")
        orchestrator = build_orchestrator(cfg, data, workers, trainer, logger, model_path)
        logger.start_training(cfg.trainer.total_steps)
        ledger = asyncio.run(orchestrator.run())
        first = orchestrator.rollouts[0].actor  # (a replacement, if the first one died)
        with logger.activity("held-out evaluation after RL"):
            after = checked(ray.get, first.evaluate.remote(eval_rows, key), "held-out evaluation after RL")
        logger.log(orchestrator.version, after)
        say(f"held-out accuracy after RL: {after['eval/accuracy']:.3f}")
        with logger.activity("saving final_model"):
            checked(ray.get, trainer.save_pretrained.remote(str(run_dir / "final_model")), "saving final_model")
        checked(ray.get, [w.ashutdown.remote() for w in workers], "rollout shutdown")
        from trainer.plot import write_run_dashboard

        write_run_dashboard(run_dir, say)  # run_dir/dashboard.png; a failure is said, not raised
        summary = RunSummary(before["eval/accuracy"], after["eval/accuracy"], run_dir, orchestrator.version, ledger,
                             time.perf_counter() - started_at)
        logger.finish_run(**dataclasses.asdict(summary))  # W&B's run summary, summary.json, the closing table
        return summary
    except RunError as err:
        say(f"run stopped: {err}")
        raise
    finally:
        logger.close()
        if ray.is_initialized():
            ray.shutdown()


def checked(get, refs, what: str):
    """`ray.get` whose failure says which part of the run failed, as the orchestrator's do."""
    from trainer.interfaces import describe_error
    from trainer.orchestrator import RunError

    try:
        return get(refs)
    except Exception as err:  # noqa: BLE001 - a failed actor call ends the run, named
        raise RunError(f"{what} failed: {describe_error(err)}") from err
