"""``HeadPruning``: prunes attention heads at scheduled epoch ends, by a strategy on the head metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from sentinel_lightning.callbacks.head_metrics import HeadMetrics
from sentinel_lightning.events import HeadEvent, find_callback, notify_head_event
from sentinel_lightning.gates import HeadGates, find_or_attach_gates
from sentinel_lightning.strategies import SCOPES, Strategy, resolve_strategy, select_heads

Schedule = Mapping[int, float] | Callable[[int], float | None]
# Prune after epochs 0, 1 and 2, so that the last epoch of a 4-epoch run fine-tunes the final pruned model.
DEFAULT_SCHEDULE = {0: 0.1, 1: 0.2, 2: 0.3}
# The strategy our own comparison recommends (docs/results.md): gradient beats random and entropy at every level.
DEFAULT_STRATEGY = "gradient"
METRIC_STRATEGIES = ("entropy", "gradient")


def _check_fraction(target: Any, where: str) -> float:
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0.0 <= float(target) < 1.0:
        raise ValueError(f"schedule {where} has target {target!r}; a target is a fraction of all heads in [0, 1).")
    return float(target)


class HeadPruning(L.Callback):
    """Prunes heads at the end of scheduled training epochs until a target fraction of all heads is pruned.

    Pruned gates are exactly 0 and stay 0: the effective gate is ``values * active``, so a pruned head's gate
    gets no gradient, and its optimizer state (e.g. AdamW's moments) is cleared when it is pruned.

    Args:
        strategy: ``"entropy"`` (highest entropy first), ``"gradient"`` (lowest ``|dL/dgate|`` first),
            ``"random"`` (seeded, identical on every rank), or a callable mapping the metrics
            ``{"entropy", "grad_norm", "active": [L, H]}`` to a score ``[L, H]`` (highest pruned first).
        schedule: Maps a training epoch index (Lightning's ``current_epoch``, from 0) to the fraction of all heads
            pruned after it, non-decreasing, each in [0, 1); or a callable of the epoch index returning the
            fraction, or None for no pruning after that epoch. An empty mapping never prunes.
        scope: ``"global"`` ranks every head together; ``"layer"`` spreads the pruning evenly over the layers.
        min_active_heads_per_layer: No layer keeps fewer active heads.
        seed: Seed of the ``"random"`` strategy.
        monitor: Logged metric whose value each pruning event records (and ``HeadReactivation`` compares with).

    Heads protected by ``HeadReactivation`` (``HeadGates.protected``) are never chosen; the importance each pruned
    head had is remembered in ``HeadGates.importance_at_pruning``. Both live in the gates, so checkpoints carry them.
    """

    def __init__(
        self,
        strategy: str | Strategy = DEFAULT_STRATEGY,
        schedule: dict[int, float] | Callable[[int], float | None] = DEFAULT_SCHEDULE,
        scope: str = "global",
        min_active_heads_per_layer: int = 1,
        seed: int = 0,
        monitor: str = "val_ppl",
    ) -> None:
        self.strategy_name = strategy if isinstance(strategy, str) else getattr(strategy, "__name__", "custom")
        self.score = resolve_strategy(strategy, seed)
        if not callable(schedule):
            if not isinstance(schedule, Mapping):
                raise ValueError(f"schedule={schedule!r} must be a mapping of epoch -> fraction or a callable.")
            previous = 0.0
            for epoch in sorted(schedule):
                if not isinstance(epoch, int) or epoch < 0:
                    raise ValueError(f"schedule has epoch {epoch!r}; epochs are non-negative integers.")
                target = _check_fraction(schedule[epoch], f"epoch {epoch}")
                if target < previous:
                    raise ValueError(
                        f"schedule={dict(schedule)} decreases at epoch {epoch} ({target} < {previous}); targets must be "
                        "non-decreasing (use HeadReactivation to give heads back)."
                    )
                previous = target
            schedule = dict(schedule)
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} is not one of {SCOPES}.")
        if not isinstance(min_active_heads_per_layer, int) or min_active_heads_per_layer < 0:
            raise ValueError(f"min_active_heads_per_layer={min_active_heads_per_layer!r} must be a non-negative integer.")
        self.schedule = schedule
        self.scope = scope
        self.min_active_heads_per_layer = min_active_heads_per_layer
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor={monitor!r} must be the name of a logged metric.")
        self.seed = seed
        self.monitor = monitor
        self.events: list[HeadEvent] = []
        self._gates: HeadGates | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(strategy=self.strategy_name, scope=self.scope)

    def target_at(self, epoch: int) -> float | None:
        """The scheduled fraction of all heads pruned after ``epoch``, or None when nothing is scheduled then."""
        if callable(self.schedule):
            target = self.schedule(epoch)
            return None if target is None else _check_fraction(target, f"callable at epoch {epoch}")
        return self.schedule.get(epoch)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._gates = gates = find_or_attach_gates(pl_module)
        if self.min_active_heads_per_layer > gates.num_heads:
            raise ValueError(
                f"min_active_heads_per_layer={self.min_active_heads_per_layer} is larger than the {gates.num_heads} "
                "heads per layer of this model."
            )
        prunable = gates.num_layers * (gates.num_heads - self.min_active_heads_per_layer)
        total = gates.num_layers * gates.num_heads
        if not callable(self.schedule):
            for epoch, target in self.schedule.items():
                if round(target * total) > prunable:
                    raise ValueError(
                        f"schedule target {target} at epoch {epoch} asks for {round(target * total)} of {total} heads, "
                        f"but min_active_heads_per_layer={self.min_active_heads_per_layer} leaves only {prunable} "
                        f"prunable (at most {prunable / total:.3f})."
                    )
        if self.strategy_name in METRIC_STRATEGIES and find_callback(trainer, HeadMetrics) is None:
            raise ValueError(
                f"HeadPruning(strategy={self.strategy_name!r}) needs a HeadMetrics callback in the same Trainer."
            )

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        target = self.target_at(epoch)
        if target is None:
            return
        gates = self._gates
        total = gates.num_layers * gates.num_heads
        count = round(target * total) - (total - gates.num_active)
        if count <= 0:
            return
        head_metrics = find_callback(trainer, HeadMetrics)
        metrics = {"active": gates.active.cpu()}
        if head_metrics is not None:
            metrics.update({name: value.cpu() for name, value in head_metrics.compute().items()})
        scores = self.score(metrics)
        protected = gates.protected(epoch)
        heads = select_heads(scores, gates.active, count, self.scope, self.min_active_heads_per_layer, protected)
        heads = trainer.strategy.broadcast(heads, src=0)  # one decision for every rank
        if len(heads) < count:
            rank_zero_warn(
                f"HeadPruning at epoch {epoch}: the target {target} needs {count} more pruned heads but only "
                f"{len(heads)} had finite scores and were neither protected nor needed for the per-layer minimum."
            )
        if not heads:
            return
        self.prune(trainer, gates, heads, metrics.get("grad_norm"))
        value = trainer.callback_metrics.get(self.monitor)
        event = HeadEvent(
            kind="prune",
            epoch=epoch,
            step=trainer.global_step,
            heads=[tuple(pair) for pair in heads],
            reason=f"{self.strategy_name} strategy ({self.scope}), target {target:.3f} of {total} heads",
            value=None if value is None else float(value),
            sparsity=gates.sparsity,
            monitor=self.monitor,
        )
        self.events.append(event)
        notify_head_event(trainer, pl_module, event)

    @staticmethod
    @torch.no_grad()
    def prune(
        trainer: L.Trainer, gates: HeadGates, heads: list[tuple[int, int]], importance: torch.Tensor | None = None
    ) -> None:
        """Prunes ``heads`` and clears their gradient and optimizer state so they stay exactly where they were.

        ``importance`` ``[num_layers, num_heads]`` is remembered for the pruned heads (``HeadGates.prune``).
        """
        gates.prune(heads, importance)
        pruned = ~gates.active
        if gates.values.grad is not None:
            gates.values.grad[pruned] = 0
        for optimizer in trainer.optimizers:
            for name, state in optimizer.state.get(gates.values, {}).items():
                if isinstance(state, torch.Tensor) and state.shape == gates.values.shape:
                    state[pruned] = 0

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"events": [event.to_dict() for event in self.events]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = [HeadEvent.from_dict(event) for event in state_dict.get("events", [])]
