"""The fine-tune-with-pruning job from Python: ``sentinel-lightning fit`` itself, for users who prefer a script.

Every setting left out comes from the CLI's job defaults (``sentinel_lightning.cli.fit``: ``TRAINER_DEFAULTS``,
``JOB_DEFAULTS`` and the callbacks' class defaults), so this is the same run by construction.

    python scripts/finetune_prune.py                # embedded SmolLM2-135M, JOB_DEFAULTS' recipe (--help shows it)
    python scripts/finetune_prune.py --strategy entropy --epochs 6 --train-batches 50
    python scripts/finetune_prune.py --quick        # a tiny model, for the tests
"""

from __future__ import annotations

import argparse
import json
import os

from sentinel_lightning.callbacks.pruning import DEFAULT_SCHEDULE, DEFAULT_STRATEGY
from sentinel_lightning.cli.fit import JOB_DEFAULTS, TRAINER_DEFAULTS, run_fit
from sentinel_lightning.strategies import STRATEGIES
from sentinel_lightning.tiny import save_tiny_model

QUICK_MODEL_FOLDER = "quick_model"
# --quick: a tiny random Llama and the byte-level tokenizer, in short blocks.
QUICK_SETTINGS = ["--data.block_size=32", "--data.cache=false", "--model.learning_rate=0.001"]

# This script's option -> the CLI option it sets; unset options keep the CLI's defaults.
CLI_OPTIONS = {
    "model": "model.model",
    "strategy": "pruning.strategy",
    "schedule": "pruning.schedule",
    "epochs": "trainer.max_epochs",
    "train_batches": "trainer.limit_train_batches",
    "val_batches": "trainer.limit_val_batches",
    "block_size": "data.block_size",
    "batch_size": "data.batch_size",
    "learning_rate": "model.learning_rate",
    "log_dir": "trainer.default_root_dir",
}
# What the job runs when an option is left out: its own setting, else the callback's class default.
JOB_STRATEGY = JOB_DEFAULTS.get("pruning.strategy", DEFAULT_STRATEGY)
JOB_SCHEDULE = JOB_DEFAULTS.get("pruning.schedule", DEFAULT_SCHEDULE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's options; each defaults to None, meaning the CLI's default (shown in the help)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="hub name or local path; default: the embedded model")
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), help=f"default: {JOB_STRATEGY}")
    parser.add_argument("--schedule", help=f"JSON: epoch -> fraction; default: {json.dumps(JOB_SCHEDULE)}")
    parser.add_argument("--epochs", type=int, help=f"default: {TRAINER_DEFAULTS['max_epochs']}")
    parser.add_argument(
        "--train-batches", type=int,
        help=f"training batches per epoch; default: {TRAINER_DEFAULTS['limit_train_batches']}",
    )
    parser.add_argument("--val-batches", type=int, help=f"default: {TRAINER_DEFAULTS['limit_val_batches']}")
    parser.add_argument("--block-size", type=int, help="tokens per sequence; default: the data module's")
    parser.add_argument("--batch-size", type=int, help="sequences per batch; default: the data module's")
    parser.add_argument("--learning-rate", type=float, help=f"default: {JOB_DEFAULTS['model.learning_rate']}")
    parser.add_argument("--log-dir", help="folder of lightning_logs/; default: the working directory")
    parser.add_argument("--quick", action="store_true", help="a tiny random model and the byte-level tokenizer")
    return parser.parse_args(argv)


def fit_arguments(argv: list[str] | None = None) -> list[str]:
    """The ``sentinel-lightning fit`` options this script's ``argv`` stands for (none: the CLI's defaults)."""
    args = parse_args(argv)
    options = []
    if args.quick:
        model_folder = os.path.join(args.log_dir or os.getcwd(), QUICK_MODEL_FOLDER)
        options += [*QUICK_SETTINGS, f"--model.model={save_tiny_model(model_folder)}"]
    for name, option in CLI_OPTIONS.items():
        value = getattr(args, name)
        if value is not None:
            options.append(f"--{option}={value}")
    return options


def main(argv: list[str] | None = None) -> dict:
    """Runs ``sentinel-lightning fit`` with the options of ``argv``; prints and returns its report.

    Returns:
        ``{"val_ppl_before", "val_ppl_after", "pruned_heads", "total_heads", "pruned_fraction", "checkpoint"}``.
    """
    result = run_fit(fit_arguments(argv))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
