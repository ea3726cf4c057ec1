"""The Shannon entropy of every head's attention distribution, recorded inside a model's own forward pass.

Fast attention kernels (SDPA, flash) never materialise the attention probabilities, so while an
``EntropyRecording`` is open the model runs an attention function registered with transformers'
``AttentionInterface`` that computes the eager attention (dropout included, differentiable), records
``-sum_k p log p`` per head and query, and returns the same output. Whoever calls the model (a user's
``training_step`` with any batch format, or ``attention_entropy`` below) is unchanged; the model's own attention
implementation is restored when the recording closes.

Which query positions count is read from the attention mask the model builds itself: a query is a real token
when it may attend to its own position (padding masks its own key), so no batch format needs to be understood.

Notation: B batch, H query heads, K key/value heads, T query positions, S key positions, D head dim, L layers.
"""

from __future__ import annotations

from types import TracebackType

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from sentinel_lightning.standalone.families import attention_modules, head_shape

ENTROPY_ATTENTION = "sentinel_entropy"
RECORDER_ATTRIBUTE = "_sentinel_entropy_recording"  # set on each attention module while a recording is open


def real_queries(attention_mask: torch.Tensor | None, batch: int, num_queries: int, num_keys: int) -> torch.Tensor:
    """Float ``[batch, num_queries]``: 1 where a query is a real token, 0 where it is padding.

    Args:
        attention_mask: The model's 4-D mask ``[B or 1, 1, T, S]``, additive float (0 = attend) or bool
            (True = attend), or None (no padding).
        batch: B. num_queries: T. num_keys: S (the last T keys are the queries' own positions).
    """
    if attention_mask is None:
        return torch.ones(batch, num_queries)
    queries = torch.arange(num_queries, device=attention_mask.device)
    own = attention_mask[:, 0, queries, queries + num_keys - num_queries]  # [B or 1, T]: each query's own key
    allowed = own if own.dtype == torch.bool else own > torch.finfo(own.dtype).min / 2
    return allowed.float().expand(batch, num_queries)


ATTENTION_STATISTICS = ("entropy", "sink_mass", "rest_entropy")


def attention_statistics(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query statistics of attention distributions ``probs`` ``[B, H, T, S]``, each ``[B, H, T]``.

    - ``entropy``: ``-sum_k p log p`` (nats).
    - ``sink_mass``: the probability on the first key (position 0), where many heads park attention they do
      not need.
    - ``rest_entropy``: the entropy of the distribution over the other keys, renormalised (0 for a query that
      sees only the first key).
    """
    rest = probs[..., 1:]  # [B, H, T, S - 1]
    rest = rest / rest.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(rest.dtype).tiny)
    return {
        "entropy": -torch.special.xlogy(probs, probs).sum(dim=-1),
        "sink_mass": probs[..., 0],
        "rest_entropy": -torch.special.xlogy(rest, rest).sum(dim=-1),
    }


class EntropyRecording:
    """Records every head's attention entropy during the forward passes of ``model`` while it is open.

    Each layer records its first forward only (a recomputation under gradient checkpointing is not counted
    twice), so one recording covers one forward pass.

    Attributes:
        totals: Each of ``ATTENTION_STATISTICS`` summed over real query positions, ``[num_layers, num_heads]``.
        tokens: Number of real query positions seen (the same in every layer).
        recorded: Bool ``[num_layers]``: which layers ran while recording.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        num_layers, num_heads, _ = head_shape(model)
        self.model = model
        self.totals = {name: torch.zeros(num_layers, num_heads) for name in ATTENTION_STATISTICS}
        self.tokens = 0
        self.recorded = torch.zeros(num_layers, dtype=torch.bool)
        self._previous_implementation: str | None = None

    @property
    def sums(self) -> torch.Tensor:
        """Entropy (nats) summed over real query positions, ``[num_layers, num_heads]``."""
        return self.totals["entropy"]

    @property
    def complete(self) -> bool:
        """Whether every layer recorded a forward pass with at least one real query."""
        return bool(self.recorded.all()) and self.tokens > 0

    def record(self, layer: int, statistics: dict[str, torch.Tensor], queries: torch.Tensor) -> None:
        """Adds ``statistics`` (each ``[B, H, T]``) of ``layer`` weighted by ``queries`` ``[B, T]`` (1 = real)."""
        if self.recorded[layer]:
            return
        self.recorded[layer] = True
        for name, values in statistics.items():
            with torch.autocast(values.device.type, enabled=False):  # an fp32 sum, also under bf16-mixed
                total = torch.einsum("bhq,bq->h", values.float(), queries.to(values.device, torch.float32))
            self.totals[name][layer] += total.cpu()
        self.tokens = int(queries.sum())

    def start(self) -> EntropyRecording:
        """Switches the model to the recording attention; returns ``self``."""
        self._previous_implementation = self.model.config._attn_implementation
        for layer, attention in enumerate(attention_modules(self.model)):
            setattr(attention, RECORDER_ATTRIBUTE, (self, layer))
        self.model.set_attn_implementation(ENTROPY_ATTENTION)
        return self

    def stop(self) -> None:
        """Gives the model back its own attention implementation."""
        for attention in attention_modules(self.model):
            if hasattr(attention, RECORDER_ATTRIBUTE):
                delattr(attention, RECORDER_ATTRIBUTE)
        self.model.set_attn_implementation(self._previous_implementation)

    def __enter__(self) -> EntropyRecording:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def entropy_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention that records each head's entropy into the module's open ``EntropyRecording``.

    Args:
        module: The attention module (its ``training`` flag decides dropout, as in eager attention).
        query: ``[B, H, T, D]``.
        key, value: ``[B, K, S, D]`` (grouped-query attention repeats them to H heads).
        attention_mask: Additive float mask ``[B, 1, T, S]`` or None.
        scaling: Score scale; None means ``D ** -0.5``.
        dropout: Attention dropout probability.

    Returns:
        The attention output ``[B, T, H, D]`` and the attention probabilities ``[B, H, T, S]``.
    """
    training = module.training
    if not torch.is_grad_enabled():
        return _eager_attention(module, query, key, value, attention_mask, scaling, dropout, training)
    # Recomputed in backward (dropout mask included): autograd keeps no [B, H, T, S] probabilities, only the
    # inputs, and one layer's probabilities exist at a time. The recording counts a layer's first pass only.
    return checkpoint(
        _eager_attention, module, query, key, value, attention_mask, scaling, dropout, training, use_reentrant=False
    )


def _eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager attention of ``entropy_attention_forward``, recording into the module's open recording."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)  # [B, H, S, D]
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling  # [B, H, T, S]
    if attention_mask is not None:
        scores = scores + attention_mask.float()
    probs = scores.softmax(dim=-1)
    recording = getattr(module, RECORDER_ATTRIBUTE, None)
    if recording is not None:
        recorder, layer = recording
        with torch.no_grad():
            queries = real_queries(attention_mask, query.shape[0], *scores.shape[-2:])  # [B, T]
            recorder.record(layer, attention_statistics(probs), queries)
    probs = F.dropout(probs, p=dropout, training=training).to(value.dtype)
    output = torch.matmul(probs, value)  # [B, H, T, D]
    return output.transpose(1, 2).contiguous(), probs


AttentionInterface.register(ENTROPY_ATTENTION, entropy_attention_forward)
AttentionMaskInterface.register(ENTROPY_ATTENTION, eager_mask)


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
    was_training = model.training
    model.eval()
    try:
        with EntropyRecording(model) as recording:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        model.train(was_training)
    return recording.sums, recording.tokens
