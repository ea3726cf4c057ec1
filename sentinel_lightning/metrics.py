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

from sentinel_lightning.attention_entropy import ATTENTION_STATISTICS, EntropyRecording
from sentinel_lightning.gates import find_causal_lm, find_gates
from sentinel_lightning.head_outputs import ExampleImportance, HeadOutputRecording

IGNORE_INDEX = -100


def _all_reduce_sum(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """The sum of ``tensor`` over every process, as the one-element list torchmetrics' ``dist_sync_fn`` returns
    (it stacks the list and applies the state's ``"sum"`` reduction): one copy of the state, not one per rank."""
    reduced = tensor.clone()
    torch.distributed.all_reduce(reduced, group=group)
    return [reduced]


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


def causal_lm_inputs(
    batch: Mapping[str, torch.Tensor], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The one masking rule: a position is not predicted when its label is -100 or its ``attention_mask`` is 0.

    Args:
        batch: ``input_ids`` ``[batch, seq]``, optionally ``attention_mask`` ``[batch, seq]`` (1 = token) and
            ``labels`` ``[batch, seq]`` (default: ``input_ids``).
        device: Where the returned tensors live.

    Returns:
        ``input_ids`` ``[batch, seq]``, ``attention_mask`` ``[batch, seq]`` (or None) and the masked ``labels``
        ``[batch, seq]`` (-100 wherever the position is not predicted).
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(
            "batch must be a dict with 'input_ids' (and optionally 'attention_mask', 'labels'); got "
            f"{type(batch).__name__}."
        )
    input_ids = batch["input_ids"].to(device)
    labels = batch.get("labels", input_ids).to(device)
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return input_ids, attention_mask, labels


def causal_lm_logits(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of ``model`` on ``batch`` under the one masking rule (``causal_lm_inputs``).

    Args:
        model: A Hugging Face causal LM (gated or not); the batch is moved to its device.
        batch: As for ``causal_lm_inputs``.

    Returns:
        The logits ``[batch, seq, vocab]`` (differentiable) and the masked labels ``[batch, seq]``.
    """
    input_ids, attention_mask, labels = causal_lm_inputs(batch, next(model.parameters()).device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits, labels


def causal_lm_nll(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The one measurement contract: summed next-token NLL of a batch and the number of tokens it predicts.

    One masking rule everywhere (training, validation, evaluation, calibration, distillation): a position is not
    predicted when its label is -100 or its ``attention_mask`` is 0 (padding); see ``causal_lm_inputs``.

    Args:
        model: A Hugging Face causal LM (gated or not); the batch is moved to its device.
        batch: ``input_ids`` ``[batch, seq]``, optionally ``attention_mask`` ``[batch, seq]`` (1 = token) and
            ``labels`` ``[batch, seq]`` (default: ``input_ids``).

    Returns:
        The summed loss (a scalar, fp32, differentiable) and the count of predicted tokens (a scalar).
    """
    return causal_lm_token_losses(*causal_lm_logits(model, batch))


def causal_lm_token_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed ``KL(teacher_T || student_T)`` over the predicted tokens and their number (as ``causal_lm_token_losses``).

    ``p_T = softmax(logits / T)``; the KL is taken at each position whose next token is predicted (its shifted
    label is not -100), exactly the positions the cross-entropy counts.

    Args:
        student_logits: ``[batch, seq, vocab]`` (differentiable).
        teacher_logits: ``[batch, seq, vocab]``.
        labels: ``[batch, seq]`` masked labels (``causal_lm_inputs``); -100 marks positions not predicted.
        temperature: ``T`` > 0.

    Returns:
        The summed KL (a scalar, fp32, in nats, unscaled by ``T``) and the count of predicted tokens (a scalar).
    """
    predicted = labels[:, 1:] != IGNORE_INDEX  # [batch, seq - 1]
    student = F.log_softmax(student_logits[:, :-1][predicted].float() / temperature, dim=-1)  # [tokens, vocab]
    teacher = F.log_softmax(teacher_logits[:, :-1][predicted].float() / temperature, dim=-1)  # [tokens, vocab]
    return F.kl_div(student, teacher, log_target=True, reduction="sum"), predicted.sum()


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
    """The mean of a per-head quantity ``[num_layers, num_heads, *trailing]`` over weighted updates (steps, tokens,
    examples or positions).

    A non-finite update is left out of the mean, counted in ``skipped`` and warned about (on rank zero, at the
    first one since the last reset), so that it never drives a decision unseen: ``total_skipped()`` gives the
    count over every process for the code that decides.

    Args:
        num_layers, num_heads: The grid.
        name: What the mean is of, for the warnings (e.g. ``"grad_norm"``).
        trailing: Further dimensions of the quantity per head (e.g. ``(D,)`` for a head's output vector).
    """

    full_state_update = False

    def __init__(
        self, num_layers: int, num_heads: int, name: str = "per-head mean", trailing: tuple[int, ...] = (), **kwargs
    ) -> None:
        # Ranks are summed by one all_reduce, not torchmetrics' all_gather (world-size copies of every state).
        super().__init__(**{"dist_sync_fn": _all_reduce_sum, **kwargs})
        self.name = name
        self.state_shape = (num_layers, num_heads, *trailing)
        # The default to reset to is one zero, not a full copy of the state (``reset`` makes it full again).
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("skipped", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.total = torch.zeros(self.state_shape, dtype=torch.float64)

    def reset(self) -> None:
        """Every state back to zero, ``total`` at its full shape ``[num_layers, num_heads, *trailing]``."""
        super().reset()
        self.total = self.total.new_zeros(self.state_shape)

    def update(self, total: torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        """Adds ``total`` ``[num_layers, num_heads, *trailing]``, the sum over ``weight`` units (steps, tokens...)."""
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
        """The mean ``[num_layers, num_heads, *trailing]``; NaN where nothing was accumulated yet."""
        if self.weight == 0:
            return torch.full_like(self.total, float("nan")).float()
        return (self.total / self.weight).float()

    def compute_layer(self, layer: int) -> torch.Tensor:
        """The mean of one layer, ``[num_heads, *trailing]`` (as ``compute()[layer]``), summed over every process
        without the other layers: a DDP collective that costs one layer's state."""
        total, weight = self.total[layer].clone(), self.weight.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(weight)
        if weight == 0:
            return torch.full_like(total, float("nan")).float()
        return (total / weight).float()


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
