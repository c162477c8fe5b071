"""Wires one run together: check the inputs, start the engines, run the orchestrator, save.

    preflight (data, rewards, model)  ->  Ray actors: rollout workers, trainer ranks (placement groups)
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


def start_actors(cfg: GroveConfig, model_path: str, placement=None) -> tuple[list, list]:
    """`rollout.num_workers` rollout worker actors and `trainer.world_size` trainer rank
    actors on Ray (started by `connect`: local, or the cluster `cluster.address` names),
    each in its bundle of `placement` (reserved here when not given; trainer/placement.py).
    Nothing is set up yet: `start_up` does that."""
    from trainer.placement import connect, reserve

    connect(cfg)
    placement = placement or reserve(cfg)
    workers = [start_rollout_actor(cfg, model_path, placement, i) for i in range(cfg.rollout.num_workers)]
    return workers, start_trainer_ranks(cfg, model_path, placement)


def start_trainer_ranks(cfg: GroveConfig, model_path: str, placement) -> list:
    """One `Trainer` actor per rank, rank r in the trainer placement group's bundle r."""
    import ray

    from trainer.policy_trainer import Trainer

    ranks = cfg.trainer.world_size
    actor = ray.remote(max_restarts=0)(Trainer)
    return [actor.options(runtime_env={"env_vars": QUIET}, **placement.trainer_options(r)).remote(
        model_path, cfg.trainer, cfg.algorithm, cfg.rollout.temperature, rank=r, world_size=ranks)
        for r in range(ranks)]


def start_rollout_actor(cfg: GroveConfig, model_path: str, placement, index: int):
    """Rollout worker `index`'s actor, in its bundle (not started: call `astart`)."""
    import ray

    from rollout.engine import engine_env
    from rollout.worker import RolloutWorker

    return ray.remote(max_restarts=0)(RolloutWorker).options(
        runtime_env={"env_vars": {**QUIET, **engine_env(cfg.rollout.engine)}}, **placement.rollout_options(index)
    ).remote(model_path, cfg.rollout, cfg.reward, os.getcwd())


def rank_names(ranks: list) -> list[str]:
    return ["trainer"] if len(ranks) == 1 else [f"trainer rank {r}" for r in range(len(ranks))]


def start_up(workers: list, ranks: list) -> list:
    """Start every engine at once: the rollout workers' vLLM, and the trainer ranks, which
    meet at rank 0's address (its machine, a free port) to form their process group.
    Returns each one's start-up timings; the first failure stops it, naming the actor."""
    import ray

    if len(ranks) > 1:
        address, port = checked(ray.get, ranks[0].rendezvous.remote(), "trainer rank 0: rendezvous")
        trainers = [r.setup.remote(address, port) for r in ranks]
    else:
        trainers = [ranks[0].setup.remote()]
    names = [f"rollout worker {i}" for i in range(len(workers))] + rank_names(ranks)
    return checked_all([*(w.astart.remote() for w in workers), *trainers], names, "engine start-up")


def make_sampler(cfg: GroveConfig, data: PromptData):
    algo = cfg.algorithm
    return build_sampler(cfg.sampling, data.train, cfg.rollout.n_samples, cfg.seed, cfg.task.prompt_key,
                         dynamic_sampling=algo.dynamic_sampling,
                         max_filtered=algo.max_num_gen_batches * cfg.trainer.batch_groups, cwd=os.getcwd())


def build_orchestrator(cfg: GroveConfig, data: PromptData, workers: list, ranks: list, logger: MetricsLogger,
                       model_path: str, placement):
    """The orchestrator over these actors, with the configured sampler and transport, and
    a factory that replaces a dead worker in its bundle (it updates `workers` in place)."""
    from trainer.clients import RayRolloutClient, RayRolloutFactory, RayTrainerClient, build_transport
    from trainer.orchestrator import LoopConfig, Orchestrator
    key = cfg.task.prompt_key
    clients = [RayRolloutClient(f"rollout worker {i}", w, key) for i, w in enumerate(workers)]
    trainer = RayTrainerClient("trainer", ranks)
    factory = RayRolloutFactory(lambda i: start_rollout_actor(cfg, model_path, placement, i), trainer, workers, key)
    return Orchestrator(LoopConfig.from_config(cfg), make_sampler(cfg, data), clients, trainer,
                        build_transport(cfg.weight_sync.transport, os.getcwd(), ranks), logger,
                        data.eval[: cfg.eval.max_rows], factory)


