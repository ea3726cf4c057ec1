"""Physically removes pruned attention heads: smaller, faster models of the same class.

A gate at 0 still costs its head's full computation. ``compact`` turns a gated model into an ordinary model of
the same class whose query, key, value and output projections only hold the heads that are still active, with
the active gates' values folded into the output projection (a head gated at 0.5 keeps computing half its output).

How each family's projections are cut and its attention module resized lives in ``families.py`` (one entry per
family). Grouped-query families keep a key/value head while any query head of its group is kept, and never
repeat one: a layer whose kept groups are unequal runs its query heads in equal slots
(``pruned_modeling.QuerySlots``), so the key/value projections and cache never grow and the
parameter count drops with every pruned query head. A layer whose heads are all pruned gets a
``families.EmptyAttention``.

A pruned head with a compensation (``HeadGates.compensation[l, h]``, ``[D]``: the constant it writes instead of
its output, see ``HeadPruning(compensate="mean")``) is folded through the output projection into its bias:
``bias += W_o[:, h] @ compensation[l, h]`` summed over the layer's pruned heads (an ``EmptyAttention`` gets that
bias). A family without an output bias gets one (``families.AttentionFamily.add_output_biases``): Llama states it
with ``attention_bias`` (zero query/key/value biases), so a uniform layout still loads with plain transformers;
Mistral, Qwen2 and OPT cannot state it in their config and are saved with modeling code. Zero compensation (the
default) adds nothing. Linear compensation (``HeadGates.reconstruction[l]``, ``R``: pruned heads also write
``R x``, ``x`` the gated head outputs) is folded into the kept heads' columns first: ``W_o <- W_o (I + R)``.

The config of a compacted model records what was kept: ``config.kept_heads[l]`` lists the original query heads
that layer ``l`` kept, ``config.kept_key_value_heads[l]`` the original key/value heads it kept (no repeats; equal
to ``kept_heads[l]`` for families without grouped-query attention) and ``config.key_value_index[l][i]`` which of
those its ``i``-th kept query head reads. ``pruned_modeling.rebuild_layers`` rebuilds the layers from these. When
every layer keeps the same numbers of query and key/value heads in equal groups (the uniform shape) and the
family's config states ``head_dim`` (the Llama family), ``num_attention_heads``, ``num_key_value_heads`` and
``head_dim`` are rewritten as well (where the config class accepts them), so the stock modules describe the
model and its folder loads with plain ``AutoModelForCausalLM.from_pretrained``. ``saving.save_pruned`` writes
every other layout with the modeling code it needs (see ``saving``).

Notation as in ``families.py``: ``L`` layers, ``H`` query heads, ``K`` key/value heads, ``D`` head dim.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs

from sentinel_lightning.gates import HeadGates, detach_gates, find_causal_lm, find_gates
from sentinel_lightning.lora import merge_adapters
from sentinel_lightning.merging import merged_layout, reads_own_groups
from sentinel_lightning.pretrained import forget_quantization
from sentinel_lightning.standalone.families import AttentionFamily, family_of
from sentinel_lightning.standalone.pruned_modeling import (
    ORIGINAL_HEADS,
    equal_groups,
    key_value_indices,
    resize_attention,
)

# ----------------------------------------------------------------------------------------------------------------
# Counting


def count_parameters(model: nn.Module) -> int:
    """Number of distinct weights of a model as served (tied weights once; gates and LoRA adapters excluded)."""
    return sum(parameter.numel() for parameter in _weights(model))


def weight_bytes(model: nn.Module) -> int:
    """Bytes taken by the distinct weights of a model as served (tied weights once; gates and LoRA adapters
    excluded)."""
    return sum(parameter.numel() * parameter.element_size() for parameter in _weights(model))


def _weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights a served model holds: not the gates (folded by ``compact``), not a peft tuner layer's adapters
    (merged into its base layer's weights by ``compact``, ``lora.merge_adapters``)."""
    left_out = {id(parameter) for module in model.modules() if isinstance(module, HeadGates)
                for parameter in module.parameters()}
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Module) and hasattr(module, "merge"):  # peft's BaseTunerLayer
            kept = {id(parameter) for parameter in base.parameters()}
            left_out |= {id(parameter) for parameter in module.parameters() if id(parameter) not in kept}
    return [parameter for parameter in model.parameters() if id(parameter) not in left_out]


