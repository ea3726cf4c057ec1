"""``HeadPruning``: prunes attention heads at scheduled epoch ends or optimizer steps, by a strategy on the head
metrics."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from sentinel_lightning.callbacks.divergence import divergence_error
from sentinel_lightning.callbacks.head_metrics import HeadMetrics
from sentinel_lightning.checks import nonfinite_parameters
from sentinel_lightning.events import HeadEvent, PruningAwareModule, find_callback, notify_head_event
from sentinel_lightning.gates import HeadGates, find_causal_lm, find_or_attach_gates
from sentinel_lightning.measure.ablation import unit_ablation
from sentinel_lightning.measure.statistics import HeadStatistics
from sentinel_lightning.reconstruction import linear_compensation
from sentinel_lightning.sharding import require_whole_gates
from sentinel_lightning.standalone.families import family_of
from sentinel_lightning.strategies import (
    Strategy,
    needs_ablation,
    needs_head_metrics,
    prunable_per_layer,
    pruning_step,
    reachable_count,
    resolve_minimum,
    resolve_strategy,
    select_heads,
    uniform_shape,
    unit_size,
)

# Prune after epochs 0, 1 and 2, so that the last epoch of a 4-epoch run fine-tunes the final pruned model.
DEFAULT_SCHEDULE = {0: 0.1, 1: 0.2, 2: 0.3}
# The strategy our own comparison recommends (docs/results.md): gradient beats random and entropy at every level.
DEFAULT_STRATEGY = "gradient"
INTERVALS = ("epoch", "step")
Compensation = Literal["none", "mean", "linear"]
COMPENSATIONS: tuple[Compensation, ...] = ("none", "mean", "linear")
ABLATE_WITH = ("mean", "compensation")


class ScheduleKey(int):
    """The key type of a schedule mapping: an epoch index (from 0) or an optimizer step (from 1); plain ints do.

    Not a bare ``int`` so that the command line (jsonargparse, which would truncate a key 1.5 to 1) hands keys
    over as written, for ``check_schedule`` to refuse by name.
    """


def _check_fraction(target: Any, where: str, name: str = "schedule") -> float:
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0.0 <= float(target) < 1.0:
        raise ValueError(f"{name} {where} has target {target!r}; a target is a fraction of all heads in [0, 1).")
    return float(target)


def _schedule_key(key: Any) -> int | None:
    """``key`` as an int when it is one, or the decimal digits of one (a YAML key saved as a string); else None."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.strip().isdecimal():
        return int(key)
    return None


def check_schedule(schedule: Mapping, interval: str, name: str = "schedule") -> dict[int, float]:
    """Checks a schedule mapping and returns it with int keys (decimal-digit strings, as YAML may hold, converted).

    Keys must be integers (``interval="epoch"``: epoch indices >= 0; ``"step"``: optimizer steps >= 1; a float
    such as 1.5 is refused, never truncated), targets fractions in [0, 1), non-decreasing in key order. ``name``
    is how the messages call the schedule (``--pruning.schedule`` on the command line).
    """
    if not isinstance(schedule, Mapping):
        raise ValueError(f"{name}={schedule!r} must be a mapping of {interval} -> fraction or a callable.")
    first = 0 if interval == "epoch" else 1
    checked: dict[int, float] = {}
    for key, target in schedule.items():
        index = _schedule_key(key)
        if index is None or index < first:
            raise ValueError(
                f"{name}={dict(schedule)!r} has the key {key!r}; with interval={interval!r} every key is an integer "
                f"{interval} index >= {first} (e.g. {{{first}: 0.1, {first + 1}: 0.2}}), not a float or a word."
            )
        if index in checked:
            raise ValueError(f"{name}={dict(schedule)!r} names {interval} {index} twice.")
        checked[index] = _check_fraction(target, f"{interval} {index}", name)
    previous = 0.0
    for index in sorted(checked):
        target = checked[index]
        if target < previous:
            raise ValueError(
                f"{name}={dict(schedule)!r} decreases at {interval} {index} ({target} < {previous}); targets must be "
                "non-decreasing (use HeadReactivation to give heads back)."
            )
        previous = target
    return dict(sorted(checked.items()))


