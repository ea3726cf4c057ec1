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

Other loggers (CSV, ...) get the scalars through ``log_metrics``; without a logger nothing is written.
Only the global rank zero writes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from sentinel_lightning.events import HeadEvent
from sentinel_lightning.gates import HeadGates, find_gates

PRUNED_COLOUR = "#c8c8c8"
PRUNED_EDGE = "#505050"
MISSING_COLOUR = "#ffffff"


def render_heatmap(
    values: torch.Tensor,
    title: str,
    colorbar_label: str,
    pruned: torch.Tensor | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    log_scale: bool = False,
    annotate: bool | None = None,
) -> torch.Tensor:
    """Draws a per-head quantity as a heatmap and returns it as an image.

    The grid shows layers along the horizontal axis and heads along the vertical axis, so that deep models
    give a wide image that TensorBoard's image cards (about 350 pixels wide) show at a readable size.

    Args:
        values: ``[num_layers, num_heads]``; NaN cells (nothing measured) are drawn white.
        title: Title above the grid; a second line explains the grey and white cells when there are any.
        colorbar_label: Label of the colour bar (the quantity and its unit).
        pruned: Bool ``[num_layers, num_heads]``; True cells are drawn hatched grey whatever their value.
        vmin: Bottom of the colour scale; None means the smallest finite value.
        vmax: Top of the colour scale; None means the largest finite value.
        log_scale: Whether the colour scale is logarithmic (for quantities spanning orders of magnitude).
        annotate: Whether every cell shows its value; None means when the cells are large enough to read it.

    Returns:
        The image, ``[height, width, 3]`` uint8 (RGB), for ``SummaryWriter.add_image(..., dataformats="HWC")``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    values = values.detach().float().cpu()
    if values.ndim != 2:
        raise ValueError(f"values must be [num_layers, num_heads], got shape {tuple(values.shape)}.")
    num_layers, num_heads = values.shape
    pruned = torch.zeros_like(values, dtype=torch.bool) if pruned is None else pruned.detach().cpu().bool()
    if pruned.shape != values.shape:
        raise ValueError(f"pruned has shape {tuple(pruned.shape)} but values has shape {tuple(values.shape)}.")
    shown = values.masked_fill(pruned, float("nan"))
    finite = shown[torch.isfinite(shown)]
    if log_scale:
        finite = finite[finite > 0]
    low = vmin if vmin is not None else (float(finite.min()) if finite.numel() else 0.0)
    high = vmax if vmax is not None else (float(finite.max()) if finite.numel() else 1.0)
    if high <= low:
        high = low + (abs(low) * 0.1 if low else 1.0)
    norm = colors.LogNorm(low, high) if log_scale and low > 0 else colors.Normalize(low, high)

    # Cell sizes in pixels (at 100 dpi). TensorBoard fits an image into a card about 350 pixels wide, so a
    # 30 x 9 grid makes an image of about 400 x 250 pixels whose text stays readable once fitted.
    cell_width = min(40.0, max(8.0, 270.0 / num_layers))
    cell_height = min(30.0, max(10.0, 150.0 / num_heads))
    width = max(380.0, cell_width * num_layers + 130.0) / 100
    height = max(230.0, cell_height * num_heads + 95.0) / 100
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    figure.get_layout_engine().set(w_pad=0.02, h_pad=0.02)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colour_map = matplotlib.colormaps["viridis"].with_extremes(bad=MISSING_COLOUR)
    grid = np.ma.masked_invalid(shown.T.numpy())  # [num_heads, num_layers]: heads are rows, layers columns
    image = axes.imshow(grid, cmap=colour_map, norm=norm, aspect="auto", interpolation="nearest")
    notes = []
    if pruned.any():
        for layer, head in pruned.nonzero().tolist():
            axes.add_patch(Rectangle(
                (layer - 0.5, head - 0.5), 1, 1, facecolor=PRUNED_COLOUR, hatch="xx", edgecolor=PRUNED_EDGE, linewidth=0
            ))
        notes.append(f"{int(pruned.sum())} pruned (hatched grey)")
    missing = ~torch.isfinite(values) & ~pruned
    if missing.any():
        notes.append(f"{int(missing.sum())} not measured (white)")
    if annotate is None:
        annotate = cell_width >= 30 and cell_height >= 18
    if annotate:
        for layer in range(num_layers):
            for head in range(num_heads):
                value = float(values[layer, head])
                if pruned[layer, head] or not math.isfinite(value):
                    continue
                text_colour = "black" if norm(value) > 0.6 else "white"
                axes.text(layer, head, _short(value), ha="center", va="center", fontsize=7, color=text_colour)
    axes.xaxis.set_major_locator(MaxNLocator(nbins=min(num_layers, 8), integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(nbins=min(num_heads, 10), integer=True))
    axes.tick_params(labelsize=8, length=2, pad=1)
    axes.set_xlabel("layer", fontsize=9)
    axes.set_ylabel("head", fontsize=9)
    axes.set_title(title + ("\n" + "; ".join(notes) if notes else ""), fontsize=9)
    axes.set_xticks(np.arange(-0.5, num_layers), minor=True)
    axes.set_yticks(np.arange(-0.5, num_heads), minor=True)
    axes.grid(which="minor", color="white", linewidth=0.6)
    axes.tick_params(which="minor", length=0)
    colour_bar = figure.colorbar(image, ax=axes, fraction=0.06, pad=0.02)
    colour_bar.set_label(colorbar_label, fontsize=8, labelpad=2)
    colour_bar.ax.tick_params(labelsize=8, length=2, pad=1)
    if isinstance(norm, colors.LogNorm):  # ticks at 1 (2, 5) times a power of ten, labelled like 2e-03
        subs = (1.0, 2.0, 5.0) if math.log10(high / low) <= 2 else (1.0,)
        colour_bar.ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
        colour_bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.0e}"))
        colour_bar.ax.yaxis.set_minor_formatter(NullFormatter())
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())  # [height, width, 4]
    return torch.from_numpy(rgba[..., :3].copy())


def _short(value: float) -> str:
    """A value in at most four characters or so, for a heatmap cell."""
    if value == 0 or 0.01 <= abs(value) < 100:
        return f"{value:.2f}"
    return f"{value:.0e}"


class GateMonitor(Callback):
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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_gates(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.log_every_n_steps == 0 and trainer.global_step != self._last_logged_step:
            self.log_gates(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_logged_step:
            self.log_gates(trainer, pl_module)

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
        for writer in writers:
            for tag, image in images.items():
                writer.add_image(tag, image, global_step=step, dataformats="HWC")
            top = max(1.0, float(effective.max()))
            writer.add_histogram("gates/histogram", effective.flatten(), global_step=step, bins=np.linspace(0.0, top, 21))
            writer.flush()

    def gate_scalars(self, gates: HeadGates) -> dict[str, float]:
        """The scalars logged: the active fraction and (with ``log_per_layer``) each layer's active heads."""
        scalars = {"gates/active_fraction": gates.num_active / gates.active.numel()}
        if self.log_per_layer:
            width = len(str(gates.num_layers - 1))
            per_layer = gates.active.sum(dim=1).tolist()
            scalars.update({f"gates_active_heads/layer_{layer:0{width}d}": float(count) for layer, count in enumerate(per_layer)})
        return scalars

    @staticmethod
    def _tensorboard_writers(trainer: L.Trainer) -> list:
        return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    @staticmethod
    def _head_metrics(trainer: L.Trainer) -> dict[str, torch.Tensor] | None:
        from sentinel_lightning.callbacks.head_metrics import HeadMetrics
        for callback in trainer.callbacks:
            if isinstance(callback, HeadMetrics):
                with warnings.catch_warnings():  # before the first update the metrics are NaN, which is fine here
                    warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
                    return callback.compute()
        return None


def _title(name: str, gates: HeadGates, step: int) -> str:
    total = gates.active.numel()
    return f"{name}, step {step}: {gates.num_active}/{total} heads active"


def _event_markdown(event: HeadEvent) -> str:
    """The event as a short markdown paragraph for TensorBoard's text dashboard."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in sorted(event.heads):
        by_layer.setdefault(layer, []).append(head)
    heads = ", ".join(f"L{layer} (H{', H'.join(map(str, heads))})" for layer, heads in by_layer.items())
    perplexity = "n/a" if event.perplexity is None else f"{event.perplexity:.3f}"
    return (
        f"**{event.kind}** {len(event.heads)} head(s) at epoch {event.epoch}, step {event.step}  \n"
        f"heads: {heads}  \n"
        f"reason: {event.reason}  \n"
        f"monitored perplexity: {perplexity}; sparsity after: {event.sparsity:.1%}"
    )
