"""The Shannon entropy of every head's attention distribution, measured in one forward pass.

Fast attention kernels (SDPA, flash) never materialise the attention probabilities, so the measurement pass
switches the model to an attention function registered with transformers' ``AttentionInterface`` that computes
the eager attention, records ``-sum_k p log p`` per head and query, and returns the same output. The model's
own attention implementation is restored afterwards; training steps keep their fast kernels.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

from sentinel_lightning.gates import attention_modules, head_shape

ENTROPY_ATTENTION = "sentinel_entropy"


class _EntropyRecorder:
    """Sums each head's attention entropy over the non-padding query positions of one forward pass."""

    def __init__(self, model: PreTrainedModel, query_mask: torch.Tensor) -> None:
        num_layers, num_heads, _ = head_shape(model)
        self.layer_of = {id(module): layer for layer, module in enumerate(attention_modules(model))}
        self.query_mask = query_mask.float()  # [batch, seq]
        self.sums = torch.zeros(num_layers, num_heads, device=query_mask.device)  # [L, H]

    def record(self, module: nn.Module, entropy: torch.Tensor) -> None:
        """Adds ``entropy`` ``[batch, heads, seq]`` of ``module``'s layer, weighted by the query mask."""
        layer = self.layer_of[id(module)]
        mask = self.query_mask[:, -entropy.shape[-1] :]  # [batch, seq]
        self.sums[layer] += torch.einsum("bhq,bq->h", entropy, mask)


_recorder: _EntropyRecorder | None = None


def entropy_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Eager attention that records each head's entropy.

    Args:
        query: ``[batch, num_heads, seq, head_dim]``.
        key, value: ``[batch, num_kv_heads, kv_seq, head_dim]`` (grouped-query attention repeats them).
        attention_mask: Additive float mask ``[batch, 1, seq, kv_seq]`` or None.

    Returns:
        The attention output ``[batch, seq, num_heads, head_dim]`` and None for the weights.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling  # [B, H, T, S]
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]].float()
    probs = scores.softmax(dim=-1)
    if _recorder is not None:
        _recorder.record(module, -torch.special.xlogy(probs, probs).sum(dim=-1))  # [B, H, T]
    output = torch.matmul(probs.to(value.dtype), value)  # [B, H, T, D]
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(ENTROPY_ATTENTION, entropy_attention_forward)
AttentionMaskInterface.register(ENTROPY_ATTENTION, eager_mask)
assert ENTROPY_ATTENTION in ALL_MASK_ATTENTION_FUNCTIONS


@torch.no_grad()
def attention_entropy(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Measures every head's attention entropy on one batch, in eval mode and without gradients.

    Args:
        model: A causal LM of a supported family (gated or not).
        input_ids: ``[batch, seq]``.
        attention_mask: ``[batch, seq]``, 1 for tokens and 0 for padding; None means no padding.

    Returns:
        The entropy summed over non-padding query positions, ``[num_layers, num_heads]`` (nats), and the
        number of those positions. Their ratio is the mean entropy per head.
    """
    global _recorder
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    previous_implementation = model.config._attn_implementation
    was_training = model.training
    _recorder = _EntropyRecorder(model, attention_mask)
    try:
        model.set_attn_implementation(ENTROPY_ATTENTION)
        model.eval()
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return _recorder.sums, int(attention_mask.sum())
    finally:
        _recorder = None
        model.set_attn_implementation(previous_implementation)
        model.train(was_training)
