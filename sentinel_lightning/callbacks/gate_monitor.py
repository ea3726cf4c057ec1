"""``GateMonitor``: shows the gates, the head metrics and every pruning event in TensorBoard.

With Lightning's ``TensorBoardLogger`` it writes, every ``log_every_n_steps`` optimizer steps and at every
pruning or reactivation event:

* ``gates/heatmap``: an image of the gates, layers (columns) by heads (rows), colour scale fixed to 0..1,
  pruned heads hatched grey;
* ``head_metrics/entropy`` and ``head_metrics/grad_norm``: the same grid for the attention entropy and the
  gradient importance that a ``HeadMetrics`` callback of the trainer has accumulated (when there is one);
* ``gates/histogram``: a histogram of the effective gate values (pruned heads count as 0);
* scalars ``gates/active_fraction`` and ``gates_active_heads/layer_NN`` (active heads of each layer);
* ``gates/events``: a text entry per pruning or reactivation event.

Non-finite values (a diverged run) are drawn as missing: white cells, and left out of the histogram.

Other loggers (CSV, ...) get the scalars through ``log_metrics``; without a logger nothing is written.
Only the global rank zero writes.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from sentinel_lightning.callbacks.head_metrics import HeadMetrics
from sentinel_lightning.events import HeadEvent, HeadEventListener, find_callback
from sentinel_lightning.gates import HeadGates, find_gates
from sentinel_lightning.heatmaps import render_heatmap

DRAWN_METRICS = ("entropy", "grad_norm")  # the head metrics the heatmaps show, the only ones computed


class GateMonitor(HeadEventListener):
    """Logs the gates, the head metrics and the pruning and reactivation events.

    Args:
        log_every_n_steps: Log every this many optimizer steps (and at the start of training and at every
            event). A positive integer.
        log_images: Whether to render heatmap images (the slowest part, about 0.3 s each).
        log_per_layer: Whether to log the active heads of every layer as scalars.
    """

    def __init__(self, log_every_n_steps: int = 50, log_images: bool = True, log_per_layer: bool = True) -> None:
        super().__init__()
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps!r} must be a positive integer.")
        self.log_every_n_steps = log_every_n_steps
        self.log_images = log_images
        self.log_per_layer = log_per_layer
        self._last_logged_step: int | None = None

    # Lightning hooks ------------------------------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_gates(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.log_every_n_steps == 0 and trainer.global_step != self._last_logged_step:
            self.log_gates(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_logged_step:
            self.log_gates(trainer, pl_module)

    @override
    def on_head_event(self, trainer: L.Trainer, pl_module: L.LightningModule, event: HeadEvent) -> None:
        """Writes the event as text (TensorBoard) and logs the gates as they are after it."""
        if trainer.is_global_zero:
            for writer in self._tensorboard_writers(trainer):
                writer.add_text("gates/events", _event_markdown(event), global_step=event.step)
        self.log_gates(trainer, pl_module, step=event.step)

    # Logging --------------------------------------------------------------------------------------------------

    def log_gates(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int | None = None) -> None:
        """Logs the current gates (and head metrics) to every logger of ``trainer``, at ``step``.

        Args:
            trainer: The trainer whose loggers receive the logs; nothing happens without one.
            pl_module: The module holding the gates.
            step: Global step to log at; None means ``trainer.global_step``.
        """
        self._last_logged_step = trainer.global_step  # on every rank, so that all ranks take the same path
        if not trainer.loggers:
            return
        gates = find_gates(pl_module)
        if gates is None:
            return
        writers = self._tensorboard_writers(trainer)
        # Every rank computes the head metrics, in case computing them synchronises the ranks.
        metrics = self._head_metrics(trainer) if writers and self.log_images else None
        if not trainer.is_global_zero:
            return
        step = trainer.global_step if step is None else step
        scalars = self.gate_scalars(gates)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        if not writers:
            return
        effective = gates.effective().detach().float().cpu()  # [num_layers, num_heads]
        pruned = ~gates.active.detach().cpu()
        images = {}
        if self.log_images:
            images["gates/heatmap"] = render_heatmap(
                effective, _title("Gate values", gates, step), "gate value", pruned, 0.0, 1.0
            )
            for name, title, label, log_scale in (
                ("entropy", "Attention entropy", "entropy (nats)", False),
                ("grad_norm", "Gradient importance", "|dL/dgate| (log scale)", True),
            ):
                values = None if metrics is None else metrics.get(name)
                if values is None or not torch.isfinite(values).any():
                    continue
                images[f"head_metrics/{name}"] = render_heatmap(
                    values, _title(title, gates, step), label, pruned, log_scale=log_scale
                )
        finite = effective[torch.isfinite(effective)]  # non-finite gates are missing from the histogram
        for writer in writers:
            for tag, image in images.items():
                writer.add_image(tag, image, global_step=step, dataformats="HWC")
            if finite.numel():
                bins = np.linspace(min(0.0, float(finite.min())), max(1.0, float(finite.max())), 21)
                writer.add_histogram("gates/histogram", finite, global_step=step, bins=bins)
            writer.flush()

    def gate_scalars(self, gates: HeadGates) -> dict[str, float]:
        """The scalars logged: the active fraction and (with ``log_per_layer``) each layer's active heads."""
        scalars = {"gates/active_fraction": gates.num_active / gates.active.numel()}
        if self.log_per_layer:
            width = len(str(gates.num_layers - 1))
            per_layer = gates.active.sum(dim=1).tolist()
            scalars.update(
                {f"gates_active_heads/layer_{layer:0{width}d}": float(count) for layer, count in enumerate(per_layer)}
            )
        return scalars

    @staticmethod
    def _tensorboard_writers(trainer: L.Trainer) -> list:
        return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    @staticmethod
    def _head_metrics(trainer: L.Trainer) -> dict[str, torch.Tensor] | None:
        head_metrics = find_callback(trainer, HeadMetrics)
        if head_metrics is None:
            return None
        with warnings.catch_warnings():  # before the first update the metrics are NaN, which is fine here
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            return head_metrics.compute(DRAWN_METRICS)  # not the [L, H, D, H * D] second moment, nor any other


def _title(name: str, gates: HeadGates, step: int) -> str:
    total = gates.active.numel()
    return f"{name}, step {step}: {gates.num_active}/{total} heads active"


def _event_markdown(event: HeadEvent) -> str:
    """The event as a short markdown paragraph for TensorBoard's text dashboard."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in sorted(event.heads):
        by_layer.setdefault(layer, []).append(head)
    heads = ", ".join(f"L{layer} (H{', H'.join(map(str, heads))})" for layer, heads in by_layer.items())
    value = "n/a" if event.value is None else f"{event.value:.3f}"
    return (
        f"**{event.kind}** {len(event.heads)} head(s) at epoch {event.epoch}, step {event.step}  \n"
        f"heads: {heads}  \n"
        f"reason: {event.reason}  \n"
        f"{event.monitor}: {value}; sparsity after: {event.sparsity:.1%}"
    )
