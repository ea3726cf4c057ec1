"""Metrics that must be right across processes: token-weighted perplexity and per-head means.

Both keep sums and counts as ``torchmetrics`` states with ``dist_reduce_fx="sum"``, so ``compute()`` gives the
same answer on every DDP rank, weighted by every rank's tokens or steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import Metric

from sentinel_lightning.attention_entropy import EntropyRecording
from sentinel_lightning.gates import find_causal_lm, find_gates

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


def causal_lm_nll(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The one measurement contract: summed next-token NLL of a batch and the number of tokens it predicts.

    One masking rule everywhere (training, validation, evaluation, calibration): a position is not predicted
    when its label is -100 or its ``attention_mask`` is 0 (padding).

    Args:
        model: A Hugging Face causal LM (gated or not); the batch is moved to its device.
        batch: ``input_ids`` ``[batch, seq]``, optionally ``attention_mask`` ``[batch, seq]`` (1 = token) and
            ``labels`` ``[batch, seq]`` (default: ``input_ids``).

    Returns:
        The summed loss (a scalar, fp32, differentiable) and the count of predicted tokens (a scalar).
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(
            "batch must be a dict with 'input_ids' (and optionally 'attention_mask', 'labels'); got "
            f"{type(batch).__name__}."
        )
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    labels = batch.get("labels", input_ids).to(device)
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return causal_lm_token_losses(logits, labels)


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

    A non-finite update is left out of the mean, counted in ``skipped`` and warned about (on rank zero, at the
    first one since the last reset), so that it never drives a decision unseen: ``total_skipped()`` gives the
    count over every process for the code that decides.

    Args:
        num_layers, num_heads: The grid.
        name: What the mean is of, for the warnings (e.g. ``"grad_norm"``).
    """

    full_state_update = False

    def __init__(self, num_layers: int, num_heads: int, name: str = "per-head mean", **kwargs) -> None:
        super().__init__(**kwargs)
        self.name = name
        self.add_state("total", torch.zeros(num_layers, num_heads, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("skipped", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, total: torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        """Adds ``total`` ``[num_layers, num_heads]``, the sum over ``weight`` units (steps or tokens)."""
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
        """The mean ``[num_layers, num_heads]``; NaN where nothing was accumulated yet."""
        if self.weight == 0:
            return torch.full_like(self.total, float("nan")).float()
        return (self.total / self.weight).float()


class HeadStatistics(torch.nn.Module):
    """The head metrics' estimators, shared by ``HeadMetrics`` (during fit) and ``measure_head_metrics`` (without).

    - ``entropy``: each head's attention entropy (nats), the mean over real query tokens of the recorded passes.
    - ``grad_norm``: ``|dL/dgate|`` of each step's loss (the importance of Michel et al., 2019), the mean over
      steps.

    Args:
        num_layers, num_heads: The gates' grid.
    """

    def __init__(self, num_layers: int, num_heads: int) -> None:
        super().__init__()
        self.entropy = PerHeadMean(num_layers, num_heads, name="entropy")
        self.grad_norm = PerHeadMean(num_layers, num_heads, name="grad_norm")

    def update_entropy(self, recording: EntropyRecording) -> None:
        """Adds a closed recording's entropy sums ``[L, H]``, weighted by its real query tokens."""
        self.entropy.update(recording.sums, recording.tokens)

    def update_gradient(self, gradient: torch.Tensor) -> None:
        """Adds one step's gate gradient ``[L, H]`` (its absolute value)."""
        self.grad_norm.update(gradient.abs())

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"entropy": [L, H], "grad_norm": [L, H]}``, NaN where nothing was accumulated; a DDP collective."""
        return {"entropy": self.entropy.compute(), "grad_norm": self.grad_norm.compute()}

    def skipped(self) -> dict[str, int]:
        """``{"entropy": n, "grad_norm": n}``: non-finite updates left out since the last reset, over every process.

        A DDP collective, like ``compute``: a decision taken right after a divergence can see that its means rest
        on the steps before it only.
        """
        return {"entropy": self.entropy.total_skipped(), "grad_norm": self.grad_norm.total_skipped()}

    def reset(self) -> None:
        self.entropy.reset()
        self.grad_norm.reset()


def measure_head_metrics(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Measures every head's attention entropy and gradient importance on calibration batches, without a Trainer.

    The same estimators as ``HeadMetrics`` (``HeadStatistics``), each batch standing for one step: one eval-mode
    forward that records the entropy, and the gates' gradient of that batch's mean token loss
    (``causal_lm_nll``).

    Args:
        model: A gated causal LM (see ``attach_gates``), or a module holding one.
        batches: Dicts with ``input_ids`` ``[batch, seq]`` and optionally ``attention_mask`` and ``labels``.

    Returns:
        ``{"entropy": [num_layers, num_heads], "grad_norm": [num_layers, num_heads]}``.
    """
    gates = find_gates(model)
    if gates is None:
        raise ValueError(f"measure_head_metrics needs a gated model; {type(model).__name__} has no HeadGates.")
    causal_lm = find_causal_lm(model)
    statistics = HeadStatistics(gates.num_layers, gates.num_heads)
    learns, was_training = gates.values.requires_grad, causal_lm.training
    gates.values.requires_grad_(True)
    causal_lm.eval()
    try:
        for batch in batches:
            with torch.enable_grad(), EntropyRecording(causal_lm) as recording:
                nll_sum, tokens = causal_lm_nll(causal_lm, batch)
            (gradient,) = torch.autograd.grad(nll_sum / tokens.clamp_min(1), gates.values)
            statistics.update_entropy(recording)
            statistics.update_gradient(gradient)
    finally:
        gates.values.requires_grad_(learns)
        causal_lm.train(was_training)
    return statistics.compute()
