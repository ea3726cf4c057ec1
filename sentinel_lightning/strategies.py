"""Pruning strategies: pure functions from per-head metrics to the heads to prune.

A strategy maps the metrics (``{"entropy", "sink_mass", "rest_entropy", "grad_norm", "example_importance",
"compensated_importance", "active": [L, H], ...}``, see ``measure.HeadStatistics``) to a score ``[L, H]``; the
heads with the highest scores are pruned first. A score reads ``HeadMetrics``' measurements unless it declares
``needs_head_metrics = False`` (``needs_head_metrics``), which ``HeadPruning`` checks at setup. ``select_heads``
then picks whole units (a query head, a key/value group or a layer) under the scope and the per-layer minimum,
never choosing a head that is already pruned, protected, or scored NaN or infinite. Everything here is a pure
function of tensors; the model's group size ``G`` comes from the family registry
(``families.family_of(model).group_size(model.config)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

Metrics = Mapping[str, torch.Tensor]
Strategy = Callable[[Metrics], torch.Tensor]

SCOPES = ("global", "layer", "uniform")
UNITS = ("head", "group", "layer")
_TIE = 1e-9  # slack so that an exact half rounds up despite floating-point noise


def gradient_score(metrics: Metrics) -> torch.Tensor:
    """Lowest ``|dL/dgate|`` of each step's batch first (the default: on the embedded default it loses 2.6% to the
    per-example version at 30% of heads and wins by a third at 50%, docs/results.md)."""
    return -metrics["grad_norm"].float()


def per_example_gradient_score(metrics: Metrics) -> torch.Tensor:
    """Lowest mean over examples of ``|dL_b/dgate|`` first (Michel et al., 2019's expectation; examples do not
    cancel in it as they do in the batch gradient)."""
    return -metrics["example_importance"].float()


def compensated_gradient_score(metrics: Metrics) -> torch.Tensor:
    """Lowest mean over examples of the first-order loss change of replacing the head's output by its mean output
    first: the score for pruning with ``compensate="mean"`` (or ``"linear"``), where a pruned head writes that mean
    (or better) instead of zero (a head whose output is nearly constant costs little however large it is)."""
    return -metrics["compensated_importance"].float()


def layer_normalised_gradient_score(metrics: Metrics) -> torch.Tensor:
    """Lowest per-example importance first, each layer's importances divided by their L2 norm (Michel et al.)."""
    importance = metrics["example_importance"].float()  # [L, H]
    return -importance / importance.norm(dim=1, keepdim=True).clamp_min(torch.finfo(importance.dtype).tiny)


def rank_within_layer(values: torch.Tensor) -> torch.Tensor:
    """Each head's rank among its layer's heads, ``[L, H]`` in [0, 1] (0 = lowest); NaN stays NaN.

    Global selection on these ranks takes about as many heads from every layer. Equal ranks of different layers
    are ordered by the values themselves (a tie-break far below one rank step).
    """
    finite = torch.isfinite(values)
    filled = torch.where(finite, values, values[finite].min() if finite.any() else 0.0)
    ranks = filled.argsort(dim=1).argsort(dim=1).float() / max(values.shape[1] - 1, 1)
    spread = filled - filled.min()
    ties = spread / spread.max().clamp_min(torch.finfo(spread.dtype).tiny) / (2 * values.shape[1])
    return torch.where(finite, ranks + ties, float("nan"))


def attention_sink_score(metrics: Metrics) -> torch.Tensor:
    """The heads of each layer that park most attention on the first token go first, about as many per layer.

    Low attention entropy mostly means a head parks its attention on the first token (an "attention sink"):
    such heads write little, which is why the highest-entropy-first rule removes the wrong heads. The share of
    attention on the first token (``sink_mass``), ranked within each layer, is the attention statistic that
    beats random pruning on the embedded default (docs/results.md).
    """
    return rank_within_layer(metrics["sink_mass"].float())


