"""Per-head heatmaps: any ``[num_layers, num_heads]`` quantity drawn as an image, pruned heads hatched grey.

``GateMonitor`` sends them to TensorBoard. Drawn with matplotlib's object API (no pyplot, no global state).
"""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import torch
from matplotlib import colors
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

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
    values = values.detach().float().cpu()
    if values.ndim != 2:
        raise ValueError(f"values must be [num_layers, num_heads], got shape {tuple(values.shape)}.")
    num_layers, num_heads = values.shape
    pruned = torch.zeros_like(values, dtype=torch.bool) if pruned is None else pruned.detach().cpu().bool()
    if pruned.shape != values.shape:
        raise ValueError(f"pruned has shape {tuple(pruned.shape)} but values has shape {tuple(values.shape)}.")
    shown = values.masked_fill(pruned, float("nan"))  # [L, H]
    norm = _colour_norm(shown, vmin, vmax, log_scale)
    # Cell sizes in pixels (at 100 dpi). TensorBoard fits an image into a card about 350 pixels wide, so a
    # 30 x 9 grid makes an image of about 400 x 250 pixels whose text stays readable once fitted.
    cell_width = min(40.0, max(8.0, 270.0 / num_layers))
    cell_height = min(30.0, max(10.0, 150.0 / num_heads))
    figure = Figure(
        figsize=(max(380.0, cell_width * num_layers + 130.0) / 100, max(230.0, cell_height * num_heads + 95.0) / 100),
        dpi=100, layout="constrained",
    )
    figure.get_layout_engine().set(w_pad=0.02, h_pad=0.02)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colour_map = matplotlib.colormaps["viridis"].with_extremes(bad=MISSING_COLOUR)
    grid = np.ma.masked_invalid(shown.T.numpy())  # [H, L]: heads are rows, layers columns
    image = axes.imshow(grid, cmap=colour_map, norm=norm, aspect="auto", interpolation="nearest")
    notes = _mark_pruned_and_missing(axes, values, pruned)
    if annotate if annotate is not None else cell_width >= 30 and cell_height >= 18:
        _annotate_cells(axes, shown, norm)
    _style_axes(axes, num_layers, num_heads, title + ("\n" + "; ".join(notes) if notes else ""))
    _colour_bar(figure, axes, image, norm, colorbar_label)
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())  # [height, width, 4]
    return torch.from_numpy(rgba[..., :3].copy())


def _colour_norm(shown: torch.Tensor, vmin: float | None, vmax: float | None, log_scale: bool) -> colors.Normalize:
    """The colour scale over the finite (and, on a log scale, positive) cells of ``shown`` ``[L, H]``."""
    finite = shown[torch.isfinite(shown)]
    if log_scale:
        finite = finite[finite > 0]
    low = vmin if vmin is not None else (float(finite.min()) if finite.numel() else 0.0)
    high = vmax if vmax is not None else (float(finite.max()) if finite.numel() else 1.0)
    if high <= low:
        high = low + (abs(low) * 0.1 if low else 1.0)
    return colors.LogNorm(low, high) if log_scale and low > 0 else colors.Normalize(low, high)


def _mark_pruned_and_missing(axes: Axes, values: torch.Tensor, pruned: torch.Tensor) -> list[str]:
    """Hatches the pruned cells grey; returns notes on the pruned and the unmeasured (white) cells for the title."""
    notes = []
    for layer, head in pruned.nonzero().tolist():
        axes.add_patch(Rectangle(
            (layer - 0.5, head - 0.5), 1, 1, facecolor=PRUNED_COLOUR, hatch="xx", edgecolor=PRUNED_EDGE, linewidth=0
        ))
    if pruned.any():
        notes.append(f"{int(pruned.sum())} pruned (hatched grey)")
    missing = ~torch.isfinite(values) & ~pruned
    if missing.any():
        notes.append(f"{int(missing.sum())} not measured (white)")
    return notes


def _annotate_cells(axes: Axes, shown: torch.Tensor, norm: colors.Normalize) -> None:
    """Writes each finite cell's value of ``shown`` ``[L, H]`` into the cell, in a colour that reads on it."""
    for layer, head in torch.isfinite(shown).nonzero().tolist():
        value = float(shown[layer, head])
        text_colour = "black" if norm(value) > 0.6 else "white"
        axes.text(layer, head, _short(value), ha="center", va="center", fontsize=7, color=text_colour)


def _style_axes(axes: Axes, num_layers: int, num_heads: int, title: str) -> None:
    axes.xaxis.set_major_locator(MaxNLocator(nbins=min(num_layers, 8), integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(nbins=min(num_heads, 10), integer=True))
    axes.tick_params(labelsize=8, length=2, pad=1)
    axes.set_xlabel("layer", fontsize=9)
    axes.set_ylabel("head", fontsize=9)
    axes.set_title(title, fontsize=9)
    axes.set_xticks(np.arange(-0.5, num_layers), minor=True)
    axes.set_yticks(np.arange(-0.5, num_heads), minor=True)
    axes.grid(which="minor", color="white", linewidth=0.6)
    axes.tick_params(which="minor", length=0)


def _colour_bar(figure: Figure, axes: Axes, image, norm: colors.Normalize, label: str) -> None:
    colour_bar = figure.colorbar(image, ax=axes, fraction=0.06, pad=0.02)
    colour_bar.set_label(label, fontsize=8, labelpad=2)
    colour_bar.ax.tick_params(labelsize=8, length=2, pad=1)
    if isinstance(norm, colors.LogNorm):  # ticks at 1 (2, 5) times a power of ten, labelled like 2e-03
        subs = (1.0, 2.0, 5.0) if math.log10(norm.vmax / norm.vmin) <= 2 else (1.0,)
        colour_bar.ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
        colour_bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.0e}"))
        colour_bar.ax.yaxis.set_minor_formatter(NullFormatter())


def _short(value: float) -> str:
    """A value in at most four characters or so, for a heatmap cell."""
    if value == 0 or 0.01 <= abs(value) < 100:
        return f"{value:.2f}"
    return f"{value:.0e}"
