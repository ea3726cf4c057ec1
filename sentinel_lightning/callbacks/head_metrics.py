"""``HeadMetrics``: accumulates every head's attention entropy, gradient importances and mean output during fit."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from sentinel_lightning.events import HeadEvent, HeadEventListener
from sentinel_lightning.gates import HeadGates, find_causal_lm, find_or_attach_gates
from sentinel_lightning.measure.attention_entropy import EntropyRecording
from sentinel_lightning.measure.head_outputs import ExampleImportance, HeadOutputRecording
from sentinel_lightning.measure.statistics import HeadStatistics
from sentinel_lightning.sharding import require_whole_gates


class HeadMetrics(HeadEventListener):
    """Watches every attention head during fit, on any LightningModule whatever its batch format.

    - ``entropy``: the Shannon entropy (nats) of each head's attention distribution, averaged over real query
      tokens. On one training batch in ``entropy_every_n_steps`` (and on the first batch after a reset) the
      module's own training step runs with an attention function that records it (``EntropyRecording``): eager
      attention instead of the model's fast kernel for that one step, nothing re-run.
    - ``grad_norm``: ``|dL/dgate|`` per optimizer step (the head importance of Michel et al., 2019), read from
      the gates' gradient before each optimizer step and averaged over steps.
    - ``example_importance``: the mean over examples of ``|dL_b/dg|`` (Michel et al.'s expectation, where
      ``grad_norm`` lets examples cancel), from each example's gate gradient; the examples of all micro-batches of
      an optimizer step (gradient accumulation) belong to that step, and an AMP loss scale is divided out.
    - ``compensated_importance``: the mean over examples of the first-order change of each example's loss when a
      head's output is replaced by its mean output (what ``HeadPruning(compensate="mean")`` writes instead of zero),
      from the same per-example gradients; the mean is the running ``output_mean`` of this process.
    - ``output_mean``: each head's output before its gate, averaged over every training position, ``[L, H, D]``
      (what ``HeadPruning(compensate="mean")`` puts in place of a pruned head).

    On request of ``HeadPruning(compensate="linear")`` (``require_output_second_moment``) it also keeps
    ``output_second_moment``, the mean of the products of each layer's head outputs (``[L, H, D, H * D]``), from
    which linear compensation predicts a pruned head from the kept ones.

    The last three come from a ``HeadOutputRecording`` open during every training step (hooks on the output
    projections, from ``on_train_batch_start`` to ``on_train_batch_end``; stopped on an exception too): a sum
    over positions in the forward and one ``[B, H]`` product per layer in the backward, on the device, no host
    synchronisation inside the passes. All of them are ``HeadStatistics``: sums and counts in ``torchmetrics`` states
    reduced across DDP ranks, so ``compute()`` agrees on every rank.

    Args:
        entropy_every_n_steps: Record entropy on one training batch in this many. The recorded step runs eager
            attention; ``scripts/measure_callback_overhead.py`` measures what that adds (docs/overhead.md).
        reset_on_prune: Start accumulating afresh after every pruning event, so that the next decision sees
            the pruned model.
    """

    def __init__(self, entropy_every_n_steps: int = 16, reset_on_prune: bool = True) -> None:
        every = entropy_every_n_steps
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"entropy_every_n_steps={entropy_every_n_steps!r} must be a positive integer.")
        self.entropy_every_n_steps = entropy_every_n_steps
        self.reset_on_prune = reset_on_prune
        self.statistics: HeadStatistics | None = None
        self.batches_seen = 0
        self._gates: HeadGates | None = None
        self._recording: EntropyRecording | None = None
        self._outputs: HeadOutputRecording | None = None
        # Per-example importances of the micro-batches since the last optimizer step (gradient accumulation).
        self._step_importance: ExampleImportance | None = None
        self._pending_state: dict[str, Any] | None = None
        self._second_moment = False
        self._batch_open = False  # between on_train_batch_start and finish_batch

    @property
    def entropy(self):
        """The entropy accumulator (a ``PerHeadMean``), once set up."""
        return None if self.statistics is None else self.statistics.entropy

    @property
    def grad_norm(self):
        """The gradient-importance accumulator (a ``PerHeadMean``), once set up."""
        return None if self.statistics is None else self.statistics.grad_norm

    @property
    def state_key(self) -> str:
        return self._generate_state_key(entropy_every_n_steps=self.entropy_every_n_steps)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._gates = find_or_attach_gates(pl_module)
        # The gates' gradient is the importance signal, whether or not the gates are trained.
        self._gates.values.requires_grad_(True)
        if self.statistics is None:
            self.statistics = HeadStatistics(self._gates.num_layers, self._gates.num_heads, self._gates.head_dim)
        if self._second_moment:
            self.statistics.enable_output_second_moment()
        self.statistics.to(pl_module.device)
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)

    def require_output_second_moment(self) -> None:
        """Keeps ``output_second_moment`` from now on (asked for by ``HeadPruning(compensate="linear")``)."""
        self._second_moment = True
        if self.statistics is not None:
            self.statistics.enable_output_second_moment()

    def compute(self, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """``{key: [L, H]}`` for every key of ``keys`` (default: every ``HeadStatistics.keys``; ``output_mean``:
        ``[L, H, D]``), NaN where empty.

        Reduces across DDP ranks: every rank must call it at the same point, with the same keys.
        """
        return self._require_statistics("compute").compute(keys)

    def output_second_moment(self, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """``{layer: [H, D, H * D]}``: the second moment of the given layers only (on the host), as
        ``compute()["output_second_moment"][layer]``; a DDP collective (every rank asks for the same layers)."""
        moment = self._require_statistics("output_second_moment").output_second_moment
        if moment is None:
            raise RuntimeError("HeadMetrics keeps no output_second_moment: call require_output_second_moment() first.")
        return {layer: moment.compute_layer(layer).cpu() for layer in layers}

    def skipped(self) -> dict[str, int]:
        """``{name: n}`` per estimator: non-finite updates left out of ``compute()``'s means since the last reset,
        over every process; a DDP collective (``HeadStatistics.skipped``)."""
        return self._require_statistics("skipped").skipped()

    def _require_statistics(self, caller: str) -> HeadStatistics:
        if self.statistics is None:
            raise RuntimeError(f"HeadMetrics.{caller}() was called before the callback was set up by a Trainer.")
        return self.statistics

    def reset(self) -> None:
        self.statistics.reset()

    def _entropy_due(self) -> bool:
        """Every n-th batch, and the first batch after a reset so that a decision never lacks entropy."""
        return self.batches_seen % self.entropy_every_n_steps == 0 or self.statistics.entropy.weight == 0

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._entropy_due():
            self._recording = EntropyRecording(find_causal_lm(pl_module)).start()
        products = self.statistics.output_second_moment is not None
        model = find_causal_lm(pl_module)
        self._outputs = HeadOutputRecording(model, *self.statistics.prior_outputs(), products=products).start()
        self._batch_open = True

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self.finish_batch()
        # Epoch-level summaries of this rank's accumulators (per-step logging would repeat stale values).
        for name, metric in (("mean_entropy", self.statistics.entropy), ("mean_grad_norm", self.statistics.grad_norm)):
            if metric.weight > 0:
                pl_module.log(f"head_metrics/{name}", metric.total.mean() / metric.weight, on_step=False, on_epoch=True)

    def finish_batch(self) -> None:
        """Adds the training batch that just ran to the statistics (once; later calls in the batch do nothing).

        ``on_train_batch_end`` calls it; so does ``HeadPruning`` before a decision inside the same hook, so that
        the decision sees this batch whatever the order of the callbacks.
        """
        if not self._batch_open:
            return
        self._batch_open = False
        self.batches_seen += 1
        self._close_outputs()
        recording = self._stop_recording()
        if recording is not None:
            if recording.complete:
                self.statistics.update_entropy(recording)
            else:
                rank_zero_warn(
                    "HeadMetrics: the training step did not run every attention layer of the gated model with a real "
                    f"token (layers run: {recording.recorded.tolist()}); no entropy recorded for this batch."
                )

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._batch_open = False
        self._stop_recording()
        outputs, self._outputs = self._outputs, None
        if outputs is not None:
            outputs.stop()

    def _stop_recording(self) -> EntropyRecording | None:
        recording, self._recording = self._recording, None
        if recording is not None:
            recording.stop()
        return recording

    def _close_outputs(self) -> None:
        """Stops the step's output recording: its outputs join ``output_mean``, and the per-example gradients of
        a micro-batch that no optimizer step took yet wait for the next one (gradient accumulation)."""
        outputs, self._outputs = self._outputs, None
        if outputs is None:
            return
        outputs.stop()
        self.statistics.update_outputs(outputs)
        if outputs.examples:
            self._add_step_importance(outputs.take_example_importance())

    def _add_step_importance(self, importance: ExampleImportance) -> None:
        pending = self._step_importance
        self._step_importance = importance if pending is None else pending + importance

    def _take_step_importance(self, trainer: L.Trainer) -> None:
        """Adds the per-example importance of the optimizer step about to be taken (every micro-batch since the
        last one, the open recording's backward included), the AMP loss scale divided out."""
        outputs = self._outputs
        if outputs is not None and outputs.examples:
            self._add_step_importance(outputs.take_example_importance())
        importance, self._step_importance = self._step_importance, None
        if importance is None:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # the backward ran on the scaled loss
        if scaler is not None and hasattr(scaler, "get_scale"):
            importance = importance.divided(scaler.get_scale())
        self.statistics.update_example_importance(importance)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        require_whole_gates(trainer, self._gates, "HeadMetrics")

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self._take_step_importance(trainer)
        values = self._gates.values
        if values.grad is None:
            return
        self.statistics.update_gradient(values.grad)  # [L, H], the whole (accumulated, unscaled) step's gradient
        optimized = any(p is values for group in optimizer.param_groups for p in group["params"])
        if not optimized:
            values.grad = None  # nobody else will clear it

    @override
    def on_head_event(self, trainer: L.Trainer, pl_module: L.LightningModule, event: HeadEvent) -> None:
        if event.kind == "prune" and self.reset_on_prune:
            self.reset()

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.statistics is None:
            return self._pending_state or {}
        pending = self._step_importance
        return {
            "batches_seen": self.batches_seen,
            **{key: _states(getattr(self.statistics, key)) for key in self.statistics.keys},
            # A checkpoint taken inside an accumulation window keeps the micro-batches already recorded.
            "step_importance": None if pending is None else {
                "plain": pending.plain.clone(), "compensated": pending.compensated.clone(), "examples": pending.examples
            },
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.statistics is None:  # restored before setup: apply once the metrics exist
            self._pending_state = state_dict
            return
        self.batches_seen = state_dict["batches_seen"]
        if "output_second_moment" in state_dict:
            self.require_output_second_moment()
        for key in self.statistics.keys:
            metric = getattr(self.statistics, key)
            # A statistic kept only from this run on (compensate="linear" added on resume) starts empty.
            for name, value in state_dict.get(key, {}).items():
                setattr(metric, name, value.to(metric.total.device))
        pending = state_dict["step_importance"]
        device = self.statistics.grad_norm.total.device
        self._step_importance = None if pending is None else ExampleImportance(
            pending["plain"].to(device), pending["compensated"].to(device), pending["examples"]
        )
        self._pending_state = None


def _states(metric) -> dict[str, Any]:
    """A copy of a ``torchmetrics`` metric's states."""
    return {name: value.clone() for name, value in metric.metric_state.items()}
