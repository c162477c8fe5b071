"""The `grove` command. `grove train key=value ...` is a Hydra app over `configs/`;
`grove prepare` builds, ahead of a first run, what that run would otherwise build at start;
`grove eval MODEL_DIR` scores a model folder on the held-out split (trainer/evaluate.py);
`grove plot RUN_DIR ...` draws a run's dashboard PNG (trainer/plot.py).

Usage errors (a bad key, a value out of range, an impossible combination, a reward that
fails on the first dataset row) end with a one-paragraph message and exit code 2, before
any engine starts. A fault during the run (a failed or dead engine, a reward alarm,
non-finite steps) ends it with the engine, the call, the remote traceback and the ledger,
and exit code 1. The last line of a successful run is machine-readable:

    grove: accuracy_before=<x> accuracy_after=<y> run_dir=<path>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
USAGE = """usage: grove train [hydra overrides ...]
       grove prepare [hydra overrides ...]
       grove eval MODEL_DIR [hydra overrides ...] [--out FILE.jsonl]
       grove plot RUN_DIR [RUN_DIR ...] [--out FILE.png]

  grove train                          run the built-in default (tiny model, arithmetic task)
  grove train trainer.total_steps=20   override any config key
  grove train --cfg job                print the composed config and exit
  grove train --help                   show the config groups and options
  grove prepare                        build the default model, DeepSpeed's CPU op and the
                                       compiled trainer's kernels now (the install runs it)
  grove eval runs/<run>/final_model    held-out accuracy of an HF model folder (greedy, the configured
                                       task and rewards; eval.max_rows=N); one JSON line per sample
                                       to MODEL_DIR/eval_samples.jsonl (or --out)
  grove plot runs/<run>                draw runs/<run>/dashboard.png from its metrics.jsonl (a run
                                       writes it at its end)
  grove plot runs/a runs/b --out c.png compare runs on the same axes (default ./dashboard.png)
"""


def usage_error(kind: str, err: BaseException) -> NoReturn:
    """Bad input found before any engine started: one message on stderr, exit code 2."""
    print(f"grove: {kind}: {err}", file=sys.stderr)
    sys.exit(2)


def load_config(overrides: list[str]):
    """The typed config for these overrides, composed as `grove train` composes it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


def prepare(overrides: list[str]) -> None:
    """A fresh machine's first run spends minutes building things it then caches: the
    built-in model (~20 s), DeepSpeed's shared-memory op (g++, ~80 s) and, with
    trainer.compile=true, inductor's kernels (~60-95 s; ~18 s once cached). Build them
    now, in this process, with the trainer's own code: a run then finds them cached."""
    import dataclasses

    from trainer.launcher import StartupError, preflight
    from trainer.policy_trainer import Trainer

    try:
        cfg = load_config(overrides)
    except Exception as err:  # an unknown key, a bad value: as `grove train` reports them
        usage_error("config error", err.__cause__ or err)
    say = lambda text: print(f"grove prepare: {text}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        _, model_path = preflight(cfg, say)
    except StartupError as err:
        usage_error("error", err)
    say(f"model ready: {model_path}")
    # Unpinned, so the compiler's g++ jobs use every core; one torch thread, as in a run,
    # because the kernels inductor generates depend on the thread count.
    trainer_cfg = dataclasses.replace(cfg.trainer, compile=True, cpu_cores=None)
    timings = Trainer(model_path, trainer_cfg, cfg.algorithm, cfg.rollout.temperature).setup()
    say("DeepSpeed op and compiled trainer ready: " + ", ".join(f"{k}={v:.0f}s" for k, v in timings.items()))


def _train_app() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    from trainer.config import register_configs

    register_configs()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def app(raw: DictConfig) -> None:
        from trainer.launcher import StartupError, train
        from trainer.orchestrator import RunError

        try:
            cfg = OmegaConf.to_object(raw)
        except Exception as err:  # __post_init__ checks raise ValueError, wrapped by OmegaConf
            usage_error("config error", err.__cause__ or err)  # SystemExit passes through Hydra's error reporting
        run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_yaml(raw, resolve=True)
        (run_dir / "config.yaml").write_text(resolved)
        print(resolved, file=sys.stderr)
        try:
            summary = train(cfg, run_dir)
        except StartupError as err:
            usage_error("error", err)
        except RunError as err:
            print(f"grove: run failed: {err}", file=sys.stderr, flush=True)
            sys.exit(1)
        print(
            f"grove: accuracy_before={summary.accuracy_before:.4f} "
            f"accuracy_after={summary.accuracy_after:.4f} run_dir={summary.run_dir}",
            flush=True,
        )

    app()


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    if args[0] == "prepare":
        prepare(args[1:])
        return
    if args[0] == "eval":
        from trainer.evaluate import main as eval_main

        eval_main(args[1:])
        return
    if args[0] == "plot":
        from trainer.plot import main as plot_main

        plot_main(args[1:])
        return
    if args[0] != "train":
        print(f"grove: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    sys.argv = [f"{sys.argv[0]} train", *args[1:]]
    _train_app()


if __name__ == "__main__":
    main()
