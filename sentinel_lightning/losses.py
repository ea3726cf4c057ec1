"""The one loss contract: next-token negative log-likelihood and distillation KL of causal LMs, one masking rule.

Training, validation, evaluation, calibration and distillation all measure through these functions.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

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