def open_weight_group(cfg: GroveConfig, workers: list, ranks: list) -> None:
    """The broadcast transport's group: trainer rank 0 (the sender) and each engine's model
    worker join concurrently, then every engine gets the bucket plan. The other trainer
    ranks only plan the same buckets: under ZeRO-3 they take part in each bucket's gather."""
    import ray

    sync = cfg.weight_sync
    world = 1 + len(workers)
    address, port = checked(ray.get, ranks[0].free_port.remote(), "weight group address")
    opened = [r.broadcast_open.remote(address, port, world, sync.backend, sync.bucket_mb, sync.timeout_s, sync.delta)
              for r in ranks]
    joins = [w.join_weight_group.remote(address, port, i + 1, world, sync.backend, sync.timeout_s)
             for i, w in enumerate(workers)]
    names = rank_names(ranks) + [f"rollout worker {i}" for i in range(len(workers))]
    plans = checked_all([*opened, *joins], names, "joining the weight group")[:len(ranks)]
    if any(plan != plans[0] for plan in plans[1:]):
        from trainer.orchestrator import RunError

        raise RunError("joining the weight group failed: the trainer ranks planned different buckets "
                       "(their models differ); the ranks must load the same model")
    checked_all([w.set_weight_plan.remote(plans[0]) for w in workers],
                [f"rollout worker {i}" for i in range(len(workers))], "sending the bucket plan")


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
            from trainer.placement import connect, reserve

            connect(cfg)
            placement = reserve(cfg)
            workers, ranks = start_actors(cfg, model_path, placement)
            if cfg.logger.samples_every:  # the sample table's responses as text (loaded while the engines start)
                logger.use_tokenizer(model_path)
            setup = start_up(workers, ranks)
        say(f"engines ready: {setup}")
        if cfg.weight_sync.transport == "broadcast":
            open_weight_group(cfg, workers, ranks)
        key = cfg.task.prompt_key
        with logger.activity("held-out evaluation before RL"):
            before = checked(ray.get, workers[0].evaluate.remote(eval_rows, key), "held-out evaluation before RL")
        logger.log(0, before)
        say(f"held-out accuracy before RL: {before['eval/accuracy']:.3f}")
        orchestrator = build_orchestrator(cfg, data, workers, ranks, logger, model_path, placement)
        logger.start_training(cfg.trainer.total_steps)
        ledger = asyncio.run(orchestrator.run())
        first = orchestrator.rollouts[0].actor  # (a replacement, if the first one died)
        with logger.activity("held-out evaluation after RL"):
            after = checked(ray.get, first.evaluate.remote(eval_rows, key), "held-out evaluation after RL")
        logger.log(orchestrator.version, after)
        say(f"held-out accuracy after RL: {after['eval/accuracy']:.3f}")
        with logger.activity("saving final_model"):
            # every rank: under ZeRO-3 the export gathers the parameters, a collective
            checked_all([r.save_pretrained.remote(str(run_dir / "final_model")) for r in ranks], rank_names(ranks),
                        "saving final_model")
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


def checked_all(refs: list, names: list[str], what: str) -> list:
    """`ray.get` of several actors' calls, in order; the first failure stops it as soon as
    it happens, naming its actor (the others may never finish: a rank whose peer failed
    waits in a collective)."""
    import ray

    from trainer.interfaces import describe_error
    from trainer.orchestrator import RunError

    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            try:
                results[index[ref]] = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a failed actor call ends the run, named
                raise RunError(f"{what} failed on {names[index[ref]]}: {describe_error(err)}") from err
    return results