def entropy_score(metrics: Metrics) -> torch.Tensor:
    """The seed's definition: highest attention entropy first (the broadest heads). Loses to random on SmolLM2."""
    return metrics["entropy"].float()


def lowest_entropy_score(metrics: Metrics) -> torch.Tensor:
    """Lowest attention entropy first (the seed's rule reversed)."""
    return -metrics["entropy"].float()


def ablation_score(metrics: Metrics) -> torch.Tensor:
    """Smallest measured loss increase first: ``metrics["ablation"]``, each unit's increase of the mean token loss
    when it alone is pruned (``measure.ablation.unit_ablation``, which ``HeadPruning`` runs on its last training
    batches when the strategy declares ``needs_ablation``)."""
    return -metrics["ablation"].float()


ablation_score.needs_ablation = True


def needs_ablation(score: Strategy) -> bool:
    """Whether ``score`` reads ``metrics["ablation"]``, which ``HeadPruning`` measures only for such a strategy."""
    return bool(getattr(score, "needs_ablation", False))


def needs_head_metrics(score: Strategy) -> bool:
    """Whether ``score`` reads ``HeadMetrics``' measurements: its ``needs_head_metrics`` attribute, else True.

    A callable strategy that reads only ``metrics["active"]`` sets ``score.needs_head_metrics = False`` to run
    without a ``HeadMetrics`` callback; any other would fail at its first pruning without one.
    """
    return bool(getattr(score, "needs_head_metrics", True))


class RandomScore:
    """A seeded random score, identical on every process and every call with the same seed."""

    needs_head_metrics = False  # reads only the shape of the metrics

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, metrics: Metrics) -> torch.Tensor:
        shape = metrics["active"].shape if "active" in metrics else next(iter(metrics.values())).shape
        return torch.rand(shape, generator=torch.Generator().manual_seed(self.seed))


STRATEGIES: dict[str, Callable[[int], Strategy]] = {
    "gradient": lambda seed: gradient_score,
    "gradient_per_example": lambda seed: per_example_gradient_score,
    "gradient_layer_norm": lambda seed: layer_normalised_gradient_score,
    "gradient_compensated": lambda seed: compensated_gradient_score,
    "ablation": lambda seed: ablation_score,
    "attention_sink": lambda seed: attention_sink_score,
    "entropy": lambda seed: entropy_score,
    "lowest_entropy": lambda seed: lowest_entropy_score,
    "random": lambda seed: RandomScore(seed),
}
# The registered strategies that read HeadMetrics' measurements (random needs none).
METRIC_STRATEGIES = tuple(name for name, make in STRATEGIES.items() if needs_head_metrics(make(0)))


def resolve_strategy(strategy: str | Strategy, seed: int = 0) -> Strategy:
    """Turns a registered name or a callable ``metrics -> score [L, H]`` into a strategy."""
    if callable(strategy):
        return strategy
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy={strategy!r} is not registered; use one of {sorted(STRATEGIES)} or a callable that maps "
            "the metrics to a score [num_layers, num_heads] (highest pruned first)."
        )
    return STRATEGIES[strategy](seed)


class Unit(NamedTuple):
    """A unit that may be pruned: its layer, its active query heads and their mean score."""

    score: float
    layer: int
    heads: tuple[int, ...]


def resolve_minimum(unit: str, scope: str, min_active_heads_per_layer: int | None) -> int:
    """Checks that ``unit``, ``scope`` and ``min_active_heads_per_layer`` fit together; returns the minimum.

    ``None`` means 1 for ``unit="head"`` and ``"group"`` (no layer loses its attention) and 0 for ``"layer"``.

    Raises:
        ValueError: naming the argument, its value and what is allowed.
    """
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r} is not one of {UNITS}.")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}.")
    if unit == "layer" and scope != "global":
        raise ValueError(
            f"unit='layer' needs scope='global' (whole layers are ranked against each other), got scope={scope!r}: "
            "scope='layer' and scope='uniform' prune inside every layer."
        )
    if min_active_heads_per_layer is None:
        return 0 if unit == "layer" else 1
    minimum = min_active_heads_per_layer
    if not isinstance(minimum, int) or isinstance(minimum, bool) or minimum < 0:
        raise ValueError(f"min_active_heads_per_layer={minimum!r} must be a non-negative integer.")
    if unit == "layer" and minimum > 0:
        raise ValueError(
            f"unit='layer' removes all heads of a layer, so min_active_heads_per_layer must be 0 or None with it, "
            f"got min_active_heads_per_layer={minimum}."
        )
    return minimum