class HeadPruning(L.Callback):
    """Prunes heads at scheduled epoch ends or optimizer steps until a target fraction of all query heads is pruned.

    Pruned gates are exactly 0 and stay 0 (no gradient, optimizer state cleared). Heads go in whole units, scored
    by the mean of their active heads' scores; targets round to what whole units reach (warned when that moves
    them by more than half a head); a protected or non-finite head is never chosen; no decision is taken on a
    non-finite model (``DivergenceError``). How units, scopes, rounding and compensation work: docs/pruning.md.

    Args:
        strategy: A name in ``strategies.STRATEGIES`` (default ``"gradient"``), or a callable mapping the metrics
            (``HeadStatistics.KEYS`` and ``"active"``, each ``[L, H]``) to a score ``[L, H]``, highest pruned first.
        schedule: ``{epoch (or step): fraction of all heads pruned after it}``, non-decreasing in [0, 1), or a
            callable of the index returning a fraction or None; unreachable keys are warned about.
        scope: ``"global"`` (rank every unit together), ``"layer"`` (evenly over the layers) or ``"uniform"``
            (every layer and group the same shape, so that the plain config describes the compacted model; a
            target before the schedule's last may lie between two shapes, the layers with the cheapest units first).
        min_active_heads_per_layer: The fewest active query heads a layer keeps; None: 1 (0 for ``unit="layer"``).
        seed: Seed of the ``"random"`` strategy.
        monitor: Logged metric whose value each pruning event records (and ``HeadReactivation`` compares with).
        unit: ``"head"`` (one query head), ``"group"`` (a key/value head and its ``G`` query heads: shrinks the
            key/value cache) or ``"layer"`` (a whole attention sublayer; ``scope="global"`` only).
        interval: ``"epoch"``: the schedule's keys are epoch indices (from 0), pruned at their end; ``"step"``:
            optimizer steps (from 1), pruned right after them.
        compensate: What a pruned head writes instead of zero: ``"none"``, ``"mean"`` (its mean output,
            ``HeadMetrics.output_mean``) or ``"linear"`` (the least-squares prediction from its layer's kept heads);
            ``compact`` folds either exactly into the output projection. True and False mean ``"mean"`` and ``"none"``.
        calibration_batches: How many of the last training batches (per rank) the ``"ablation"`` strategy
            measures every unit on at a pruning event (``measure.ablation.unit_ablation``: one forward per unit and
            batch); other strategies keep none.
        ablate_with: What the ``"ablation"`` strategy makes a measured unit's heads write: ``"mean"`` (their mean
            output, or zero with ``compensate="none"``) or ``"compensation"`` (what ``compensate`` will make them
            write: with ``"linear"``, the prediction from the layer's other active heads, fitted for each unit).
        fade_steps: 0: a pruned head writes its compensation from the next step on. ``n > 0``: it fades out over
            the next ``n`` optimizer steps, writing ``1 - k / n`` of its own output in the ``k``-th
            (``HeadGates.fading``), so that fine-tuning adapts to its removal gradually; the run must train
            those steps before its model can be compacted.
    """

    def __init__(
        self,
        strategy: str | Strategy = DEFAULT_STRATEGY,
        schedule: dict[ScheduleKey, float] | Callable[[int], float | None] = DEFAULT_SCHEDULE,
        scope: str = "global",
        min_active_heads_per_layer: int | None = None,
        seed: int = 0,
        monitor: str = "val_ppl",
        unit: str = "head",
        interval: str = "epoch",
        compensate: Compensation | bool = "none",
        calibration_batches: int = 1,
        ablate_with: Literal["mean", "compensation"] = "mean",
        fade_steps: int = 0,
    ) -> None:
        if interval not in INTERVALS:
            raise ValueError(f"interval={interval!r} is not one of {INTERVALS}.")
        self.strategy_name = strategy if isinstance(strategy, str) else getattr(strategy, "__name__", "custom")
        self.score = resolve_strategy(strategy, seed)
        if not callable(schedule):
            schedule = check_schedule(schedule, interval)
        self.min_active_heads_per_layer = resolve_minimum(unit, scope, min_active_heads_per_layer)
        self.schedule = schedule
        self.interval = interval
        if isinstance(compensate, bool):
            compensate = "mean" if compensate else "none"
        if compensate not in COMPENSATIONS:
            raise ValueError(f"compensate={compensate!r} must be True, False or one of {COMPENSATIONS}.")
        self.compensate = compensate
        self.scope = scope
        self.unit = unit
        self.group_size = 1  # G, read from the model at setup
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor={monitor!r} must be the name of a logged metric.")
        self.seed = seed
        self.monitor = monitor
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches={calibration_batches!r} must be a positive integer.")
        self.calibration_batches = calibration_batches
        if ablate_with not in ABLATE_WITH:
            raise ValueError(f"ablate_with={ablate_with!r} is not one of {ABLATE_WITH}.")
        self.ablate_with = ablate_with
        if isinstance(fade_steps, bool) or not isinstance(fade_steps, int) or fade_steps < 0:
            raise ValueError(f"fade_steps={fade_steps!r} must be a non-negative integer (0: no fading).")
        self.fade_steps = fade_steps
        self._faded_to_step = 0  # the optimizer step the fading heads' shares were last lowered for
        self._recent_batches: deque[dict[str, torch.Tensor]] = deque(maxlen=calibration_batches)
        self.events: list[HeadEvent] = []
        self._gates: HeadGates | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(strategy=self.strategy_name, scope=self.scope)

    def target_at(self, epoch: int) -> float | None:
        """The scheduled fraction of all heads pruned after ``epoch``, or None when nothing is scheduled then."""
        if callable(self.schedule):
            target = self.schedule(epoch)
            return None if target is None else _check_fraction(target, f"callable at {self.interval} {epoch}")
        return self.schedule.get(epoch)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._gates = gates = find_or_attach_gates(pl_module)
        model = find_causal_lm(pl_module)
        self.group_size = family_of(model).group_size(model.config)
        if self.min_active_heads_per_layer > gates.num_heads:
            raise ValueError(
                f"min_active_heads_per_layer={self.min_active_heads_per_layer} is larger than the {gates.num_heads} "
                "heads per layer of this model."
            )
        if not callable(self.schedule):
            for epoch, target in self.schedule.items():
                self._check_reachable(target, epoch)
        if needs_head_metrics(self.score) and find_callback(trainer, HeadMetrics) is None:
            raise ValueError(
                f"HeadPruning(strategy={self.strategy_name!r}) needs a HeadMetrics callback in the same Trainer (a "
                "callable strategy that reads only metrics['active'] declares needs_head_metrics = False)."
            )
        head_metrics = find_callback(trainer, HeadMetrics)
        if self.compensate != "none" and head_metrics is None:
            raise ValueError(
                f"HeadPruning(compensate={self.compensate!r}) needs a HeadMetrics callback (its output_mean) in the "
                "same Trainer."
            )
        if self.compensate == "linear":
            head_metrics.require_output_second_moment()
            gates.enable_linear_compensation()

    def _final(self, target: float) -> bool:
        """Whether ``target`` is the schedule's last (every target of a callable schedule counts as the last):
        under ``scope="uniform"`` only earlier ones may lie between two uniform shapes."""
        return callable(self.schedule) or target >= self.schedule[max(self.schedule)]

    def _reachable(self, target: float) -> int:
        """The number of pruned query heads nearest ``target`` that whole units (and the scope's shape) reach."""
        gates = self._gates
        goal = target * gates.num_layers * gates.num_heads
        return reachable_count(goal, gates.num_layers, gates.num_heads, self.unit, self.scope, self.group_size,
                               self._final(target))

    def _check_reachable(self, target: float, epoch: int) -> None:
        """Fails when the rounded ``target`` needs more heads than the unit, scope and per-layer minimum allow."""
        gates = self._gates
        total = gates.num_layers * gates.num_heads
        prunable = gates.num_layers * prunable_per_layer(
            gates.num_heads, self.unit, self.scope, self.group_size, self.min_active_heads_per_layer
        )
        reached = self._reachable(target)
        if reached > prunable:
            raise ValueError(
                f"schedule target {target} at {self.interval} {epoch} asks for {reached} of {total} heads, but unit="
                f"{self.unit!r}, scope={self.scope!r} and min_active_heads_per_layer={self.min_active_heads_per_layer} "
                f"leave only {prunable} prunable (at most {prunable / total:.3f}) with G={self.group_size} query "
                "heads per key/value head; lower the target or min_active_heads_per_layer."
            )

    def _warn_if_rounded(self, when: str, target: float, reached: int) -> None:
        """Warns when whole units move ``target`` by more than rounding it to whole heads would."""
        gates = self._gates
        total = gates.num_layers * gates.num_heads
        if abs(reached - target * total) > 0.5 + 1e-9:
            if self.scope == "uniform" and self._final(target):
                step = pruning_step(self.unit, self.scope, gates.num_heads, self.group_size)
                shape = f"{step} heads per layer in every layer"
            else:
                shape = f"units of {unit_size(self.unit, gates.num_heads, self.group_size)} heads"
            rank_zero_warn(
                f"HeadPruning(unit={self.unit!r}, scope={self.scope!r}) at {when}: target {target} "
                f"({target * total:g} of {total} query heads) rounds to {reached / total:.4g} ({reached} heads), the "
                f"nearest that whole steps of {shape} reach."
            )

    def _warn_if_short(self, when: str, target: float, count: int, heads: list[tuple[int, int]]) -> None:
        """Warns when the chosen heads fall short of ``count`` by half a unit or more, or break a uniform shape."""
        gates = self._gates
        if 2 * (count - len(heads)) >= unit_size(self.unit, gates.num_heads, self.group_size):
            rank_zero_warn(
                f"HeadPruning at {when}: the target {target} needs {count} more pruned heads but only "
                f"{len(heads)} had finite scores and were neither protected nor needed for the per-layer minimum "
                f"(unit={self.unit!r}, scope={self.scope!r})."
            )
        if self.scope == "uniform" and self._final(target) and uniform_shape(gates.active, self.group_size) is None:
            rank_zero_warn(
                f"HeadPruning(scope='uniform') at {when}: the pruned model is not uniform (active query heads "
                f"per layer: {gates.active.sum(dim=1).tolist()}): heads given back by HeadReactivation are protected "
                "or more heads are pruned somewhere than the target's uniform shape; a later event evens it out."
            )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        require_whole_gates(trainer, self._gates, "HeadPruning")
        last = self._last_reachable(trainer)
        unreachable = self._scheduled_after(last)
        if unreachable:
            rank_zero_warn(
                f"HeadPruning: the trainer's limits (max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}, "
                f"{trainer.num_training_batches} training batches per epoch, accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}) end the run at {self.interval} {last}, before the scheduled "
                f"{self._describe(unreachable)}; those targets will not be reached. Raise the limits or move the keys."
            )

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reached = self.reached_index(trainer)
        missed = self._scheduled_after(reached)
        if missed:
            rank_zero_warn(
                f"HeadPruning: the run stopped at epoch {trainer.current_epoch}, step {trainer.global_step}, before "
                f"the scheduled {self._describe(missed)}; {self._gates.sparsity:.3f} of the heads are pruned."
            )
        self._warn_if_below_schedule(reached)
        fading = int((self._gates.fading > 0).sum())
        if fading:
            rank_zero_warn(
                f"HeadPruning: the run ended at step {trainer.global_step} with {fading} pruned head(s) still fading "
                f"out (fade_steps={self.fade_steps}); the model is not the pruned one yet, and compact refuses it. "
                "Train longer after the last pruning or lower fade_steps."
            )

    def reached_index(self, trainer: L.Trainer) -> int:
        """The last ``interval`` index the run has reached: the last epoch whose end ran, or ``global_step``."""
        return trainer.current_epoch - 1 if self.interval == "epoch" else trainer.global_step

    def last_target(self, reached: int) -> tuple[int, float, int] | None:
        """The latest schedule entry at or before the ``interval`` index ``reached``: ``(index, target, heads)``,
        ``heads`` the number of query heads that target prunes once rounded to whole units."""
        keys = range(reached + 1) if callable(self.schedule) else [key for key in self.schedule if key <= reached]
        entries = [(key, target) for key in keys if (target := self.target_at(key)) is not None]
        if not entries:
            return None
        key, target = max(entries)
        return key, target, self._reachable(target)

    def _warn_if_below_schedule(self, reached: int) -> None:
        """Warns when the model ends less pruned than the schedule's latest target: heads given back by
        ``HeadReactivation`` that no later schedule entry pruned again, so that the model handed over is not the
        one the schedule describes."""
        entry = self.last_target(reached)
        if entry is None:
            return
        key, target, expected = entry
        pruned = len(self._gates.pruned_heads())
        if pruned < expected:
            total = self._gates.active.numel()
            rank_zero_warn(
                f"HeadPruning: the run ends with {pruned} of {total} query heads pruned, fewer than the {expected} "
                f"of the target {target} scheduled at {self.interval} {key}: heads given back by HeadReactivation "
                "that no later schedule entry pruned again, or too few prunable heads at that event. The model "
                "handed over is that less pruned one; "
                "prune later or make HeadReactivation more patient (patience, tolerance) to keep the target."
            )

    def _scheduled_after(self, last: float) -> dict[int, float]:
        """The schedule's entries after the ``interval`` index ``last`` (none for a callable schedule)."""
        schedule = {} if callable(self.schedule) else self.schedule
        return {key: target for key, target in schedule.items() if key > last}

    def _describe(self, entries: dict[int, float]) -> str:
        return ", ".join(f"{self.interval} {key} (target {target})" for key, target in entries.items())

    def _last_reachable(self, trainer: L.Trainer) -> float:
        """The last epoch index whose end, or the last optimizer step, the trainer's limits let the run reach."""
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else math.inf
        steps = trainer.max_steps if trainer.max_steps >= 0 else math.inf
        batches = trainer.num_training_batches
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else math.inf
        if self.interval == "step":
            return min(steps, epochs * per_epoch if per_epoch > 0 else 0)
        if per_epoch == 0:
            return -1  # no training batch: no epoch runs
        started = math.ceil(steps / per_epoch) if math.isfinite(steps) and math.isfinite(per_epoch) else math.inf
        return min(epochs, started) - 1  # an epoch runs (and ends) when it starts before max_steps

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.interval == "epoch":
            self._prune_to_schedule(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        """Lowers every fading head's share by ``1 / fade_steps`` for each optimizer step begun since the last
        call, so that the ``k``-th step after a pruning trains with ``1 - k / fade_steps`` (0 once it is pruned)."""
        fading = self._gates.fading
        upcoming = trainer.global_step + 1  # the optimizer step this batch contributes to
        if self.fade_steps and upcoming > self._faded_to_step and fading.any():
            fading.sub_((upcoming - self._faded_to_step) / self.fade_steps).clamp_(min=0.0)
            fading[fading < 0.5 / self.fade_steps] = 0.0  # what is left of float steps 1/n summed n times
        self._faded_to_step = max(self._faded_to_step, upcoming)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if needs_ablation(self.score):
            if not (isinstance(batch, Mapping) and "input_ids" in batch):
                raise ValueError(
                    f"HeadPruning(strategy={self.strategy_name!r}) measures the loss on training batches, which "
                    "must be dicts with 'input_ids' (and optionally 'attention_mask', 'labels'); got "
                    f"{type(batch).__name__}."
                )
            self._recent_batches.append({key: value.detach() for key, value in batch.items()
                                         if isinstance(value, torch.Tensor)})
        if self.interval == "step":
            self._prune_to_schedule(trainer, pl_module, trainer.global_step)

    def _check_finite(self, trainer: L.Trainer, pl_module: L.LightningModule, metrics: HeadMetrics | None) -> str:
        """Raises on non-finite weights or gates; returns a note when the head metrics left out updates."""
        broken = nonfinite_parameters(pl_module)
        if broken:
            raise divergence_error(
                trainer, "the model", f"non-finite in {broken[:3]}", "HeadPruning takes no decision on it."
            )
        skipped = {} if metrics is None else {name: n for name, n in metrics.skipped().items() if n}
        if not skipped:
            return ""
        note = f"; the head metrics left out non-finite updates {skipped}"
        rank_zero_warn(f"HeadPruning at step {trainer.global_step}: the decision rests on finite steps only{note[1:]}.")
        return note

    def _prune_to_schedule(self, trainer: L.Trainer, pl_module: L.LightningModule, when: int) -> None:
        """Prunes to the target scheduled at ``when`` (an epoch or a step index, as ``interval`` says)."""
        target = self.target_at(when)
        if target is None:
            return
        epoch = trainer.current_epoch
        gates = self._gates
        total = gates.num_layers * gates.num_heads
        reached = self._reachable(target)
        moment = f"{self.interval} {when}"
        self._warn_if_rounded(moment, target, reached)
        count = reached - (total - gates.num_active)
        if count <= 0:
            return
        head_metrics = find_callback(trainer, HeadMetrics)
        if head_metrics is not None:
            head_metrics.finish_batch()  # this batch counts, whether HeadMetrics comes before or after this callback
        note = self._check_finite(trainer, pl_module, head_metrics)
        metrics = {"active": gates.active.cpu()}
        if head_metrics is not None:
            # The [L, H, D, H * D] second moment is computed below, for the pruned layers only.
            metrics.update({name: value.cpu() for name, value in head_metrics.compute(HeadStatistics.KEYS).items()})
        if needs_ablation(self.score):
            if not self._recent_batches:
                raise ValueError(
                    f"HeadPruning(strategy={self.strategy_name!r}) at {moment}: no training batch was seen to measure "
                    "the units on."
                )
            mean_output = metrics.get("output_mean") if self.compensate != "none" else None
            second_moment = None
            if self.ablate_with == "compensation" and self.compensate == "linear":
                second_moment = head_metrics.output_second_moment(range(gates.num_layers))
            with trainer.precision_plugin.forward_context():  # measured in the precision the model trains in
                metrics["ablation"] = unit_ablation(pl_module, self._recent_batches, self.unit, self.group_size,
                                                    mean_output, second_moment)
        heads = select_heads(
            self.score(metrics), gates.active, count, self.scope, self.min_active_heads_per_layer,
            gates.protected(epoch), self.unit, self.group_size, self._final(target),
        )
        heads = trainer.strategy.broadcast(heads, src=0)  # one decision for every rank
        if heads:
            if isinstance(pl_module, PruningAwareModule):  # the model as it is now, before any gate changes
                pl_module.on_before_prune(trainer, heads)
            compensation = metrics.get("output_mean") if self.compensate != "none" else None
            self.prune(trainer, gates, heads, metrics.get("grad_norm"), compensation)
            if self.fade_steps:
                layers, indices = torch.tensor(heads).T
                gates.fading[layers, indices] = 1.0
                self._faded_to_step = trainer.global_step
            if self.compensate == "linear":
                layers = sorted({layer for layer, _ in heads})
                metrics["output_second_moment"] = head_metrics.output_second_moment(layers)
                self.fit_linear_compensation(gates, metrics, layers)
        self._warn_if_short(moment, target, count, heads)
        if not heads:
            return
        value = trainer.callback_metrics.get(self.monitor)
        event = HeadEvent(
            kind="prune",
            epoch=epoch,
            step=trainer.global_step,
            heads=[tuple(pair) for pair in heads],
            reason=f"{self.strategy_name} strategy ({self.scope}, unit {self.unit}), target {target:.3f} of {total} "
            f"heads at {self.interval} {when}{note}",
            value=None if value is None else float(value),
            sparsity=gates.sparsity,
            monitor=self.monitor,
        )
        self.events.append(event)
        notify_head_event(trainer, pl_module, event)

    @staticmethod
    @torch.no_grad()
    def prune(
        trainer: L.Trainer, gates: HeadGates, heads: list[tuple[int, int]], importance: torch.Tensor | None = None,
        compensation: torch.Tensor | None = None,
    ) -> None:
        """Prunes ``heads`` and clears their gradient and optimizer state so they stay exactly where they were.

        ``importance`` ``[num_layers, num_heads]`` is remembered for the pruned heads (``HeadGates.prune``).
        ``compensation`` ``[num_layers, num_heads, head_dim]`` (each head's mean output) becomes the newly pruned
        heads' ``HeadGates.compensation``, zero where it is not finite (warned); None clears theirs.
        """
        missing = gates.prune(heads, importance, compensation)
        if missing:
            rank_zero_warn(
                f"HeadPruning: no finite mean output for {missing} pruned head(s) to compensate with (nothing recorded "
                "since HeadMetrics' last reset?); they write zero instead."
            )
        pruned = ~gates.active
        if gates.values.grad is not None:
            gates.values.grad[pruned] = 0
        for optimizer in trainer.optimizers:
            for state in optimizer.state.get(gates.values, {}).values():
                if isinstance(state, torch.Tensor) and state.shape == gates.values.shape:
                    state[pruned] = 0

    @staticmethod
    @torch.no_grad()
    def fit_linear_compensation(gates: HeadGates, metrics: Mapping[str, torch.Tensor], layers: list[int]) -> None:
        """Makes every pruned head of ``layers`` write its affine prediction from the layer's active heads.

        ``metrics`` holds ``output_mean`` ``[L, H, D]`` and ``output_second_moment``: ``[L, H, D, H * D]`` (as
        ``HeadMetrics.compute()`` gives it) or ``{layer: [H, D, H * D]}`` of ``layers``
        (``HeadMetrics.output_second_moment``); a layer whose statistics or fit are not finite keeps the mean (warned).
        """
        mean, second_moment = metrics["output_mean"], metrics["output_second_moment"]
        values = torch.where(gates.active, gates.values, gates.values_before_pruning).detach().cpu()
        unusable = []
        for layer in layers:
            if not (torch.isfinite(mean[layer]).all() and torch.isfinite(second_moment[layer]).all()):
                unusable.append(layer)
                continue
            constants, matrix = linear_compensation(
                mean[layer], second_moment[layer], gates.active[layer].cpu(), values[layer]
            )
            if not (torch.isfinite(constants).all() and torch.isfinite(matrix).all()):
                unusable.append(layer)
                continue
            gates.set_linear_compensation(layer, constants, matrix)
        if unusable:
            with_mean = [layer for layer in unusable if torch.isfinite(mean[layer]).all()]
            zero = [layer for layer in unusable if layer not in with_mean]
            rank_zero_warn(
                f"HeadPruning(compensate='linear'): no finite output statistics or fit for layer(s) {unusable}; "
                f"their pruned heads write instead their mean output (layers {with_mean}) or zero where no finite mean "
                f"was recorded either (layers {zero})."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"events": [event.to_dict() for event in self.events], "faded_to_step": self._faded_to_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = [HeadEvent.from_dict(event) for event in state_dict.get("events", [])]
        self._faded_to_step = state_dict.get("faded_to_step", 0)

