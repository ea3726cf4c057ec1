"""Metrics that must be right across processes: token-weighted perplexity and per-head means.

Both keep sums and counts as ``torchmetrics`` states with ``dist_reduce_fx="sum"``, so ``compute()`` gives the
same answer on every DDP rank, weighted by every rank's tokens or steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric

IGNORE_INDEX = -100


def causal_lm_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of predicted tokens.

    Args:
        logits: ``[batch, seq, vocab]``.
        labels: ``[batch, seq]``; ``-100`` marks positions (padding) that are not predicted.

    Returns:
        The summed loss (a scalar, fp32) and the count of predicted tokens (a scalar).
    """
    shifted_logits = logits[:, :-1].flatten(0, 1).float()  # [batch * (seq - 1), vocab]
    shifted_labels = labels[:, 1:].flatten()  # [batch * (seq - 1)]
    total = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (shifted_labels != IGNORE_INDEX).sum()


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
    """The mean of a per-head quantity ``[num_layers, num_heads]`` over weighted updates (steps or tokens).

    Non-finite updates are skipped and counted in ``skipped`` so that they never drive a decision.
    """

    full_state_update = False

    def __init__(self, num_layers: int, num_heads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros(num_layers, num_heads, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("skipped", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, total: torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        """Adds ``total`` ``[num_layers, num_heads]``, the sum over ``weight`` units (steps or tokens)."""
        total = total.detach().to(self.total.device, torch.float64)
        if not torch.isfinite(total).all():
            self.skipped = self.skipped + 1
            return
        self.total = self.total + total
        self.weight = self.weight + float(weight)

    def compute(self) -> torch.Tensor:
        """The mean ``[num_layers, num_heads]``; NaN where nothing was accumulated yet."""
        if self.weight == 0:
            return torch.full_like(self.total, float("nan")).float()
        return (self.total / self.weight).float()
