"""The `grove` command. `grove train key=value ...` is a Hydra app over `configs/`.

Usage errors (a bad key, a value out of range, an impossible combination) end with a
one-paragraph message and exit code 2, before any engine starts. The last line of a
successful run is machine-readable:

    grove: accuracy_before=<x> accuracy_after=<y> run_dir=<path>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
USAGE = """usage: grove train [hydra overrides ...]

  grove train                          run the built-in default (tiny model, arithmetic task)
  grove train trainer.total_steps=20   override any config key
  grove train --cfg job                print the composed config and exit
  grove train --help                   show the config groups and options
"""


def _train_app() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    from trainer.config import register_configs

    register_configs()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def app(raw: DictConfig) -> None:
        from trainer.launcher import StartupError, train

        try:
            cfg = OmegaConf.to_object(raw)
        except Exception as err:  # __post_init__ checks raise ValueError, wrapped by OmegaConf
            cause = err.__cause__ or err
            print(f"grove: config error: {cause}", file=sys.stderr)
            sys.exit(2)  # SystemExit passes through Hydra's own error reporting
        run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_yaml(raw, resolve=True)
        (run_dir / "config.yaml").write_text(resolved)
        print(resolved, file=sys.stderr)
        try:
            summary = train(cfg, run_dir)
        except StartupError as err:
            print(f"grove: error: {err}", file=sys.stderr)
            sys.exit(2)
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
    if args[0] != "train":
        print(f"grove: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    sys.argv = [f"{sys.argv[0]} train", *args[1:]]
    _train_app()


if __name__ == "__main__":
    main()
