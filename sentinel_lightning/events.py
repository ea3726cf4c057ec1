"""Pruning and reactivation events: what happened to which heads, when and why.

The callbacks that change gates keep their events in their state and announce each one to every callback
of the trainer that defines ``on_head_event(trainer, pl_module, event)`` (``GateMonitor`` does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

KINDS = ("prune", "reactivate")


@dataclass
class HeadEvent:
    """One change of the gates.

    Attributes:
        kind: ``"prune"`` or ``"reactivate"``.
        epoch: Training epoch at whose end (or validation) it happened.
        step: Global optimizer step.
        heads: The ``(layer, head)`` pairs concerned.
        reason: Why, in words (strategy and target, or the regression that triggered it).
        perplexity: The monitored validation perplexity when it happened, if known.
        sparsity: Fraction of all heads pruned after the event.
    """

    kind: str
    epoch: int
    step: int
    heads: list[tuple[int, int]]
    reason: str
    perplexity: float | None = None
    sparsity: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**asdict(self), "heads": [list(pair) for pair in self.heads]}

    @classmethod
    def from_dict(cls, data: dict) -> HeadEvent:
        return cls(**{**data, "heads": [tuple(pair) for pair in data["heads"]]})

    def describe(self) -> str:
        """A one-line human summary."""
        ppl = "n/a" if self.perplexity is None else f"{self.perplexity:.3f}"
        heads = ", ".join(f"L{layer}H{head}" for layer, head in self.heads)
        return (
            f"epoch {self.epoch}, step {self.step}: {self.kind} {len(self.heads)} head(s) [{heads}]; "
            f"reason: {self.reason}; monitored perplexity {ppl}; sparsity {self.sparsity:.3f}"
        )


def notify_head_event(trainer: L.Trainer, pl_module: L.LightningModule, event: HeadEvent) -> None:
    """Logs ``event`` on rank zero and calls ``on_head_event`` of every callback of ``trainer`` that has one."""
    rank_zero_info(f"sentinel-lightning: {event.describe()}")
    for callback in trainer.callbacks:
        handler = getattr(callback, "on_head_event", None)
        if callable(handler):
            handler(trainer, pl_module, event)
