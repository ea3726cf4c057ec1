"""``DivergenceGuard``: a run whose loss, monitored metric or weights become NaN or infinite never ends silently.

By default it stops the run with a ``DivergenceError`` that says what diverged, at which epoch and step, with which
value, and which checkpoints were written before it. With ``on_nonfinite="skip"`` it skips instead every optimizer
step whose loss or gradients are non-finite (the weights stay as they were), warning each time; a non-finite
monitored metric or non-finite weights still stop the run, since skipping cannot undo them.

It works in any LightningModule: it reads the loss given to ``backward`` and the metrics logged by validation. Under
DDP every rank takes the same decision (``reduce_boolean_decision``), so no rank is left waiting for the others.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from sentinel_lightning.checks import describe_nonfinite, nonfinite_parameters

ACTIONS = ("raise", "skip")


class DivergenceError(RuntimeError):
    """Training diverged: a loss, a monitored metric or the weights became NaN or infinite."""


def _checkpoints(trainer: L.Trainer) -> str:
    """Where the checkpoints written so far are, in words."""
    paths = []
    for callback in trainer.checkpoint_callbacks:
        for kind, path in (("last", callback.last_model_path), (f"best {callback.monitor}", callback.best_model_path)):
            if path and path not in [known for _, known in paths]:
                paths.append((kind, path))
    if not paths:
        return "No checkpoint was written before it."
    return "Checkpoints written before it: " + "; ".join(f"{path} ({kind})" for kind, path in paths) + "."


def divergence_error(trainer: L.Trainer, what: str, value: Any, hint: str = "") -> DivergenceError:
    """A ``DivergenceError`` saying that ``what`` is ``value`` at the trainer's epoch and step, and where the
    checkpoints written before it are.

    Args:
        trainer: The trainer of the run.
        what: What diverged, e.g. ``"the training loss"`` or ``"val_ppl"``.
        value: Its value (a number, or a description such as the names of non-finite tensors).
        hint: What the user can do, appended to the message.
    """
    message = (
        f"Training diverged: {what} is {value} at epoch {trainer.current_epoch}, step {trainer.global_step}. "
        f"{_checkpoints(trainer)}"
    )
    return DivergenceError(f"{message} {hint}".strip())


def check_finite_metric(trainer: L.Trainer, name: str, value: Any, hint: str = "") -> None:
    """Raises a ``DivergenceError`` when the logged metric ``name`` has a NaN or infinite ``value``."""
    if not math.isfinite(float(value)):
        raise divergence_error(trainer, name, float(value), hint)


class DivergenceGuard(L.Callback):
    """Stops (or, on request, skips the steps of) a run whose loss, monitored metric or weights become non-finite.

    - The loss given to ``backward``: checked at every step, before the backward pass, so that with the default
      ``"raise"`` the weights are never updated with it.
    - ``monitor``: checked after every validation of ``fit`` (the sanity check included), together with every
      parameter of the module, before any pruning decision or checkpoint of that epoch.

    Args:
        monitor: A metric logged by validation to check (e.g. ``"val_ppl"``), or None to check the loss and the
            weights only. When validation never logs it, a warning says so once.
        on_nonfinite: ``"raise"`` stops the run with a ``DivergenceError`` at the first non-finite loss;
            ``"skip"`` skips every optimizer step whose loss or gradients are non-finite (its gradients are
            dropped, so the optimizer leaves the weights as they were) and warns; ``skipped_steps`` counts them.
    """

    def __init__(self, monitor: str | None = "val_ppl", on_nonfinite: str = "raise") -> None:
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"monitor={monitor!r} must be the name of a metric logged by validation, or None.")
        if on_nonfinite not in ACTIONS:
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is not one of {ACTIONS}.")
        self.monitor = monitor
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self._bad_loss = False
        self._warned_missing = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(not finite, all=False):
            return
        if self.on_nonfinite == "skip":
            self._bad_loss = True
            return
        value = float(loss.detach()) if loss.numel() == 1 else "non-finite"
        shown = "non-finite on another process" if finite else value
        hint = (
            "Lower the learning rate, or pass DivergenceGuard(on_nonfinite='skip') "
            "(--divergence.on_nonfinite skip) to skip the steps whose loss or gradients are non-finite."
        )
        raise divergence_error(trainer, "the training loss", shown, hint)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.on_nonfinite != "skip":
            return
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = self._bad_loss or not all(bool(torch.isfinite(p.grad).all()) for p in parameters)
        self._bad_loss = False
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        for parameter in parameters:
            parameter.grad = None  # optimizers leave a parameter without gradient as it is
        self.skipped_steps += 1
        rank_zero_warn(
            f"DivergenceGuard: skipped the optimizer step at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}: its loss or gradients are non-finite ({self.skipped_steps} skipped so far)."
        )

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit":
            return
        hint = "Lower the learning rate; the run stops here so that no decision or checkpoint rests on it."
        if self.monitor is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                check_finite_metric(trainer, self.monitor, value, hint)
            elif not self._warned_missing:
                self._warned_missing = True
                rank_zero_warn(
                    f"DivergenceGuard(monitor={self.monitor!r}): validation logged no such metric (it logged "
                    f"{sorted(trainer.callback_metrics)}); only the loss and the weights are checked."
                )
        names = nonfinite_parameters(pl_module)
        if names:
            raise divergence_error(trainer, "the model", describe_nonfinite(names), hint)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)
