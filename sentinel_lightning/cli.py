"""The ``sentinel-lightning`` command line.

``fit``, ``validate``, ``test`` and ``predict`` are Lightning's ``LightningCLI`` over ``GatedLanguageModel`` and
``LanguageModelingDataModule``, with the head callbacks as configurable groups (``metrics``, ``pruning``,
``reactivation``, ``gate_monitor``). With no arguments, ``sentinel-lightning fit`` fine-tunes the embedded
default model on the embedded corpus with gradient-based head pruning, small enough for a 2-core CPU; raise
any setting from the command line or a YAML file (``--config configs/default.yaml``).

``export`` (a checkpoint to a compact model folder) and ``evaluate`` (perplexity, generation speed and text
quality, before and after pruning) are plain functions exposed through jsonargparse.
"""

from __future__ import annotations

import sys

from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console
from rich.table import Table

from sentinel_lightning.callbacks import GateMonitor, HeadMetrics, HeadPruning, HeadReactivation
from sentinel_lightning.compaction import export_checkpoint
from sentinel_lightning.data import LanguageModelingDataModule
from sentinel_lightning.evaluation import evaluate
from sentinel_lightning.gates import find_gates
from sentinel_lightning.module import GatedLanguageModel

# Subcommands that are plain functions rather than Trainer methods.
FUNCTION_COMMANDS = {"export": export_checkpoint, "evaluate": evaluate}

# The main job's defaults: a fine-tune-with-pruning run that finishes in minutes on a 2-core CPU.
TRAINER_DEFAULTS = {
    "max_epochs": 4,
    "limit_train_batches": 6,
    "limit_val_batches": 8,
    "log_every_n_steps": 1,
    "gradient_clip_val": 1.0,
    "num_sanity_val_steps": 0,  # fit is preceded by a full validation anyway
}


class SentinelCLI(LightningCLI):
    """``LightningCLI`` with the head callbacks and a before/after perplexity report around ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(HeadMetrics, "metrics")
        parser.add_lightning_class_args(HeadPruning, "pruning")
        parser.add_lightning_class_args(HeadReactivation, "reactivation")
        parser.add_lightning_class_args(GateMonitor, "gate_monitor")
        # Prune after epochs 0, 1 and 2, so that the last epoch fine-tunes the final pruned model.
        parser.set_defaults({
            "pruning.strategy": "gradient",
            "pruning.schedule": {0: 0.1, 1: 0.2, 2: 0.3},
            "model.learning_rate": 1e-4,
            "gate_monitor.log_every_n_steps": 4,
        })

    def before_instantiate_classes(self) -> None:
        """The data's tokenizer defaults to the model's own, and progress shows in a rich progress bar."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.data.tokenizer is None and isinstance(config.model.model, str):
            config.data.tokenizer = config.model.model
            config.data.gguf_file = config.model.gguf_file
        callbacks = config.trainer.callbacks or []
        if config.trainer.enable_progress_bar is not False and not any("ProgressBar" in str(c) for c in callbacks):
            config.trainer.callbacks = [*callbacks, Namespace(class_path=f"{RichProgressBar.__module__}.RichProgressBar")]

    def _validation_perplexity(self) -> float:
        results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        return float(results[0]["val_ppl"])

    def before_fit(self) -> None:
        self.perplexity_before = self._validation_perplexity()

    def after_fit(self) -> None:
        perplexity_after = self._validation_perplexity()
        if not self.trainer.is_global_zero:
            return
        gates = find_gates(self.model)
        table = Table(title="sentinel-lightning fit")
        table.add_column("")
        table.add_column("value", justify="right")
        table.add_row("validation perplexity before", f"{self.perplexity_before:.3f}")
        table.add_row("validation perplexity after", f"{perplexity_after:.3f}")
        table.add_row("heads pruned", f"{gates.active.numel() - gates.num_active} of {gates.active.numel()}")
        table.add_row("pruned fraction", f"{gates.sparsity:.3f}")
        checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or getattr(
            self.trainer.checkpoint_callback, "best_model_path", ""
        )
        table.add_row("checkpoint", checkpoint or "(none)")
        Console().print(table)


def run_function(function, argv: list[str]) -> None:
    """Parses ``--name value`` options (or a ``--config`` YAML) for ``function`` and calls it."""
    parser = ArgumentParser(prog=f"sentinel-lightning {argv[0]}", description=function.__doc__.split("\n")[0])
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(function, as_positional=False)
    config = parser.parse_args(argv[1:])
    function(**{key: value for key, value in vars(config).items() if key != "config"})


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``sentinel-lightning`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in FUNCTION_COMMANDS:
        run_function(FUNCTION_COMMANDS[argv[0]], argv)
        return
    SentinelCLI(
        GatedLanguageModel,
        LanguageModelingDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
