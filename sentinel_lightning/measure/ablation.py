"""Ablation: how much the loss grows when each unit (a head, a key/value group or a layer's heads) alone is pruned.

Measured, not estimated: one forward of the calibration batches per active unit, with that unit's heads pruned
(writing their mean output when ``compensation`` is given, as ``HeadPruning(compensate="mean"/"linear")`` will
make them write at least). On the embedded default it chooses far better groups than the gradients' first-order
estimate (docs/results.md, "Which groups to cut").

Its cost is one forward per unit and batch (``L * H / G`` units for groups, ``L * H`` for heads, ``L`` for layers),
less the decoder layers before the unit's, which return what they computed in the batch's first forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist

from sentinel_lightning.gates import find_causal_lm, find_gates
from sentinel_lightning.losses import causal_lm_nll
from sentinel_lightning.reconstruction import linear_compensation
from sentinel_lightning.standalone.families import family_of


def unit_heads(unit: str, num_heads: int, group_size: int) -> list[list[int]]:
    """The query heads of each unit of a layer: ``[[h], ...]``, ``[[k * G, ..., k * G + G - 1], ...]`` or all."""
    if unit == "head":
        return [[head] for head in range(num_heads)]
    if unit == "group":
        return [list(range(start, start + group_size)) for start in range(0, num_heads, group_size)]
    if unit == "layer":
        return [list(range(num_heads))]
    raise ValueError(f"unit={unit!r} is not one of 'head', 'group', 'layer'.")


@torch.no_grad()
def unit_ablation(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    unit: str = "head",
    group_size: int = 1,
    compensation: torch.Tensor | None = None,
    second_moment: Mapping[int, torch.Tensor] | torch.Tensor | None = None,
) -> torch.Tensor:
    """The increase of the mean token loss (nats) when each active unit alone is pruned, for each of its heads.

    Args:
        model: A gated causal LM, or a module holding one; left in the mode and with the gates it came with.
        batches: Dicts with ``input_ids`` ``[batch, seq]`` and optionally ``attention_mask`` and ``labels``.
        unit: ``"head"``, ``"group"`` (``G`` consecutive query heads) or ``"layer"``.
        group_size: ``G``.
        compensation: ``[L, H, D]``: what an ablated head writes (its mean output), or None: nothing.
        second_moment: None, or each layer's ``[H, D, H * D]`` second moment of the head outputs (a mapping over
            the layers or ``[L, H, D, H * D]``, as ``HeadMetrics`` keeps them; needs ``compensation``): the
            ablated unit's heads, and the layer's heads pruned before, then write their linear prediction from the
            layer's other active heads (``reconstruction.linear_compensation``), as ``HeadPruning(compensate=
            "linear")`` makes the heads it prunes write.

    Returns:
        ``[L, H]``: every active head carries its unit's loss increase; NaN where the unit has no active head
        left. Under ``torch.distributed`` the losses are summed over every rank's batches first, so every rank
        returns the same tensor.
    """
    gates = find_gates(model)
    if gates is None:
        raise ValueError(f"unit_ablation needs a gated model; {type(model).__name__} has no HeadGates.")
    causal_lm = find_causal_lm(model)
    batches = list(batches)
    if not batches:
        raise ValueError("unit_ablation needs at least one calibration batch.")
    units = [(layer, [h for h in heads if gates.active[layer, h]])
             for layer in range(gates.num_layers) for heads in unit_heads(unit, gates.num_heads, group_size)]
    units = [(layer, heads) for layer, heads in units if heads]
    layers = family_of(causal_lm).decoder_layers(causal_lm)
    # [units + 1, 2]: summed NLL and tokens of the model as it is (row 0) and with each unit pruned.
    totals = torch.zeros(len(units) + 1, 2, dtype=torch.float64)
    saved = (gates.active.clone(), gates.compensation.clone())
    saved_reconstruction = None if gates.reconstruction is None else gates.reconstruction.clone()
    if second_moment is not None:
        if compensation is None:
            raise ValueError("unit_ablation(second_moment=...) needs the heads' mean outputs as compensation.")
        gates.enable_linear_compensation()
        values = torch.where(gates.active, gates.values, gates.values_before_pruning).detach().cpu()  # [L, H]
    was_training = causal_lm.training
    causal_lm.eval()
    try:
        for batch in batches:
            outputs = _layer_outputs(causal_lm, layers, batch, totals[0])
            for row, (layer, heads) in enumerate(units, start=1):
                gates.active[layer, heads] = False
                if second_moment is not None:
                    constants, matrix = linear_compensation(
                        compensation[layer], second_moment[layer], gates.active[layer].cpu(), values[layer]
                    )
                    gates.set_linear_compensation(layer, constants, matrix)
                else:
                    gates.compensation[layer, heads] = 0.0 if compensation is None else compensation[layer, heads].to(
                        gates.compensation)
                with _replayed(layers[:layer], outputs):  # the layers before it compute what they computed
                    nll, tokens = causal_lm_nll(causal_lm, batch)
                totals[row] += torch.tensor([float(nll), float(tokens)], dtype=torch.float64)
                _restore(gates, saved, saved_reconstruction, layer)
    finally:
        _restore(gates, saved, saved_reconstruction)
        causal_lm.train(was_training)
    if dist.is_available() and dist.is_initialized():
        reduced = totals.to(gates.active.device)
        dist.all_reduce(reduced)
        totals = reduced.cpu()
    loss = totals[:, 0] / totals[:, 1].clamp_min(1)
    increase = torch.full(gates.active.shape, float("nan"))
    for (layer, heads), value in zip(units, (loss[1:] - loss[0]).tolist()):
        increase[layer, heads] = value
    return increase


def _restore(gates, saved: tuple[torch.Tensor, torch.Tensor], reconstruction: torch.Tensor | None,
             layer: int | None = None) -> None:
    """Gives the gates back the ``active`` and ``compensation`` of ``saved``, and the ``reconstruction`` of
    ``layer`` (every layer when None): None when the gates had no reconstruction before the ablation."""
    gates.active.copy_(saved[0])
    gates.compensation.copy_(saved[1])
    if gates.reconstruction is None:
        return
    if layer is not None:
        gates.reconstruction[layer] = 0.0 if reconstruction is None else reconstruction[layer]
    elif reconstruction is None:
        gates.reconstruction = None
    else:
        gates.reconstruction.copy_(reconstruction)


def _layer_outputs(causal_lm, layers, batch, total: torch.Tensor) -> list:
    """Runs ``batch`` through the model as it is, adds its summed NLL and tokens to ``total`` ``[2]`` and returns
    every decoder layer's output."""
    outputs: list = []
    handles = [layer.register_forward_hook(lambda module, args, output: outputs.append(output)) for layer in layers]
    try:
        nll, tokens = causal_lm_nll(causal_lm, batch)
    finally:
        for handle in handles:
            handle.remove()
    total += torch.tensor([float(nll), float(tokens)], dtype=torch.float64)
    return outputs


@contextmanager
def _replayed(layers, outputs: list):
    """Within the block, each of ``layers`` returns its recorded output instead of computing it."""
    for layer, output in zip(layers, outputs):
        layer.forward = lambda *args, _output=output, **kwargs: _output
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
