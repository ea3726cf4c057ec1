"""Metrics that must be right across processes: token-weighted perplexity and per-head means.

Both keep sums and counts as ``torchmetrics`` states with ``dist_reduce_fx="sum"``, so ``compute()`` gives the
same answer on every DDP rank, weighted by every rank's tokens or steps.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import Metric


def _all_reduce_sum(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """The sum of ``tensor`` over every process, as the one-element list torchmetrics' ``dist_sync_fn`` returns
    (it stacks the list and applies the state's ``"sum"`` reduction): one copy of the state, not one per rank."""
    reduced = tensor.clone()
    torch.distributed.all_reduce(reduced, group=group)
    return [reduced]


class Perplexity(Metric):
    """``exp(summed token NLL / token count)`` over every token seen, padding excluded."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        # Out of place: states reset under inference mode must still update outside it.
        self.nll_sum = self.nll_sum + nll_sum.detach().double()
        self.tokens = self.tokens + tokens.detach().long()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll_sum / self.tokens.clamp_min(1)).float()


class PerHeadMean(Metric):
    """The mean of a per-head quantity ``[num_layers, num_heads, *trailing]`` over weighted updates (steps, tokens,
    examples or positions).

    A non-finite update is left out of the mean, counted in ``skipped`` and warned about (on rank zero, at the
    first one since the last reset), so that it never drives a decision unseen: ``total_skipped()`` gives the
    count over every process for the code that decides.

    Args:
        num_layers, num_heads: The grid.
        name: What the mean is of, for the warnings (e.g. ``"grad_norm"``).
        trailing: Further dimensions of the quantity per head (e.g. ``(D,)`` for a head's output vector).
    """

    full_state_update = False

    def __init__(
        self, num_layers: int, num_heads: int, name: str = "per-head mean", trailing: tuple[int, ...] = (), **kwargs
    ) -> None:
        # Ranks are summed by one all_reduce, not torchmetrics' all_gather (world-size copies of every state).
        super().__init__(**{"dist_sync_fn": _all_reduce_sum, **kwargs})
        self.name = name
        self.state_shape = (num_layers, num_heads, *trailing)
        # The default to reset to is one zero, not a full copy of the state (``reset`` makes it full again).
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("skipped", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.total = torch.zeros(self.state_shape, dtype=torch.float64)

    def reset(self) -> None:
        """Every state back to zero, ``total`` at its full shape ``[num_layers, num_heads, *trailing]``."""
        super().reset()
        self.total = self.total.new_zeros(self.state_shape)

    def update(self, total: torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        """Adds ``total`` ``[num_layers, num_heads, *trailing]``, the sum over ``weight`` units (steps, tokens...)."""
        total = total.detach().to(self.total.device, torch.float64)
        if not torch.isfinite(total).all():
            self.skipped = self.skipped + 1
            if int(self.skipped) == 1:
                rank_zero_warn(
                    f"{self.name}: an update with {int((~torch.isfinite(total)).sum())} non-finite value(s) was left "
                    "out of the mean; decisions on it rest on the finite updates only (see skipped)."
                )
            return
        self.total = self.total + total
        self.weight = self.weight + float(weight)

    def total_skipped(self) -> int:
        """The non-finite updates left out since the last reset, summed over every process (a DDP collective)."""
        with self.sync_context():
            return int(self.skipped)

    def compute(self) -> torch.Tensor:
        """The mean ``[num_layers, num_heads, *trailing]``; NaN where nothing was accumulated yet."""
        if self.weight == 0:
            return torch.full_like(self.total, float("nan")).float()
        return (self.total / self.weight).float()

    def compute_layer(self, layer: int) -> torch.Tensor:
        """The mean of one layer, ``[num_heads, *trailing]`` (as ``compute()[layer]``), summed over every process
        without the other layers: a DDP collective that costs one layer's state."""
        total, weight = self.total[layer].clone(), self.weight.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(weight)
        if weight == 0:
            return torch.full_like(total, float("nan")).float()
        return (total / weight).float()
