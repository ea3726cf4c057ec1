"""Second moments of every layer's queries, keys and values on calibration batches: what a fitted key/value merge
(``merging.fit_merged_layer``) needs to know about what the heads compute.

Keys are moments per rotary pair: the rotary embedding turns the pair ``(j, j + D/2)`` of every head by the same
angle at a position, so a key pair is one complex number ``z = k_j + i k_{j + D/2}`` and products ``z_g conj(z_g')``
of two heads are the same before and after the rotation. The projections' outputs are recomputed from their inputs,
so that the moments are those of the original heads also while a layer's heads read a mix of them.

Shapes per layer (notation of ``families.py``; ``P = D / 2`` rotary pairs): ``query_power`` ``[H, P]``,
``key_moments`` ``[P, K, K]`` (complex), ``value_moments`` ``[K * D, K * D]``; every one a mean over the predicted
tokens (padding excluded), float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sentinel_lightning.gates import find_causal_lm, find_gates
from sentinel_lightning.standalone.families import family_of


@dataclass
class KeyValueStatistics:
    """Per layer ``l``: ``query_power[l]`` ``[H, P]`` (``E|q_hj|^2``), ``key_moments[l]`` ``[P, K, K]``
    (``E[z_gj conj(z_g'j)]``) and ``value_moments[l]`` ``[K * D, K * D]`` (``E[v v^T]``), over ``tokens`` tokens."""

    query_power: torch.Tensor
    key_moments: torch.Tensor
    value_moments: torch.Tensor
    tokens: int


def as_pairs(features: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[..., D / 2]`` complex: the rotary pairs ``(j, j + D/2)`` of the rotate-half convention."""
    half = features.shape[-1] // 2
    return torch.complex(features[..., :half].double(), features[..., half:].double())


@torch.no_grad()
def record_key_value_statistics(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> KeyValueStatistics:
    """Runs ``batches`` (dicts with ``input_ids`` ``[batch, seq]``, optionally ``attention_mask``) through ``model``
    (a gated causal LM or a module holding one, left in its mode) and returns the moments of every layer.

    Under ``torch.distributed`` the sums are reduced over the ranks, so every rank returns the same statistics.
    """
    causal_lm = find_causal_lm(model)
    gates = find_gates(causal_lm)
    family = family_of(causal_lm)
    num_layers, num_heads, head_dim = gates.num_layers, gates.num_heads, gates.head_dim
    num_kv_heads = family.num_key_value_heads(causal_lm.config)
    pairs = head_dim // 2
    device = gates.values.device
    sums = {
        "query": torch.zeros(num_layers, num_heads, pairs, dtype=torch.float64, device=device),
        "key": torch.zeros(num_layers, pairs, num_kv_heads, num_kv_heads, dtype=torch.complex128, device=device),
        "value": torch.zeros(num_layers, num_kv_heads * head_dim, num_kv_heads * head_dim, dtype=torch.float64,
                             device=device),
    }
    kept = {"mask": None}  # [batch * seq] bool: the current batch's real tokens

    def recorder(layer: int, kind: str):
        def hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
            features = nn.functional.linear(args[0], module.weight, module.bias)  # the original heads' outputs
            features = features.reshape(-1, features.shape[-1])[kept["mask"]]  # [tokens, heads * D]
            if kind == "value":
                sums["value"][layer] += features.double().T @ features.double()
                return
            z = as_pairs(features.unflatten(-1, (-1, head_dim)))  # [tokens, heads, P]
            if kind == "query":
                sums["query"][layer] += z.abs().square().sum(0)
            else:
                sums["key"][layer] += torch.einsum("tgj,thj->jgh", z, z.conj())
        return hook

    handles = []
    for layer, decoder_layer in enumerate(family.decoder_layers(causal_lm)):
        attention = family.attention_of(decoder_layer)
        for kind, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            handles.append(getattr(attention, name).register_forward_hook(recorder(layer, kind)))
    tokens = 0
    was_training = causal_lm.training
    causal_lm.eval()
    try:
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.to(device).bool()
            kept["mask"] = mask.reshape(-1)
            tokens += int(mask.sum())
            causal_lm(input_ids=input_ids, attention_mask=mask.long())
    finally:
        for handle in handles:
            handle.remove()
        causal_lm.train(was_training)
    if dist.is_available() and dist.is_initialized():
        count = torch.tensor([tokens], dtype=torch.float64, device=device)
        dist.all_reduce(count)
        tokens = int(count.item())
        for value in sums.values():
            if value.is_complex():
                parts = torch.view_as_real(value).contiguous()
                dist.all_reduce(parts)
                value.copy_(torch.view_as_complex(parts))
            else:
                dist.all_reduce(value)
    if tokens == 0:
        raise ValueError("record_key_value_statistics found no token in the calibration batches (all padding).")
    return KeyValueStatistics(sums["query"].cpu() / tokens, sums["key"].cpu() / tokens, sums["value"].cpu() / tokens,
                              tokens)
