"""``HeadReactivation``: gives pruned heads back when validation perplexity regresses after pruning."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from sentinel_lightning.callbacks.divergence import check_finite_metric, divergence_error
from sentinel_lightning.checks import nonfinite_parameters
from sentinel_lightning.events import HeadEvent, HeadEventListener, notify_head_event
from sentinel_lightning.gates import HeadGates, find_or_attach_gates

CHOICES = ("last", "importance")


class HeadReactivation(HeadEventListener):
    """After each validation, compares the monitored perplexity with its value before the latest pruning event.

    When it is worse by more than ``tolerance`` (relative) for ``patience`` validations in a row, it reactivates
    ``fraction`` of the candidate heads: the heads of the latest pruning event (``"last"``) or every pruned head
    ranked by the gradient importance it had when pruned (``"importance"``, read from
    ``HeadGates.importance_at_pruning``). A reactivated gate gets back the value it had before pruning, and the
    head is protected (``HeadGates.protect``) from pruning at the end of the current epoch and of the next
    ``cooldown`` epochs; the pruning schedule meets its target with other heads. The reference value is the
    monitored metric when the pruning event happened, as the pruning callback recorded it.

    ``monitor`` is checked before training starts: after the sanity check, or after a validation the same trainer
    ran before ``fit`` (as the command line does); when neither would run, a one-batch sanity check is run for it.
    No decision is ever taken on a non-finite model: a non-finite ``monitor`` or gate value stops the run with a
    ``DivergenceError`` saying when.

    Args:
        monitor: Metric logged by validation to watch (lower is better), e.g. ``"val_ppl"``.
        tolerance: Allowed relative regression, e.g. 0.05 for 5%.
        patience: Consecutive regressed validations before reactivating.
        reactivate: ``"last"`` or ``"importance"``.
        fraction: Share of the candidates to reactivate, in (0, 1].
        cooldown: Epochs after the current one during which a reactivated head cannot be pruned.
    """

    def __init__(
        self,
        monitor: str = "val_ppl",
        tolerance: float = 0.05,
        patience: int = 1,
        reactivate: str = "last",
        fraction: float = 1.0,
        cooldown: int = 1,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor={monitor!r} must be the name of a logged metric.")
        if not tolerance >= 0 or not math.isfinite(tolerance):
            raise ValueError(f"tolerance={tolerance!r} must be a finite number >= 0 (a relative regression).")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience={patience!r} must be a positive integer.")
        if reactivate not in CHOICES:
            raise ValueError(f"reactivate={reactivate!r} is not one of {CHOICES}.")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction={fraction!r} must lie in (0, 1].")
        if not isinstance(cooldown, int) or cooldown < 0:
            raise ValueError(f"cooldown={cooldown!r} must be a non-negative integer.")
        self.monitor = monitor
        self.tolerance = tolerance
        self.patience = patience
        self.reactivate = reactivate
        self.fraction = fraction
        self.cooldown = cooldown
        self.reference: float | None = None
        self.wait_count = 0
        self.last_pruned: list[tuple[int, int]] = []
        self.events: list[HeadEvent] = []
        self._gates: HeadGates | None = None
        self._monitor_seen = False
        self._sanity_steps: int | None = None  # the trainer's own setting while a one-batch sanity check runs

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._gates = find_or_attach_gates(pl_module)

    @override
    def on_head_event(self, trainer: L.Trainer, pl_module: L.LightningModule, event: HeadEvent) -> None:
        if event.kind != "prune":
            return
        value = event.value if event.monitor == self.monitor else trainer.callback_metrics.get(self.monitor)
        self.reference = None if value is None or not math.isfinite(float(value)) else float(value)
        self.last_pruned = list(event.heads)
        self.wait_count = 0

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Makes sure a validation runs before training when nothing else would check ``monitor`` before it."""
        if self._monitor_seen or trainer.num_sanity_val_steps != 0 or not trainer.enable_validation:
            return
        self._sanity_steps, trainer.num_sanity_val_steps = trainer.num_sanity_val_steps, 1
        rank_zero_info(f"HeadReactivation: a one-batch sanity check checks that {self.monitor!r} is logged.")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sanity_steps(trainer)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sanity_steps(trainer)

    def _restore_sanity_steps(self, trainer: L.Trainer) -> None:
        if self._sanity_steps is not None:
            trainer.num_sanity_val_steps, self._sanity_steps = self._sanity_steps, None

    def _check_monitor_logged(self, trainer: L.Trainer) -> None:
        if self.monitor not in trainer.callback_metrics:
            raise RuntimeError(
                f"HeadReactivation(monitor={self.monitor!r}) found no such metric after validation; the logged "
                f"metrics are {sorted(trainer.callback_metrics)}."
            )
        self._monitor_seen = True

    def _check_finite(self, trainer: L.Trainer) -> float:
        """The monitored value; raises a ``DivergenceError`` when it or a gate is non-finite."""
        hint = "HeadReactivation takes no decision on a non-finite model."
        check_finite_metric(trainer, self.monitor, trainer.callback_metrics[self.monitor], hint)
        if nonfinite_parameters(self._gates):
            raise divergence_error(trainer, "a gate value", "non-finite", hint)
        return float(trainer.callback_metrics[self.monitor])

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_monitor_logged(trainer)
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        current = self._check_finite(trainer)
        if self.reference is None:
            return
        regressed = current > self.reference * (1.0 + self.tolerance)
        regressed = trainer.strategy.reduce_boolean_decision(regressed, all=True)
        self.wait_count = self.wait_count + 1 if regressed else 0
        if self.wait_count < self.patience:
            return
        heads = self._candidates()
        if heads:
            self._reactivate(trainer, pl_module, heads[: math.ceil(self.fraction * len(heads))], current)
        self.wait_count = 0

    def _candidates(self) -> list[tuple[int, int]]:
        """The pruned heads to consider, most deserving first: none of a layer whose key/value heads were merged
        since (``KeyValueMerging``), which would no longer split into equal groups."""
        merged = self._gates.merged_layers().tolist()
        pruned = {pair for pair in self._gates.pruned_heads() if not merged[pair[0]]}
        if self.reactivate == "last":
            return [pair for pair in self.last_pruned if pair in pruned]
        importance = self._gates.importance_at_pruning.cpu()  # [L, H], NaN where unknown
        importance = torch.where(torch.isfinite(importance), importance, -math.inf)
        return sorted(pruned, key=lambda pair: (-importance[pair].item(), pair))

    def _reactivate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, heads: list[tuple[int, int]], current: float
    ) -> None:
        self._gates.reactivate(heads)
        self._gates.protect(heads, until_epoch=trainer.current_epoch + self.cooldown)
        event = HeadEvent(
            kind="reactivate",
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            heads=list(heads),
            reason=(
                f"{self.monitor} {current:.4g} > {self.reference:.4g} x (1 + {self.tolerance}) for {self.patience} "
                f"validation(s); reactivating {self.reactivate!r} heads"
            ),
            value=current,
            sparsity=self._gates.sparsity,
            monitor=self.monitor,
        )
        self.events.append(event)
        notify_head_event(trainer, pl_module, event)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "wait_count": self.wait_count,
            "last_pruned": [list(pair) for pair in self.last_pruned],
            "events": [event.to_dict() for event in self.events],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict["reference"]
        self.wait_count = state_dict["wait_count"]
        self.last_pruned = [tuple(pair) for pair in state_dict["last_pruned"]]
        self.events = [HeadEvent.from_dict(event) for event in state_dict["events"]]