def unit_size(unit: str, num_heads: int, group_size: int) -> int:
    """Query heads in one unit: 1 (``"head"``), ``G`` (``"group"``) or ``H`` (``"layer"``)."""
    return {"head": 1, "group": group_size, "layer": num_heads}[unit]


def _block_size(unit: str, num_heads: int, group_size: int) -> int:
    """Heads among which ``scope="uniform"`` prunes the same number of units.

    A key/value group for ``unit="head"`` under grouped-query attention (the pruning is spread evenly over the
    groups); otherwise the whole layer (a group of one head has nothing to spread over).
    """
    return group_size if unit == "head" and group_size > 1 else num_heads


def pruning_step(unit: str, scope: str, num_heads: int, group_size: int) -> int:
    """Query heads per layer that one step of pruning removes: a unit, or under ``"uniform"`` one unit per block.

    With ``H = 9, K = 3`` (``G = 3``): 1 for ``unit="head"``, 3 for ``"group"``, 9 for ``"layer"``; under
    ``"uniform"`` 3 for ``"head"`` (one head of every group) and 3 for ``"group"``. Without grouped-query
    attention (``G = 1``) a uniform step is one head per layer.
    """
    size = unit_size(unit, num_heads, group_size)
    return size * num_heads // _block_size(unit, num_heads, group_size) if scope == "uniform" else size


