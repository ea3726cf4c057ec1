"""Pruning strategies: pure functions from per-head metrics to the heads to prune.

A strategy maps the metrics (``{"entropy": [L, H], "grad_norm": [L, H]}``) to a score ``[L, H]``; the heads
with the highest scores are pruned first. ``select_heads`` then picks the heads under the scope and the
per-layer minimum, never choosing a head that is already pruned, protected, or scored NaN or infinite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Metrics = Mapping[str, torch.Tensor]
Strategy = Callable[[Metrics], torch.Tensor]

SCOPES = ("global", "layer")


def entropy_score(metrics: Metrics) -> torch.Tensor:
    """Highest attention entropy first: the broadest, least focused heads go first."""
    return metrics["entropy"].float()


def gradient_score(metrics: Metrics) -> torch.Tensor:
    """Lowest ``|dL/dgate|`` first (Michel et al., 2019): heads the loss is least sensitive to go first."""
    return -metrics["grad_norm"].float()


class RandomScore:
    """A seeded random score, identical on every process and every call with the same seed."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, metrics: Metrics) -> torch.Tensor:
        shape = next(iter(metrics.values())).shape
        return torch.rand(shape, generator=torch.Generator().manual_seed(self.seed))


STRATEGIES: dict[str, Callable[[int], Strategy]] = {
    "entropy": lambda seed: entropy_score,
    "gradient": lambda seed: gradient_score,
    "random": lambda seed: RandomScore(seed),
}


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


def select_heads(
    scores: torch.Tensor,
    active: torch.Tensor,
    count: int,
    scope: str = "global",
    min_active_heads_per_layer: int = 1,
    protected: torch.Tensor | None = None,
) -> list[tuple[int, int]]:
    """Chooses up to ``count`` active heads to prune, highest score first.

    Args:
        scores: ``[num_layers, num_heads]``; higher is pruned first. NaN or infinite heads are never chosen.
        active: Bool ``[num_layers, num_heads]``; only active heads are candidates.
        count: How many heads to prune.
        scope: ``"global"`` ranks all heads together; ``"layer"`` spreads the pruning evenly over the layers,
            taking each layer's highest-scoring heads.
        min_active_heads_per_layer: No layer is left with fewer active heads.
        protected: Bool ``[num_layers, num_heads]`` of heads that must not be pruned, or None.

    Returns:
        ``(layer, head)`` pairs in the order they were chosen; fewer than ``count`` when the constraints
        leave too few candidates.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}.")
    if scores.shape != active.shape:
        raise ValueError(f"scores has shape {tuple(scores.shape)} but active has shape {tuple(active.shape)}.")
    scores = scores.detach().float().cpu()
    candidates = active.cpu().clone() & torch.isfinite(scores)
    if protected is not None:
        candidates &= ~protected.cpu()
    num_layers, num_heads = scores.shape
    remaining = active.cpu().sum(dim=1).tolist()  # active heads per layer
    # Candidates in a deterministic order: score descending, then layer, then head.
    order = sorted(
        ((layer, head) for layer, head in candidates.nonzero().tolist()),
        key=lambda pair: (-scores[pair[0], pair[1]].item(), pair[0], pair[1]),
    )
    chosen: list[tuple[int, int]] = []
    if scope == "global":
        for layer, head in order:
            if len(chosen) == count:
                break
            if remaining[layer] > min_active_heads_per_layer:
                chosen.append((layer, head))
                remaining[layer] -= 1
        return chosen
    queues = {layer: [pair for pair in order if pair[0] == layer] for layer in range(num_layers)}
    while len(chosen) < count:
        open_layers = [layer for layer in range(num_layers) if queues[layer] and remaining[layer] > min_active_heads_per_layer]
        if not open_layers:
            break
        # The layer with the most active heads left goes next, so every layer ends with about as many.
        layer = max(open_layers, key=lambda index: (remaining[index], -index))
        chosen.append(queues[layer].pop(0))
        remaining[layer] -= 1
    return chosen