def kv_cache_bytes_per_token(model: nn.Module) -> int:
    """Bytes of keys and values that one token adds to the key/value cache, over all layers, in the model's dtype,
    while the context fits every sliding window (``kv_cache_bytes`` counts the windows).

    A layer caches ``2 * k * D`` numbers per token (keys and values of its ``k`` key/value heads, each once); a
    layer whose heads are all pruned caches the 2 numbers of its ``EmptyAttention`` placeholder.

    Args:
        model: A supported causal LM (compacted or not, gated or not) or a LightningModule holding one.
    """
    return sum(_kv_cache_bytes_per_token_per_layer(model))


def kv_cache_bytes(model: nn.Module, context: int) -> int:
    """Bytes the key/value cache holds after ``context`` tokens, over all layers.

    A full-attention layer holds every token; a sliding-window layer (``config.layer_types``, Mistral's
    ``sliding_window``, as transformers' ``DynamicCache`` reads them) holds only its last ``sliding_window - 1``.

    Args:
        model: As for ``kv_cache_bytes_per_token``.
        context: Number of tokens cached, a positive integer.
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context={context!r} must be a positive number of tokens.")
    windows = _sliding_windows(find_causal_lm(model).config)
    per_layer = _kv_cache_bytes_per_token_per_layer(model)
    return sum(size * (context if window is None else min(context, window - 1))
               for size, window in zip(per_layer, windows, strict=True))


def _kv_cache_bytes_per_token_per_layer(model: nn.Module) -> list[int]:
    """``[L]`` bytes of keys and values each layer's cache adds per token (see ``kv_cache_bytes_per_token``)."""
    causal_lm = find_causal_lm(model)
    family = family_of(causal_lm)
    num_layers, _, head_dim = family.head_shape(causal_lm)
    indices = key_value_indices(causal_lm.config)
    if indices is None:
        kv_heads = [family.num_key_value_heads(causal_lm.config)] * num_layers
    else:
        kv_heads = [len(set(kv_index)) for kv_index in indices]
    size = torch.empty((), dtype=causal_lm.dtype).element_size()
    return [(2 * count * head_dim if count else 2) * size for count in kv_heads]  # keys and values


def _sliding_windows(config: PretrainedConfig) -> list[int | None]:
    """``[L]`` each layer's sliding window as transformers' cache applies it, None for a layer that keeps all."""
    layer_types, per_layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return [kwargs.get("sliding_window") if kind == "sliding_attention" else None
            for kind, kwargs in zip(layer_types, per_layer_kwargs, strict=True)]


def bytes_per_decoded_token(model: nn.Module, context: int) -> int:
    """Bytes one decoding step must read with ``context`` tokens cached: every weight once plus the whole cache
    (``kv_cache_bytes``: a sliding-window layer reads only its window).

    The ratio of two models' values bounds how much faster one decodes than the other where decoding is limited
    by memory traffic (batch 1, long contexts), which is how a smaller cache pays.
    """
    return weight_bytes(model) + kv_cache_bytes(model, context)


# ----------------------------------------------------------------------------------------------------------------
# Compaction