def prunable_per_layer(num_heads: int, unit: str, scope: str, group_size: int, minimum: int) -> int:
    """The most query heads whole steps (``pruning_step``) can prune from one layer that keeps ``minimum`` heads."""
    step = pruning_step(unit, scope, num_heads, group_size)
    return step * ((num_heads - minimum) // step)


def reachable_count(
    goal: float, num_layers: int, num_heads: int, unit: str, scope: str, group_size: int, final: bool = True
) -> int:
    """The number of pruned query heads nearest ``goal`` that whole units reach, ties rounding up.

    Whole units reach multiples of the unit size; ``scope="uniform"`` reaches multiples of ``num_layers`` times
    ``pruning_step``, except for a target before the schedule's last (``final=False``), which may lie between two
    uniform shapes and reaches multiples of the unit size. The per-layer minimum is not applied here (see
    ``prunable_per_layer``).
    """
    if scope == "uniform" and final:
        granule = pruning_step(unit, scope, num_heads, group_size) * num_layers
    else:
        granule = unit_size(unit, num_heads, group_size)
    return granule * math.floor(goal / granule + 0.5 + _TIE)


def uniform_shape(active: torch.Tensor, group_size: int = 1) -> tuple[int, int] | None:
    """The shape of a uniformly pruned model, or None when the layers or the kept groups differ.

    Args:
        active: Bool ``[num_layers, num_heads]``.
        group_size: ``G``, query heads per key/value head (1 without grouped-query attention).

    Returns:
        ``(kept groups per layer, query heads per kept group)`` when every layer keeps as many groups and every
        kept group, in every layer, keeps as many query heads; ``(0, 0)`` when every head is pruned.
    """
    counts = active.cpu().reshape(active.shape[0], -1, group_size).sum(dim=2)  # [L, K] kept query heads per group
    groups = (counts > 0).sum(dim=1)  # [L]
    kept = counts[counts > 0]
    if (groups != groups[0]).any() or (kept != kept[:1]).any():
        return None
    return int(groups[0]), int(kept[0]) if kept.numel() else 0


def _candidate_units(
    scores: torch.Tensor, active: torch.Tensor, protected: torch.Tensor | None, size: int
) -> list[Unit]:
    """Every unit of ``size`` heads that may be pruned, highest mean score first (ties: layer, then head).

    A unit may be pruned when it has an active head and none of its active heads is protected or scored NaN or
    infinite; its score is the mean of its active heads' scores (pruned heads are ignored).
    """
    blocked = ~torch.isfinite(scores)
    if protected is not None:
        blocked |= protected.cpu()
    scores, active, blocked = scores.tolist(), active.cpu().tolist(), blocked.tolist()
    units = []
    for layer, (layer_active, layer_blocked) in enumerate(zip(active, blocked)):
        for start in range(0, len(layer_active), size):
            heads = tuple(head for head in range(start, start + size) if layer_active[head])
            if heads and not any(layer_blocked[head] for head in heads):
                units.append(Unit(sum(scores[layer][head] for head in heads) / len(heads), layer, heads))
    return sorted(units, key=lambda unit: (-unit.score, unit.layer, unit.heads[0]))


def _fits(unit: Unit, left: int, remaining: list[int], minimum: int) -> bool:
    """Whether ``unit`` overshoots the ``left`` heads still wanted by at most half of it and keeps the minimum."""
    size = len(unit.heads)
    return 2 * left >= size and remaining[unit.layer] - size >= minimum


def _select_global(units: list[Unit], remaining: list[int], count: int, minimum: int) -> list[Unit]:
    """Takes units in score order wherever they fit."""
    chosen = []
    for unit in units:
        if _fits(unit, count, remaining, minimum):
            chosen.append(unit)
            count -= len(unit.heads)
            remaining[unit.layer] -= len(unit.heads)
    return chosen


def _select_per_layer(units: list[Unit], remaining: list[int], count: int, minimum: int) -> list[Unit]:
    """Takes, one unit at a time, the best fitting unit of the layer with the most active heads left."""
    chosen, pending = [], list(units)
    while fitting := [unit for unit in pending if _fits(unit, count, remaining, minimum)]:
        layer = max({unit.layer for unit in fitting}, key=lambda index: (remaining[index], -index))
        unit = next(unit for unit in fitting if unit.layer == layer)
        pending.remove(unit)
        chosen.append(unit)
        count -= len(unit.heads)
        remaining[unit.layer] -= len(unit.heads)
    return chosen


def _select_uniform(
    units: list[Unit], active: torch.Tensor, count: int, minimum: int, unit: str, group_size: int, final: bool
) -> list[Unit]:
    """Prunes every block (``_block_size``) of every layer up to the same number of pruned units.

    The number is the one whose uniform shape is nearest the already pruned heads plus ``count`` (ties round up),
    at most what ``minimum`` allows. Blocks that already have that many pruned units (whole units without an
    active head) take nothing; the others take their highest-scoring candidates. Before the schedule's last
    target (``final=False``) the total may lie between two uniform shapes: every block reaches the lower one and
    the blocks whose next candidate scores highest take one unit more, so that the cheapest blocks go first and
    no block gets ahead of the others by more than one unit.
    """
    num_layers, num_heads = active.shape
    size, block = unit_size(unit, num_heads, group_size), _block_size(unit, num_heads, group_size)
    step = pruning_step(unit, "uniform", num_heads, group_size)
    pruned = int((~active).sum())
    goal = reachable_count(pruned + count, num_layers, num_heads, unit, "uniform", group_size, final)
    most = prunable_per_layer(num_heads, unit, "uniform", group_size, minimum) // step  # units per block
    per_block = min(goal // (num_layers * step), most)
    pruned_units = (~active.cpu()).reshape(num_layers, num_heads // block, block // size, size).all(dim=3).sum(dim=2)
    queues: dict[tuple[int, int], list[Unit]] = {}
    for candidate in units:  # in score order
        queues.setdefault((candidate.layer, candidate.heads[0] // block), []).append(candidate)
    chosen, ahead = [], []
    for (layer, index), queue in sorted(queues.items()):
        taken = max(0, per_block - int(pruned_units[layer, index]))
        chosen += queue[:taken]
        if per_block < most and int(pruned_units[layer, index]) <= per_block and len(queue) > taken:
            ahead.append(queue[taken])  # the block's candidate for one unit more
    extra = (goal - per_block * num_layers * step) // size - int((pruned_units > per_block).sum())
    if extra > 0:
        chosen += sorted(ahead, key=lambda candidate: (-candidate.score, candidate.layer, candidate.heads[0]))[:extra]
    return chosen


def select_heads(
    scores: torch.Tensor,
    active: torch.Tensor,
    count: int,
    scope: str = "global",
    min_active_heads_per_layer: int | None = None,
    protected: torch.Tensor | None = None,
    unit: str = "head",
    group_size: int = 1,
    final: bool = True,
) -> list[tuple[int, int]]:
    """Chooses about ``count`` active query heads to prune, in whole units, highest score first.

    Args:
        scores: ``[num_layers, num_heads]``; higher is pruned first. A unit's score is the mean of its active
            heads' scores, so that units of any size compare on one scale (a sum would favour or spare the
            units with more heads left, depending on the sign of the strategy's score).
        active: Bool ``[num_layers, num_heads]``; only active heads are pruned.
        count: How many more query heads to prune. Whole units are taken while each overshoots ``count`` by at
            most half a unit: the result is ``count`` rounded to whole units (ties prune).
        scope: ``"global"`` ranks all units together; ``"layer"`` spreads the pruning evenly over the layers,
            taking each layer's highest-scoring units; ``"uniform"`` prunes every layer to the same shape (see
            ``pruning_step``): ``unit="head"`` takes the same number of heads from every key/value group of
            every layer (from every layer without grouped-query attention), ``unit="group"`` the same number of
            groups from every layer. Its total is the uniform one nearest the pruned heads plus ``count``, and
            blocks that have fewer pruned units (e.g. after reactivation) catch up; with ``final=False`` it may
            lie between two uniform shapes (see ``_select_uniform``).
        min_active_heads_per_layer: No layer is left with fewer active query heads; None means 1 (0 for
            ``unit="layer"``, which allows only 0). With ``unit="group"`` a layer keeps ``ceil(min / G)`` groups.
        protected: Bool ``[num_layers, num_heads]`` of heads that must not be pruned, or None.
        unit: ``"head"``, ``"group"`` (a key/value head and the ``G`` query heads that read it: heads
            ``[k * G, (k + 1) * G)``) or ``"layer"`` (all heads of a layer; only with ``scope="global"``).
        group_size: ``G``, query heads per key/value head (1 without grouped-query attention).
        final: ``scope="uniform"`` only: False for a schedule target before the last, which is reached in whole
            units rather than whole uniform shapes, the blocks with the highest-scoring units one unit ahead.

    Returns:
        ``(layer, head)`` pairs, unit by unit in the order they were chosen; a unit with a protected or
        non-finite active head is never chosen, so fewer heads come back when the constraints leave too few.
    """
    minimum = resolve_minimum(unit, scope, min_active_heads_per_layer)
    if scores.shape != active.shape:
        raise ValueError(f"scores has shape {tuple(scores.shape)} but active has shape {tuple(active.shape)}.")
    num_heads = scores.shape[1]
    if not isinstance(group_size, int) or group_size < 1 or num_heads % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive divisor of num_heads={num_heads}.")
    units = _candidate_units(scores.detach().float().cpu(), active, protected, unit_size(unit, num_heads, group_size))
    if scope == "uniform":
        chosen = _select_uniform(units, active, count, minimum, unit, group_size, final)
    else:
        select = _select_global if scope == "global" else _select_per_layer
        chosen = select(units, active.cpu().sum(dim=1).tolist(), count, minimum)
    return [(chosen_unit.layer, head) for chosen_unit in chosen for head in chosen_unit.heads]
