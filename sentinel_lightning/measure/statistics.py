"""The head statistics: every head's entropy, gradient importances and mean output, during fit or without a Trainer.

``HeadStatistics`` keeps the estimators (``PerHeadMean`` states, reduced across DDP ranks) that ``HeadMetrics``
fills during fit and ``measure_head_metrics`` fills from calibration batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from sentinel_lightning.gates import find_causal_lm, find_gates
from sentinel_lightning.losses import causal_lm_nll
from sentinel_lightning.measure.attention_entropy import ATTENTION_STATISTICS, EntropyRecording
from sentinel_lightning.measure.head_outputs import ExampleImportance, HeadOutputRecording
from sentinel_lightning.metrics import PerHeadMean


class HeadStatistics(torch.nn.Module):
    """The head metrics' estimators, shared by ``HeadMetrics`` (during fit) and ``measure_head_metrics`` (without).

    - ``entropy``: each head's attention entropy (nats), the mean over real query tokens of the recorded passes;
      ``sink_mass`` and ``rest_entropy`` likewise (``attention_entropy.attention_statistics``).
    - ``grad_norm``: ``|dL/dgate|`` of each step's loss (the importance of Michel et al., 2019), the mean over
      steps. Examples cancel in it: it is the absolute value of the whole batch's gradient.
    - ``example_importance``: the mean over examples of ``|dL_b/dg|`` (Michel et al.'s expectation), ``L_b`` the
      training loss of example ``b`` alone, from the per-example gate gradients of ``HeadOutputRecording``. With a
      loss that is the mean over a step's examples (token-weighted when their token counts differ) example ``b``
      contributes ``dL_b/dg / B`` to the step's gradient, so the sum of those contributions' absolute values is
      the step's mean of ``|dL_b/dg|``; steps are weighted by their examples. Never below ``grad_norm`` on the
      same steps (``|sum| <= sum of |.|``).
    - ``compensated_importance``: the mean over examples of ``|sum_t <dL_b/dx, x - m>|``, the first-order change
      of example ``b``'s loss when the head's gated output ``x`` is replaced by its mean output ``m`` (what
      ``HeadPruning(compensate="mean")`` writes); ``m`` is the running ``output_mean`` including the current pass.
      Weighted like ``example_importance``.
    - ``output_mean``: each head's output ``o[l, h, :]`` before its gate, the mean over every position of the
      recorded passes, ``[L, H, D]`` (what ``HeadPruning(compensate="mean")`` puts in place of a pruned head).

    - ``output_second_moment`` (only after ``enable_output_second_moment()``, for linear compensation): the mean
      of ``o o^T`` over the same positions, ``[L, H, D, H * D]`` (each layer's heads flattened).

    Every state is a sum with ``dist_reduce_fx="sum"``, so ``compute()`` agrees on every DDP rank.

    Args:
        num_layers, num_heads: The gates' grid.
        head_dim: ``D`` of ``output_mean``.
    """

    KEYS = (
        "entropy",
        "sink_mass",
        "rest_entropy",
        "grad_norm",
        "example_importance",
        "compensated_importance",
        "output_mean",
    )

    def __init__(self, num_layers: int, num_heads: int, head_dim: int = 1) -> None:
        super().__init__()
        self.entropy = PerHeadMean(num_layers, num_heads, name="entropy")
        self.sink_mass = PerHeadMean(num_layers, num_heads, name="sink_mass")
        self.rest_entropy = PerHeadMean(num_layers, num_heads, name="rest_entropy")
        self.grad_norm = PerHeadMean(num_layers, num_heads, name="grad_norm")
        self.example_importance = PerHeadMean(num_layers, num_heads, name="example_importance")
        self.compensated_importance = PerHeadMean(num_layers, num_heads, name="compensated_importance")
        self.output_mean = PerHeadMean(num_layers, num_heads, name="output_mean", trailing=(head_dim,))
        self.output_second_moment: PerHeadMean | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """The estimators kept: ``KEYS``, and ``output_second_moment`` once enabled."""
        return self.KEYS if self.output_second_moment is None else (*self.KEYS, "output_second_moment")

    def enable_output_second_moment(self) -> None:
        """Keeps ``output_second_moment`` too (``[L, H, D, H * D]`` in fp64: 80 MB for SmolLM2-135M)."""
        if self.output_second_moment is None:
            num_layers, num_heads, head_dim = self.output_mean.total.shape
            self.output_second_moment = PerHeadMean(
                num_layers, num_heads, name="output_second_moment", trailing=(head_dim, num_heads * head_dim),
                compute_with_cache=False,  # its mean is read once per pruning event: no cached copy
            ).to(self.output_mean.total.device)

    def update_entropy(self, recording: EntropyRecording) -> None:
        """Adds a closed recording's sums ``[L, H]`` (entropy, sink mass, rest entropy), weighted by its real
        query tokens."""
        for name in ATTENTION_STATISTICS:
            getattr(self, name).update(recording.totals[name], recording.tokens)

    def update_gradient(self, gradient: torch.Tensor) -> None:
        """Adds one step's gate gradient ``[L, H]`` (its absolute value)."""
        self.grad_norm.update(gradient.abs())

    def update_outputs(self, recording: HeadOutputRecording) -> None:
        """Adds a stopped recording's head outputs ``[L, H, D]`` summed over its positions, and their products
        ``[L, H * D, H * D]`` when it recorded them and the second moment is kept."""
        if recording.positions:
            self.output_mean.update(recording.output_sums, recording.positions)
            if recording.output_products is not None and self.output_second_moment is not None:
                shape = self.output_second_moment.total.shape
                self.output_second_moment.update(recording.output_products.reshape(shape), recording.positions)

    def update_example_importance(self, importance: ExampleImportance) -> None:
        """Adds one optimizer step's per-example importances (``HeadOutputRecording.take_example_importance``,
        summed over the step's micro-batches, in the units of the step's unscaled loss).

        Each sum over the step's examples of ``|dL/dg[b]|`` ``[L, H]`` is the step's mean of ``|dL_b/dg|`` (the
        loss is a mean over the examples); it is weighted by the step's examples.
        """
        if importance.examples:
            examples = importance.examples
            self.example_importance.update(importance.plain * examples, examples)
            self.compensated_importance.update(importance.compensated * examples, examples)

    def prior_outputs(self) -> tuple[torch.Tensor, float]:
        """This process's output sums ``[L, H, D]`` and positions so far: the prior of the next recording's mean."""
        return self.output_mean.total, float(self.output_mean.weight)

    def update_recording(self, recording: HeadOutputRecording) -> None:
        """Adds a stopped ``HeadOutputRecording`` of one whole optimizer step (outputs and per-example gradients)."""
        self.update_outputs(recording)
        self.update_example_importance(recording.take_example_importance())

    def compute(self, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """``{key: [L, H]}`` for every key of ``keys`` (default: ``self.keys``; ``output_mean``: ``[L, H, D]``),
        NaN where nothing was accumulated; a DDP collective (every rank asks for the same keys)."""
        keys = self.keys if keys is None else tuple(keys)
        unknown = [key for key in keys if key not in self.keys]
        if unknown:
            raise ValueError(f"keys={list(keys)} has {unknown}, not among the statistics kept {list(self.keys)}.")
        return {key: getattr(self, key).compute() for key in keys}

    def skipped(self) -> dict[str, int]:
        """``{name: n}`` for every estimator: non-finite updates left out since the last reset, over every process.

        A DDP collective, like ``compute``: a decision taken right after a divergence can see that its means rest
        on the steps before it only.
        """
        return {key: getattr(self, key).total_skipped() for key in self.keys}

    def reset(self) -> None:
        for key in self.keys:
            getattr(self, key).reset()


def measure_head_metrics(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], second_moment: bool = False
) -> dict[str, torch.Tensor]:
    """Measures every head's entropy, gradient importances and mean output on calibration batches, without a Trainer.

    The same estimators as ``HeadMetrics`` (``HeadStatistics``), each batch standing for one step: one eval-mode
    forward that records the entropy and the heads' outputs, and the gates' gradient of that batch's mean token
    loss (``causal_lm_nll``), per example and for the batch.

    Args:
        model: A gated causal LM (see ``attach_gates``), or a module holding one.
        batches: Dicts with ``input_ids`` ``[batch, seq]`` and optionally ``attention_mask`` and ``labels``.
        second_moment: Also measure ``output_second_moment`` (for linear compensation).

    Returns:
        ``{key: [num_layers, num_heads]}`` for every ``HeadStatistics.KEYS`` but ``output_mean``, which is
        ``[num_layers, num_heads, head_dim]`` (see ``HeadStatistics``).
    """
    gates = find_gates(model)
    if gates is None:
        raise ValueError(f"measure_head_metrics needs a gated model; {type(model).__name__} has no HeadGates.")
    causal_lm = find_causal_lm(model)
    statistics = HeadStatistics(gates.num_layers, gates.num_heads, gates.head_dim)
    if second_moment:
        statistics.enable_output_second_moment()
    learns, was_training = gates.values.requires_grad, causal_lm.training
    gates.values.requires_grad_(True)
    causal_lm.eval()
    try:
        for batch in batches:
            recording_outputs = HeadOutputRecording(causal_lm, *statistics.prior_outputs(), products=second_moment)
            with torch.enable_grad(), recording_outputs as outputs:
                with EntropyRecording(causal_lm) as recording:
                    nll_sum, tokens = causal_lm_nll(causal_lm, batch)
                (gradient,) = torch.autograd.grad(nll_sum / tokens.clamp_min(1), gates.values)
            statistics.update_entropy(recording)
            statistics.update_gradient(gradient)
            statistics.update_recording(outputs)
    finally:
        gates.values.requires_grad_(learns)
        causal_lm.train(was_training)
    return statistics.compute()