@torch.no_grad()
def compact(model: nn.Module) -> PreTrainedModel:
    """Returns a copy of a gated model with its pruned heads removed from the weights and its gates folded in.

    The input is not modified. The result is an ordinary model of the same class, in eval mode, without gates or
    hooks, whose logits equal the gated model's (see the module docstring and ``families.py``).

    Args:
        model: A gated causal LM (see ``attach_gates``), a ``peft`` LoRA model of one, or a LightningModule
            holding either; LoRA adapters are merged into their base weights first (``lora.merge_adapters``). A
            model without gates is returned as an eval-mode copy (nothing is pruned).

    Returns:
        The compacted model. ``config.kept_heads``, ``config.kept_key_value_heads`` and ``config.key_value_index``
        (lists over layers) record the original heads each layer kept and which key/value head each query head
        reads (see the module docstring).
    """
    source = merge_adapters(model)  # the causal LM itself, or a merged copy of a LoRA model
    quantized = [name for name, parameter in source.named_parameters() if not parameter.is_floating_point()]
    if quantized:
        raise ValueError(
            f"model holds quantised weights ({', '.join(quantized[:3])}, ...); compact cuts floating-point weights "
            "only: load the model de-quantised."
        )
    compacted = copy.deepcopy(source)
    forget_quantization(compacted)
    gates = find_gates(compacted)
    if gates is None:
        return compacted.eval()
    family = family_of(compacted)
    num_layers, num_heads, head_dim = family.head_shape(compacted)
    if (gates.num_layers, gates.num_heads) != (num_layers, num_heads):
        raise ValueError(
            f"The gates are [{gates.num_layers}, {gates.num_heads}] but the model has {num_layers} layers of "
            f"{num_heads} heads; attach the gates to this model with attach_gates."
        )
    if gates.fading.any():
        fading = gates.fading.nonzero().tolist()
        raise ValueError(
            f"{len(fading)} pruned head(s) still write part of their output while they fade out (HeadGates.fading "
            f"> 0 at (layer, head) {[tuple(pair) for pair in fading[:4]]}...): the model that computes these logits "
            "is not the pruned one yet. Train the rest of HeadPruning's fade_steps, or call gates.fading.zero_() to "
            "compact the fully pruned model."
        )
    active = gates.active.detach().cpu().clone()  # [L, H]
    values = gates.values.detach().cpu().clone()  # [L, H]
    compensation = gates.compensation.detach().cpu().double()  # [L, H, D]
    reconstruction = None if gates.reconstruction is None else gates.reconstruction.detach().cpu().double()
    mix = None if gates.key_value_mix is None else gates.key_value_mix.detach().cpu().double()  # [L, H, K]
    detach_gates(compacted)
    previous_heads, previous_kv_heads = _previous_record(compacted, family, num_layers, num_heads)
    num_kv_heads = family.num_key_value_heads(compacted.config)

    kept_heads, kept_kv_heads, kv_indices, folds = [], [], [], []
    for index, layer in enumerate(family.decoder_layers(compacted)):
        kept = active[index].nonzero().flatten().tolist()
        pruned = (~active[index]).nonzero().flatten().tolist()
        if reconstruction is not None and pruned and reconstruction[index].any():
            _fold_reconstruction(family, family.attention_of(layer), reconstruction[index].flatten(0, 1))
        folds.append(_compensation_bias(family, family.attention_of(layer), pruned, compensation[index], head_dim))
        attention = family.attention_of(layer)
        rows = None
        if mix is not None and kept and not reads_own_groups(mix[index], kept, family.group_size(compacted.config)):
            kept, kv_index, rows = merged_layout(mix[index], kept)  # kept ordered by the merged head they read
            kv_sources = [int(row.argmax()) for row in rows]  # each merged head's largest part, for the record
        else:
            kv_sources = family.key_value_sources(kept, num_heads, num_kv_heads)
            kv_index = family.key_value_index(kept, num_heads, num_kv_heads)
        tensors = family.slice_heads(attention, kept, kv_sources, values[index, kept], head_dim)
        if rows is not None:
            tensors.update(_merged_key_values(attention, rows, head_dim))
        if len(kept) < num_heads or rows is not None:
            attention = resize_attention(family, layer, index, kv_index, head_dim)
        _copy_tensors(attention, tensors)
        kept_heads.append([previous_heads[index][head] for head in kept])
        kept_kv_heads.append([previous_kv_heads[index][head] for head in kv_sources])
        kv_indices.append(kv_index)
    _fold_compensation(compacted, family, folds)
    _record(compacted.config, family, kept_heads, kept_kv_heads, kv_indices, head_dim)
    return compacted.eval()


def _merged_key_values(attention: nn.Module, rows: torch.Tensor, head_dim: int) -> dict[str, torch.Tensor]:
    """The key and value projections of merged key/value heads: ``W' = sum_k rows[j, k] W[k]`` per merged head.

    Args:
        attention: A grouped-query attention module before resizing (``k_proj``, ``v_proj``: ``[K * D, C]``).
        rows: ``[K', K]`` (fp64): each merged head's mix of the original ones (``merging.merged_layout``).
        head_dim: ``D``.
    """
    tensors = {}
    for name in ("k_proj", "v_proj"):
        projection = getattr(attention, name)
        weight = projection.weight.detach().double().unflatten(0, (-1, head_dim))  # [K, D, C]
        merged = torch.einsum("jk,kdc->jdc", rows.to(weight.device), weight).flatten(0, 1)  # [K' * D, C]
        tensors[f"{name}.weight"] = merged.to(projection.weight.dtype)
        if projection.bias is not None:
            bias = projection.bias.detach().double().unflatten(0, (-1, head_dim))  # [K, D]
            tensors[f"{name}.bias"] = torch.einsum("jk,kd->jd", rows.to(bias.device), bias).flatten().to(
                projection.bias.dtype)
    return tensors


