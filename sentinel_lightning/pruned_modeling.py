"""The modeling of compacted models: per-layer head counts, and unequal key/value groups run in equal slots.

Notation as in ``families.py``: ``h`` kept query heads and ``k`` kept key/value heads in one layer, ``g`` the size
of its largest kept group, ``D`` head dim, ``B`` batch, ``T`` new tokens, ``S`` tokens in the key/value cache.

A compacted layer keeps query heads ``config.kept_heads[l]`` and key/value heads
``config.kept_key_value_heads[l]`` (original indices, no repeats); its ``i``-th kept query head reads kept
key/value head ``config.key_value_index[l][i]``. When every kept key/value head is read by the same number of
query heads (equal groups) the family's stock attention module expresses the layer. Otherwise its query and
output projections become ``QuerySlots`` / ``OutputSlots``: they hold the ``h`` kept heads only, and at run time
place them into ``k * g`` slots of ``k`` equal groups (zero queries in the free slots, whose outputs are dropped
before the output projection). The family's own attention forward then runs unchanged with
``num_key_value_groups = g``, through whatever kernel the model uses, which reads the ``k`` cached key/value heads
with its own grouped-query support (SDPA decodes without repeating them). So the cache and the projections hold
each key/value head once, and no step does more work than the plain model's: ``k * g <= K * G = H``.

``rebuild_layers`` gives a model built from a compacted config these layers before the weights are loaded into
it; ``saving.load_pruned`` uses it, and so does the modeling code ``save_pruned`` writes next to the weights.

This module is standalone: it imports only torch, transformers and ``.families`` (relatively), because
``save_pruned`` copies it into model folders that load without sentinel-lightning (``trust_remote_code=True``).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .families import OUTPUT_BIAS_ATTRIBUTE, AttentionFamily, family_of


class QuerySlots(nn.Linear):
    """The query projection of a layer whose kept groups are unequal: the ``h`` kept query heads in equal slots.

    The weight holds the ``h`` kept heads only (``[h * D, C]``); the output puts head ``i`` into slot
    ``slots[i]`` of ``k * g`` slots (``g`` the largest kept group) and zeros into the others, ``[B, T, h * D]`` ->
    ``[B, T, k * g * D]``, so the family's own attention forward runs with ``num_key_value_groups = g`` and reads
    slot ``s`` against key/value head ``s // g`` with the kernel's own grouped-query path.

    Attributes:
        slots: The slot of each kept query head, ``h`` entries in ``range(num_slots)``.
        num_slots: ``k * g``.
    """

    slots: tuple[int, ...]
    num_slots: int

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        heads = super().forward(hidden_states).unflatten(-1, (len(self.slots), -1))  # [B, T, h, D]
        placed = heads.new_zeros(*heads.shape[:-2], self.num_slots, heads.shape[-1])  # [B, T, k * g, D]
        return placed.index_copy(-2, _slot_index(self, heads.device), heads).flatten(-2)  # [B, T, k * g * D]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slots={list(self.slots)}, num_slots={self.num_slots}"


class OutputSlots(nn.Linear):
    """The output projection matching ``QuerySlots``: gathers the ``h`` kept heads' slots, then projects.

    Input ``[B, T, k * g * D]`` -> ``[B, T, h * D]`` -> ``[B, T, C]``; the weight holds the ``h`` kept heads only.
    """

    slots: tuple[int, ...]
    num_slots: int

    def forward(self, slotted: torch.Tensor) -> torch.Tensor:
        heads = slotted.unflatten(-1, (self.num_slots, -1)).index_select(-2, _slot_index(self, slotted.device))
        return super().forward(heads.flatten(-2))  # [B, T, h, D] -> [B, T, h * D] -> [B, T, C]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slots={list(self.slots)}, num_slots={self.num_slots}"


class QueryKeyValueSlots(nn.Linear):
    """``QuerySlots`` for a fused query/key/value projection (Phi-3's ``qkv_proj``): the query section in slots.

    The weight holds the ``h`` kept query heads, then the ``k`` key and ``k`` value heads (``[(h + 2k) * D, C]``);
    the output ``[B, T, (h + 2k) * D]`` -> ``[B, T, (k * g + 2k) * D]``, keys and values as they are.

    Attributes:
        slots: The slot of each kept query head, ``h`` entries in ``range(num_slots)``.
        num_slots: ``k * g``.
        num_kv_heads: ``k``.
    """

    slots: tuple[int, ...]
    num_slots: int
    num_kv_heads: int

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused = super().forward(hidden_states)  # [B, T, (h + 2k) * D]
        head_dim = self.out_features // (len(self.slots) + 2 * self.num_kv_heads)
        query, key_value = fused.split([len(self.slots) * head_dim, 2 * self.num_kv_heads * head_dim], dim=-1)
        heads = query.unflatten(-1, (len(self.slots), head_dim))  # [B, T, h, D]
        placed = heads.new_zeros(*heads.shape[:-2], self.num_slots, head_dim)  # [B, T, k * g, D]
        placed = placed.index_copy(-2, _slot_index(self, heads.device), heads).flatten(-2)  # [B, T, k * g * D]
        return torch.cat([placed, key_value], dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slots={list(self.slots)}, num_slots={self.num_slots}"


def _slot_index(projection: QuerySlots | OutputSlots | QueryKeyValueSlots, device: torch.device) -> torch.Tensor:
    """``projection.slots`` as a tensor ``[h]`` on ``device``, kept between calls (not part of the state dict)."""
    index = projection.__dict__.get("_slot_tensor")
    if index is None or index.device != device:
        index = torch.tensor(projection.slots, dtype=torch.long, device=device)
        projection.__dict__["_slot_tensor"] = index
    return index


def query_slots(kv_index: list[int]) -> tuple[list[int], int]:
    """Slots of the ``h`` kept query heads in ``k`` equal groups of the largest kept group size ``g``.

    Args:
        kv_index: Kept key/value head read by each kept query head, ascending (see the module docstring).

    Returns:
        ``(slots, g)``: query head ``i`` goes into slot ``kv_index[i] * g + (its rank within its group)``.
    """
    group_size = max(Counter(kv_index).values())
    rank = Counter()
    slots = []
    for kv_head in kv_index:
        slots.append(kv_head * group_size + rank[kv_head])
        rank[kv_head] += 1
    return slots, group_size


def _as_slots(projection: nn.Linear, slot_class: type[nn.Linear], slots: list[int], num_slots: int) -> nn.Linear:
    """Turns an ``nn.Linear`` (or a slot projection made before) into ``slot_class`` in place."""
    projection.__class__ = slot_class
    projection.slots, projection.num_slots = tuple(slots), num_slots
    projection.__dict__.pop("_slot_tensor", None)  # made again from slots on the next forward
    return projection


def place_query_slots(family: AttentionFamily, attention: nn.Module, kv_index: list[int]) -> nn.Module:
    """Gives a resized grouped-query attention module with unequal kept groups its query slots (in place).

    Args:
        family: The model's family (where the output projection is).
        attention: An attention module of the family whose projections hold ``h = len(kv_index)`` query and
            ``k = max(kv_index) + 1`` key/value heads: a ``q_proj`` (or Phi-3's fused ``qkv_proj``) and an output
            ``nn.Linear``.
        kv_index: Kept key/value head read by each kept query head, ascending.

    Returns:
        ``attention``, its ``q_proj`` a ``QuerySlots``, its output projection an ``OutputSlots`` and its
        ``num_key_value_groups`` the largest kept group.
    """
    slots, group_size = query_slots(kv_index)
    num_slots = (max(kv_index) + 1) * group_size
    if isinstance(getattr(attention, "q_proj", None), nn.Linear):
        _as_slots(attention.q_proj, QuerySlots, slots, num_slots)
    elif isinstance(getattr(attention, "qkv_proj", None), nn.Linear):  # Phi-3: sliced in place, not split
        _as_slots(attention.qkv_proj, QueryKeyValueSlots, slots, num_slots).num_kv_heads = max(kv_index) + 1
        family.set_query_width(attention, num_slots)
    else:
        raise ValueError(f"{type(attention).__name__} has no q_proj or qkv_proj; unequal kept groups need one.")
    _as_slots(family.output_projection_of(attention), OutputSlots, slots, num_slots)
    attention.num_key_value_groups = group_size
    return attention


def has_query_slots(attention: nn.Module) -> bool:
    """Whether an attention module runs its kept query heads in slots (a layer of unequal kept groups)."""
    query = getattr(attention, "q_proj", getattr(attention, "qkv_proj", None))
    return isinstance(query, (QuerySlots, QueryKeyValueSlots))


def equal_groups(kv_index: list[int]) -> bool:
    """Whether every kept key/value head is read by the same number of kept query heads (true when empty)."""
    return len(set(Counter(kv_index).values())) <= 1


def resize_attention(
    family: AttentionFamily, layer: nn.Module, layer_idx: int, kv_index: list[int], head_dim: int
) -> nn.Module:
    """Gives a decoder layer's attention uninitialised projections for the kept heads that ``kv_index`` describes.

    Args:
        family: The model's family.
        layer: A decoder layer; its attention module is resized (or replaced) in place.
        layer_idx: Index of the layer (for the key/value cache).
        kv_index: Kept key/value head read by each kept query head (``h`` entries; empty for a pruned layer).
        head_dim: ``D``.

    Returns:
        The layer's attention module now: the stock module resized, with query slots when its groups are unequal
        (``place_query_slots``), or an ``EmptyAttention`` (no head kept).
    """
    num_heads, num_kv_heads = len(kv_index), len(set(kv_index))
    attention = family.resize(family.attention_of(layer), layer_idx, num_heads, num_kv_heads, head_dim)
    if num_heads and not equal_groups(kv_index):
        attention = place_query_slots(family, attention, kv_index)
    family.set_attention(layer, attention)
    return attention


# ----------------------------------------------------------------------------------------------------------------
# Layouts recorded in the config


def key_value_indices(config: PretrainedConfig) -> list[list[int]] | None:
    """Each layer's ``kv_index`` as ``config`` records it, or None for a config that was never compacted.

    Folders saved before ``config.key_value_index`` existed repeated key/value heads into equal groups; their
    index is read off the counts.

    Raises:
        ValueError: When the recorded lists disagree with each other.
    """
    kept_heads = getattr(config, "kept_heads", None)
    if kept_heads is None:
        return None
    kept_kv_heads = getattr(config, "kept_key_value_heads", None) or kept_heads
    indices = getattr(config, "key_value_index", None)
    if indices is None:
        layers = enumerate(zip(kept_heads, kept_kv_heads))
        indices = [_repeated_groups(layer_idx, heads, kv_heads) for layer_idx, (heads, kv_heads) in layers]
    if not len(kept_heads) == len(kept_kv_heads) == len(indices):
        raise ValueError(
            f"config.kept_heads, config.kept_key_value_heads and config.key_value_index have {len(kept_heads)}, "
            f"{len(kept_kv_heads)} and {len(indices)} layers; they must agree."
        )
    for index, (heads, kv_heads, kv_index) in enumerate(zip(kept_heads, kept_kv_heads, indices)):
        if len(kv_index) != len(heads) or sorted(set(kv_index)) != list(range(len(kv_heads))):
            raise ValueError(
                f"config.key_value_index[{index}] = {kv_index} does not map layer {index}'s {len(heads)} kept query "
                f"heads onto all of its {len(kv_heads)} kept key/value heads."
            )
    return [list(kv_index) for kv_index in indices]


def _repeated_groups(layer_idx: int, heads: list[int], kv_heads: list[int]) -> list[int]:
    """The ``kv_index`` of a layer saved with repeated key/value heads: equal consecutive groups."""
    if heads and len(heads) % len(kv_heads):
        raise ValueError(
            f"config.kept_heads: layer {layer_idx} keeps {len(heads)} query heads, not a multiple of its "
            f"{len(kv_heads)} key/value heads, and the config has no key_value_index."
        )
    group_size = len(heads) // max(len(kv_heads), 1)
    return [head // group_size for head in range(len(heads))]


def _stock_layout(model: PreTrainedModel) -> tuple[int, int]:
    """``(H, K)`` of the layers that the family's stock modules build from ``model.config``."""
    family = family_of(model)
    return family.head_shape(model)[1], family.num_key_value_heads(model.config)


def stock_describes(model: PreTrainedModel) -> bool:
    """Whether the family's stock modules, built from ``model.config`` alone, have every layer's layout.

    True for a model never compacted and for uniform layouts whose config states the head counts; such a model
    loads with plain ``from_pretrained``. False when compaction gave the output projections biases that the
    family's config cannot state (``config.attention_output_bias``, see ``families.add_output_biases``).
    """
    if getattr(model.config, OUTPUT_BIAS_ATTRIBUTE, False):
        return False
    indices = key_value_indices(model.config)
    return indices is None or all(_is_stock(kv_index, *_stock_layout(model)) for kv_index in indices)


def _is_stock(kv_index: list[int], num_heads: int, num_kv_heads: int) -> bool:
    return len(kv_index) == num_heads and len(set(kv_index)) == num_kv_heads and equal_groups(kv_index)


def rebuild_layers(model: PreTrainedModel) -> None:
    """Gives a model built from a compacted config the layers its config records (before weights are loaded).

    Layers the stock modules already express are left alone; the others get uninitialised projections of the
    recorded sizes (``resize_attention``). With ``config.attention_output_bias`` every attention sublayer then gets
    an output bias (``families.AttentionFamily.restore_output_biases``).

    Raises:
        ValueError: When the config records a different number of layers than the model has, or disagrees
            with itself (see ``key_value_indices``).
    """
    indices = key_value_indices(model.config)
    if indices is not None:
        _rebuild_attention(model, indices)
    if getattr(model.config, OUTPUT_BIAS_ATTRIBUTE, False):
        family_of(model).restore_output_biases(model)


def _rebuild_attention(model: PreTrainedModel, indices: list[list[int]]) -> None:
    """Resizes the attention of every layer whose ``kv_index`` (one per layer) the stock modules do not express."""
    family = family_of(model)
    layers = family.decoder_layers(model)
    if len(indices) != len(layers):
        raise ValueError(f"config.kept_heads has {len(indices)} layers; the model has {len(layers)} decoder layers.")
    num_heads, num_kv_heads = _stock_layout(model)
    _, _, head_dim = family.head_shape(model)
    for layer_idx, (layer, kv_index) in enumerate(zip(layers, indices)):
        if not _is_stock(kv_index, num_heads, num_kv_heads):
            resize_attention(family, layer, layer_idx, kv_index, head_dim)


def share_checkpoint_conversions(pruned_class: type[PreTrainedModel], base: type[PreTrainedModel]) -> None:
    """Lets ``pruned_class``, a remote-code subclass of ``base``, load checkpoints as ``base`` does.

    Transformers renames checkpoint keys per class name or ``model_type`` (GPT-NeoX saves ``lm_head`` as
    ``embed_out``) but skips that for remote code unless the class name is registered; this registers it.
    """
    mapping = get_checkpoint_conversion_mapping(base.__name__) or get_checkpoint_conversion_mapping(
        base.config_class.model_type
    )
    if mapping:
        register_checkpoint_conversion_mapping(pruned_class.__name__, mapping, overwrite=True)
