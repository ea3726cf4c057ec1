"""``sentinel-lightning fit`` (and ``validate``, ``test``, ``predict``): Lightning's ``LightningCLI`` for the job.

The job is ``GatedLanguageModel`` on ``LanguageModelingDataModule`` with the head callbacks as configurable groups
(``metrics``, ``pruning``, ``reactivation``, ``gate_monitor``, ``divergence``). Its settings come from one place:
the callbacks' own class defaults (``HeadPruning``'s strategy and schedule among them), plus ``TRAINER_DEFAULTS``
and ``JOB_DEFAULTS`` below, which ``scripts/finetune_prune.py`` reuses through ``run_fit``. With no arguments,
``sentinel-lightning fit`` fine-tunes the embedded default model on the embedded corpus for 7 epochs and prunes one
key/value group in three in every layer after epoch 0 (measured ablation, linear compensation), small enough for a
2-core CPU.

Unless the trainer is given a ``ModelCheckpoint`` of its own, the job keeps two checkpoints in its log folder:
``checkpoints/last.ckpt`` (the model at the end of the latest epoch, after its pruning) and ``checkpoints/best/``
(the model with the lowest finite ``val_ppl``, saved when validation measured it, before that epoch's pruning).
A run whose loss, ``val_ppl`` or weights become non-finite stops with a ``DivergenceError`` (``DivergenceGuard``)
before it writes a checkpoint of the diverged model; ``--divergence.on_nonfinite skip`` skips such training steps
instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from sentinel_lightning.callbacks import (
    DivergenceGuard,
    GateMonitor,
    HeadMetrics,
    HeadPruning,
    HeadReactivation,
    KeyValueMerging,
)
from sentinel_lightning.callbacks.pruning import check_schedule
from sentinel_lightning.checkpoint_io import StreamingCheckpointIO
from sentinel_lightning.cli.configs import resolve_config_arguments
from sentinel_lightning.cli.precision import job_precision
from sentinel_lightning.data import LanguageModelingDataModule
from sentinel_lightning.events import find_callback
from sentinel_lightning.gates import find_gates
from sentinel_lightning.module import GatedLanguageModel

# The job's trainer: a fine-tune-with-pruning run that fits in 10 minutes on a 2-core CPU. Seven epochs: the pruned
# model recovers with every step it gets after its pruning (docs/results.md, "The frontier"). No precision: the job
# picks bf16-mixed where the device computes bf16 natively, else float32 (``job_precision``).
TRAINER_DEFAULTS = {
    "max_epochs": 7,
    "limit_train_batches": 6,
    "limit_val_batches": 8,
    "log_every_n_steps": 1,
    "gradient_clip_val": 1.0,
    "num_sanity_val_steps": 0,  # fit is preceded by a full validation anyway
}
# The job's other settings that differ from the classes' own defaults. The recipe is the one whose export pays
# (docs/results.md, "The model that pays"): one key/value group in three pruned in every layer, so the export has a
# third smaller key/value cache and a uniform layout that plain transformers, vLLM and llama.cpp open; pruned heads
# write their least-squares prediction from the kept heads (linear compensation); each layer loses the group whose
# removal, measured on the last training batch, raises the loss least (the ablation strategy, better than the
# compensated gradient score on validation and held-out text). The learning rate is the one, of 3e-4, 6e-4, 8e-4 and
# 1e-3, that the pruned fine-tune of 7 epochs ends best at. It prunes after epoch 0: pruning later leaves a better
# model to regress from, and on another order of the training blocks HeadReactivation gave every group back
# (docs/results.md, "When to prune").
JOB_DEFAULTS = {
    "model.learning_rate": 6e-4,
    "gate_monitor.log_every_n_steps": 4,
    "pruning.strategy": "ablation",
    "pruning.compensate": "linear",
    "pruning.unit": "group",
    "pruning.scope": "uniform",
    "pruning.schedule": {0: 0.3333},
    # One step of a third of the heads regresses validation for an epoch before fine-tuning recovers it; heads come
    # back only when two validations in a row stay worse than before the pruning.
    "reactivation.patience": 2,
}
SEED = 0
# The job's checkpoints. last.ckpt is written at the end of every epoch, after that epoch's pruning. The lowest
# finite val_ppl (NaN never counts as better) goes under best/, written as soon as validation has measured it, so
# before the pruning at that epoch's end: the checkpoint holds the very model its val_ppl was measured on.
BEST_CHECKPOINT = {
    "monitor": "val_ppl", "mode": "min", "filename": "best/{epoch}-{step}-{val_ppl:.3f}",
    "save_on_train_epoch_end": False,
}


class LastCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` at the end of every training epoch, after the epoch's pruning, and nothing else.

    A plain ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes no ``last.ckpt`` (it saves the last one only
    in a step that saved another).
    """

    def __init__(self) -> None:
        super().__init__(save_last=True, save_top_k=0, save_on_train_epoch_end=True)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class SentinelCLI(LightningCLI):
    """``LightningCLI`` with the head callbacks and a before/after perplexity report around ``fit``.

    After ``fit``, ``report`` holds ``{"val_ppl_before", "val_ppl_after", "pruned_heads" (list of (layer, head)),
    "total_heads", "pruned_fraction", "scheduled_fraction" (the latest target the schedule reached), "checkpoint" (the
    last), "best_checkpoint", "precision"}``; rank zero prints it as a table.
    """

    report: dict[str, Any] | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(HeadMetrics, "metrics")
        parser.add_lightning_class_args(HeadPruning, "pruning")
        parser.add_lightning_class_args(KeyValueMerging, "merging")
        parser.add_lightning_class_args(HeadReactivation, "reactivation")
        parser.add_lightning_class_args(GateMonitor, "gate_monitor")
        parser.add_lightning_class_args(DivergenceGuard, "divergence")
        parser.set_defaults(JOB_DEFAULTS)

    def before_instantiate_classes(self) -> None:
        """The data's tokenizer defaults to the model's own, progress shows in a rich progress bar, the job keeps
        its last and its best checkpoint (``CHECKPOINT``) unless given a ``ModelCheckpoint`` of its own, and writes
        them with ``StreamingCheckpointIO`` unless given a ``CheckpointIO`` of its own."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if isinstance(config.pruning.schedule, Mapping):  # keys come as written (1.5, "x"): refused here by name
            schedule, interval = config.pruning.schedule, config.pruning.interval
            config.pruning.schedule = check_schedule(schedule, interval, "--pruning.schedule")
        if config.data.tokenizer is None and isinstance(config.model.model, str):
            config.data.tokenizer = config.model.model
            config.data.gguf_file = config.model.gguf_file
        callbacks = list(config.trainer.callbacks or [])
        if config.trainer.enable_progress_bar is not False and not any("ProgressBar" in str(c) for c in callbacks):
            callbacks.append(Namespace(class_path=f"{RichProgressBar.__module__}.RichProgressBar"))
        if config.trainer.enable_checkpointing is not False and not any("ModelCheckpoint" in str(c) for c in callbacks):
            callbacks.append(Namespace(class_path=f"{LastCheckpoint.__module__}.LastCheckpoint"))
            class_path = f"{ModelCheckpoint.__module__}.ModelCheckpoint"
            callbacks.append(Namespace(class_path=class_path, init_args=Namespace(**BEST_CHECKPOINT)))
        config.trainer.callbacks = callbacks
        plugins = config.trainer.plugins or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any("CheckpointIO" in str(p) for p in plugins) and "checkpoint_io" not in str(config.trainer.strategy):
            plugins.append(Namespace(class_path=f"{StreamingCheckpointIO.__module__}.StreamingCheckpointIO"))
        config.trainer.plugins = plugins

        given = config.trainer.precision
        config.trainer.precision, warning = job_precision(given, config.trainer.accelerator)
        if warning is not None:
            rank_zero_warn(warning)
        elif given is None:
            rank_zero_info(f"sentinel-lightning: precision {config.trainer.precision} (bf16-mixed where this device "
                           "computes bf16 natively, else 32-true; --trainer.precision sets another)")

    def _validation_perplexity(self) -> float:
        results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        return float(results[0]["val_ppl"])

    def before_fit(self) -> None:
        self.perplexity_before = self._validation_perplexity()

    def _scheduled_fraction(self) -> float | None:
        """The share of heads the latest target the pruning schedule reached prunes (None without a
        ``HeadPruning``)."""
        pruning = find_callback(self.trainer, HeadPruning)
        if pruning is None:
            return None
        entry = pruning.last_target(pruning.reached_index(self.trainer))
        return 0.0 if entry is None else entry[2] / find_gates(self.model).active.numel()

    def after_fit(self) -> None:
        perplexity_after = self._validation_perplexity()
        gates = find_gates(self.model)
        checkpoints = self.trainer.checkpoint_callbacks
        last = next((c.last_model_path for c in checkpoints if getattr(c, "last_model_path", "")), "")
        best = next((c.best_model_path for c in checkpoints if getattr(c, "best_model_path", "")), "")
        self.report = {
            "val_ppl_before": self.perplexity_before,
            "val_ppl_after": perplexity_after,
            "pruned_heads": gates.pruned_heads(),
            "total_heads": gates.active.numel(),
            "pruned_fraction": gates.sparsity,
            "scheduled_fraction": self._scheduled_fraction(),
            "checkpoint": last or best,
            "best_checkpoint": best,
            "precision": str(self.trainer.precision),
        }
        if self.trainer.is_global_zero:
            print_fit_report(self.report)


def print_fit_report(report: dict[str, Any]) -> None:
    """Prints ``SentinelCLI.report`` as a rich table."""
    table = Table(title="sentinel-lightning fit")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("validation perplexity before", f"{report['val_ppl_before']:.3f}")
    table.add_row("validation perplexity after", f"{report['val_ppl_after']:.3f}")
    table.add_row("heads pruned", f"{len(report['pruned_heads'])} of {report['total_heads']}")
    table.add_row("pruned fraction", f"{report['pruned_fraction']:.3f}")
    scheduled = report.get("scheduled_fraction")
    if scheduled is not None and report["pruned_fraction"] < scheduled - 0.5 / report["total_heads"]:
        table.add_row("[bold red]scheduled fraction[/]", f"[bold red]{scheduled:.3f}[/] (heads given back)")
    table.add_row("checkpoint", report["checkpoint"] or "(none)")
    if report.get("precision"):
        table.add_row("precision", report["precision"])
    if report.get("best_checkpoint") and report["best_checkpoint"] != report["checkpoint"]:
        table.add_row("best checkpoint", report["best_checkpoint"])
    Console().print(table)


def lightning_cli(args: list[str] | None) -> SentinelCLI:
    """Runs a Lightning subcommand of the job (``fit``, ``validate``, ``test`` or ``predict``).

    Args:
        args: The subcommand and its options, as on the command line (``--config`` values already resolved);
            None reads ``sys.argv[1:]``.

    Returns:
        The ``SentinelCLI`` after its run (``report`` holds the ``fit`` summary).
    """
    return SentinelCLI(
        GatedLanguageModel,
        LanguageModelingDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=SEED,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def run_fit(args: list[str]) -> dict[str, Any]:
    """``sentinel-lightning fit *args`` from Python, with the job's defaults; returns ``SentinelCLI.report``.

    Raises:
        ValueError: A ``--config`` value is neither a file nor a packaged config.
    """
    return lightning_cli(resolve_config_arguments(["fit", *args])).report