def _compensation_bias(
    family: AttentionFamily, attention: nn.Module, pruned: list[int], compensation: torch.Tensor, head_dim: int
) -> torch.Tensor | None:
    """What the pruned heads' compensation adds to the layer's output: ``sum_h W_o[:, h] @ c[h]``, ``[C]``.

    Args:
        family: The model's family.
        attention: The layer's attention module before resizing.
        pruned: The layer's pruned query heads.
        compensation: ``[H, D]`` (fp64): what each pruned head writes into the output projection.
        head_dim: ``D``.

    Returns:
        The sum (fp64), or None when the pruned heads' compensation is all zero (nothing to fold).
    """
    if not pruned or not compensation[pruned].any():
        return None
    weight = family.output_matrix(attention).detach().double()  # [C, H * D]
    columns = weight.unflatten(1, (-1, head_dim))[:, pruned]  # [C, p, D]
    return torch.einsum("cpd,pd->c", columns, compensation[pruned].to(weight.device))


def _fold_reconstruction(family: AttentionFamily, attention: nn.Module, reconstruction: torch.Tensor) -> None:
    """``W_o <- W_o (I + R)``: the pruned heads' linear prediction ``R x`` ``[H * D, H * D]`` (fp64) moves into the
    kept heads' columns (``R``'s columns of pruned heads are zero, so theirs stay as they are)."""
    weight = family.output_matrix(attention)  # [C, H * D], a view of the parameter
    weight.copy_(weight.double() + weight.double() @ reconstruction.to(weight.device))


def _fold_compensation(model: PreTrainedModel, family: AttentionFamily, folds: list[torch.Tensor | None]) -> None:
    """Adds each layer's compensation sum ``[C]`` (or None) to its output bias, adding biases where the family has
    none (``families.AttentionFamily.add_output_biases``), so that the compacted model computes what the gated one
    did."""
    if all(fold is None for fold in folds):
        return
    family.add_output_biases(model)
    for layer, fold in zip(family.decoder_layers(model), folds):
        if fold is not None:
            bias = family.output_bias_of(family.attention_of(layer))
            bias.add_(fold.to(bias))


def _previous_record(model: PreTrainedModel, family: AttentionFamily, num_layers: int, num_heads: int) -> tuple:
    """The original heads of each current head, when ``model`` was compacted before, else the identity.

    Returns:
        ``(query heads, key/value heads)``, each a list over the ``L`` layers of original head indices.
    """
    kept = getattr(model.config, "kept_heads", None)
    if kept is None:
        identity = [list(range(max(num_heads, family.num_key_value_heads(model.config)))) for _ in range(num_layers)]
        return identity, identity
    if any(len(heads) != num_heads for heads in kept):
        raise ValueError(
            f"This model was compacted before with different numbers of heads per layer "
            f"({[len(heads) for heads in kept]}); gates of {num_heads} heads per layer cannot describe it."
        )
    return kept, getattr(model.config, "kept_key_value_heads", kept)


def _record(
    config: PretrainedConfig, family: AttentionFamily, kept_heads: list[list[int]], kept_kv_heads: list[list[int]],
    kv_indices: list[list[int]], head_dim: int,
) -> None:
    """Writes the kept heads into ``config`` and, for the uniform shape where the config can state it, the head
    counts (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``) that the stock modules then build."""
    config.kept_heads = kept_heads
    config.kept_key_value_heads = kept_kv_heads
    config.key_value_index = kv_indices
    shapes = {(len(heads), len(kv_heads)) for heads, kv_heads in zip(kept_heads, kept_kv_heads)}
    uniform = len(shapes) == 1 and all(equal_groups(kv_index) for kv_index in kv_indices)
    if not family.config_has_head_dim or not uniform:
        return
    (num_heads, num_kv_heads), = shapes
    if num_heads == 0:
        return
    missing = object()
    names = ("num_attention_heads", "num_key_value_heads", "head_dim", ORIGINAL_HEADS)
    before = {name: getattr(config, name, missing) for name in names}
    if before[ORIGINAL_HEADS] is missing:  # what kept_heads index, once the counts no longer say it
        setattr(config, ORIGINAL_HEADS, [config.num_attention_heads, family.num_key_value_heads(config)])
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = num_heads, num_kv_heads, head_dim
    try:
        config.validate()
    except Exception:  # e.g. LlamaConfig insists that hidden_size is a multiple of num_attention_heads
        for name, value in before.items():
            if value is missing:
                delattr(config, name)
            else:
                setattr(config, name, value)


def _copy_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copies ``tensors`` (names relative to ``module``) into the module's parameters of the same shapes."""
    parameters = dict(module.named_parameters())
    for name, tensor in tensors.items():
        parameters[name].copy_(tensor.contiguous())
