"""Train the SQG ViT: ``deepspeed megavit/training/train.py CONFIG [key=value ...]`` (or torchrun).

    launch/train_vit.sh tiny                                   (wraps the deepspeed launcher)
    deepspeed --num_gpus 8 megavit/training/train.py configs/vit/sqg128_1.2b.yaml parallel.tp=2 parallel.pp=2
    torchrun --nproc_per_node 2 megavit/training/train.py configs/vit/tiny.yaml data.synthetic=true

CONFIG is a configs/vit/*.yaml file (model, parallel, data, optim, train sections); dotted
overrides follow it. The DeepSpeed JSON comes from ``deepspeed.config`` or --deepspeed_config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megavit.config import ConfigError, config_errors, load_config
from megavit.training.config import TrainConfig, check_deepspeed_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megavit-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (configs/vit/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=200")
    parser.add_argument("--deepspeed_config", help="DeepSpeed JSON (default: the config's deepspeed.config)")
    parser.add_argument("--resume", metavar="TAG", help="continue from a checkpoint tag, or 'latest'")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return parser.parse_args(argv)


def load_deepspeed_config(path: str, config: TrainConfig) -> dict:
    """The DeepSpeed JSON at ``path``, checked against what the trainer supports for ``config``."""
    try:
        ds_config = json.loads(Path(path).read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"DeepSpeed config not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    if not isinstance(ds_config, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    try:
        check_deepspeed_config(ds_config, config, path)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return ds_config


def check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse a fresh run into a directory that holds another run's outputs.

    Every rank checks before it joins the process group, and no rank writes before all have joined,
    so all ranks see the directory as it was.
    """
    from megavit.training.trainer import existing_outputs

    found = existing_outputs(output_dir)
    if found and not resume and not overwrite:
        raise ConfigError(f"output directory {output_dir} already holds a run ({', '.join(found)}); continue it "
                          f"with --resume latest, or set train.overwrite=true to replace it")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with config_errors("megavit-train"):
        config = load_config(TrainConfig, args.config, args.overrides)
        ds_config = load_deepspeed_config(args.deepspeed_config or config.deepspeed.config, config)
        if args.resume and config.train.overwrite:
            raise ConfigError(f"--resume {args.resume} and train.overwrite=true contradict each other: overwrite "
                              f"removes the checkpoints a resume continues from; drop one")
        check_output_dir(Path(config.train.output_dir), args.resume, config.train.overwrite)
    from megavit.training.trainer import NonFiniteLoss, Trainer

    try:
        with config_errors("megavit-train"):  # what only the launched job can tell: dp, the output directory
            trainer = Trainer(config, ds_config)
            metrics = trainer.train(resume=args.resume)
    except (ValueError, OSError, NonFiniteLoss) as err:  # data, checkpoints, divergence: exit status 1
        print(f"megavit-train: error: {err}", file=sys.stderr)
        return 1
    if trainer.rank == 0:
        print("final: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
