"""Pruning and reactivation events, and how the callbacks hear of them.

The callbacks that change gates keep their events in their state and announce each one to every callback of the
trainer that is a ``HeadEventListener`` (``HeadMetrics``, ``HeadReactivation`` and ``GateMonitor`` are; a user's
callback can be too), and to the LightningModule when it is a ``ModuleHeadEventListener`` (``GatedLanguageModel``
is; a user's module can be too). ``HeadPruning`` also tells a ``PruningAwareModule`` just before it prunes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

KINDS = ("prune", "reactivate")
CallbackType = TypeVar("CallbackType", bound=L.Callback)


@dataclass
class HeadEvent:
    """One change of the gates.

    Attributes:
        kind: ``"prune"`` or ``"reactivate"``.
        epoch: Training epoch at whose end (or validation) it happened.
        step: Global optimizer step.
        heads: The ``(layer, head)`` pairs concerned.
        reason: Why, in words (strategy and target, or the regression that triggered it).
        value: The monitored metric's value when it happened, if known.
        sparsity: Fraction of all heads pruned after the event.
        monitor: The name of the monitored metric (``"val_ppl"`` by default).
    """

    kind: str
    epoch: int
    step: int
    heads: list[tuple[int, int]]
    reason: str
    value: float | None = None
    sparsity: float = 0.0
    monitor: str = "val_ppl"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**asdict(self), "heads": [list(pair) for pair in self.heads]}

    @classmethod
    def from_dict(cls, data: dict) -> HeadEvent:
        return cls(**{**data, "heads": [tuple(pair) for pair in data["heads"]]})

    def describe(self) -> str:
        """A one-line human summary."""
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        heads = ", ".join(f"L{layer}H{head}" for layer, head in self.heads)
        return (
            f"epoch {self.epoch}, step {self.step}: {self.kind} {len(self.heads)} head(s) [{heads}]; "
            f"reason: {self.reason}; {self.monitor} {value}; sparsity {self.sparsity:.3f}"
        )


class HeadEventListener(L.Callback):
    """A callback that hears every pruning and reactivation event of its trainer."""

    def on_head_event(self, trainer: L.Trainer, pl_module: L.LightningModule, event: HeadEvent) -> None:
        """Called on every rank after the gates changed."""


@runtime_checkable
class ModuleHeadEventListener(Protocol):
    """A LightningModule that hears every pruning and reactivation event of its trainer.

    Unlike ``HeadEventListener.on_head_event`` the module is not passed: it is ``self``.
    """

    def on_head_event(self, trainer: L.Trainer, event: HeadEvent) -> None:
        """Called on every rank after the gates changed, after every ``HeadEventListener`` callback."""


@runtime_checkable
class PruningAwareModule(Protocol):
    """A LightningModule that ``HeadPruning`` tells just before it prunes, while the model is still as it was."""

    def on_before_prune(self, trainer: L.Trainer, heads: list[tuple[int, int]]) -> None:
        """Called on every rank with the ``(layer, head)`` pairs about to be pruned, before any gate or
        compensation changes."""


def find_callback(trainer: L.Trainer, kind: type[CallbackType]) -> CallbackType | None:
    """The first callback of ``trainer`` that is a ``kind``, or None."""
    return next((callback for callback in trainer.callbacks if isinstance(callback, kind)), None)


def notify_head_event(trainer: L.Trainer, pl_module: L.LightningModule, event: HeadEvent) -> None:
    """Logs ``event`` on rank zero and calls ``on_head_event`` of every ``HeadEventListener`` of ``trainer``, then
    the LightningModule's own when it is a ``ModuleHeadEventListener`` (``GatedLanguageModel`` is)."""
    rank_zero_info(f"sentinel-lightning: {event.describe()}")
    for callback in trainer.callbacks:
        if isinstance(callback, HeadEventListener):
            callback.on_head_event(trainer, pl_module, event)
    if isinstance(pl_module, ModuleHeadEventListener):
        pl_module.on_head_event(trainer, event)
