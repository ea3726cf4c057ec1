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

import itertools
from collections import Counter

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .families import FAMILIES, OUTPUT_BIAS_ATTRIBUTE, AttentionFamily, family_of


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

# The model_type of a folder that only its own modeling code builds: its family's, prefixed (see saving).
MODEL_TYPE_PREFIX = "sentinel_"
# Set by compaction when it rewrites the head counts to a uniform shape: ``[H, K]`` of the model kept_heads index.
ORIGINAL_HEADS = "original_head_counts"


def key_value_indices(config: PretrainedConfig) -> list[list[int]] | None:
    """Each layer's ``kv_index`` as ``config`` records it, or None for a config that was never compacted.

    Folders saved before ``config.key_value_index`` existed repeated key/value heads into equal groups; their
    index is read off the counts.

    Raises:
        ValueError: When the recorded lists are malformed (``check_kept_heads``) or disagree with each other.
    """
    check_kept_heads(config)
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


def check_kept_heads(config, where: str = "config") -> None:
    """Checks the layout a compacted config records before a model is built from it (nothing to check if none).

    ``kept_heads`` must hold one list per decoder layer of distinct original query head indices in ``[0, H)``
    (ascending, except where merged key/value heads group their readers); ``kept_key_value_heads`` likewise of
    key/value head indices in ``[0, K)`` (increasing with repeats in folders saved before ``key_value_index``
    existed); ``key_value_index[l]`` one position in
    ``range(len(kept_key_value_heads[l]))`` per kept query head (the identity without grouped-query attention).
    ``H`` and ``K`` are the config's head counts, except after a rewrite to the uniform shape (see ``compaction``
    and ``_records_original_heads``): the config no longer records them, and indices are only checked to be
    non-negative. Whether the weights fit the layout is checked when they are loaded.

    Args:
        config: A causal LM config.
        where: The file the config came from, for the messages.

    Raises:
        ValueError: Naming the field, the layer and the bad value.
    """
    kept_heads = getattr(config, "kept_heads", None)
    if kept_heads is None:
        recorded = [name for name in ("kept_key_value_heads", "key_value_index") if getattr(config, name, None)]
        if recorded or str(config.model_type).startswith(MODEL_TYPE_PREFIX):
            why = f"config.{recorded[0]} is set" if recorded else f"config.model_type={config.model_type!r}"
            raise ValueError(
                f"{where}: config.kept_heads is missing or null, but {why}: a compacted model's config records "
                "the kept query heads of every layer (a list of lists of head indices). Save the model again with "
                "save_pruned."
            )
        return
    num_layers = config.num_hidden_layers
    family = FAMILIES.get(config.model_type)
    grouped = family.grouped_query if family is not None else hasattr(config, "num_key_value_heads")
    num_heads = config.num_attention_heads
    num_kv_heads = (getattr(config, "num_key_value_heads", None) or num_heads) if grouped else num_heads
    original = getattr(config, ORIGINAL_HEADS, None)  # [H, K] before a rewrite to the uniform shape
    if original is not None:
        bounds = tuple(original)
    else:
        bounds = (num_heads, num_kv_heads) if _records_original_heads(config, family) else (None, None)
    # Distinct, in the order the weights hold them: merged key/value heads group their readers (``merging``).
    _check_layers(where, "kept_heads", kept_heads, num_layers, bounds[0], order="distinct")
    kv_heads = getattr(config, "kept_key_value_heads", None)
    kv_index = getattr(config, "key_value_index", None)
    if kv_heads is not None:
        order = "distinct" if kv_index is not None else "increasing"  # repeats: before key_value_index
        _check_layers(where, "kept_key_value_heads", kv_heads, num_layers, bounds[1], order)
        differ = [layer for layer, (kv, heads) in enumerate(zip(kv_heads, kept_heads)) if kv != heads]
        if not grouped and differ:
            layer = differ[0]
            raise ValueError(
                f"{where}: config.kept_key_value_heads[{layer}] = {kv_heads[layer]} must equal config.kept_heads"
                f"[{layer}] = {kept_heads[layer]} (layer {layer}): model_type={config.model_type!r} has one key/value "
                "head per query head."
            )
    if kv_index is not None:
        kv_heads = kv_heads if kv_heads is not None else kept_heads
        _check_layers(where, "key_value_index", kv_index, num_layers, None, order=None)
        for layer, (index, heads, kv) in enumerate(zip(kv_index, kept_heads, kv_heads)):
            _check_key_value_index(where, layer, index, len(heads), len(kv), grouped)


def _records_original_heads(config, family) -> bool:
    """Whether ``config``'s head counts are the original model's, for a config saved before ``ORIGINAL_HEADS``.

    Only families whose config states ``head_dim`` are rewritten, and a rewritten config has fewer heads than its
    width holds (``num_attention_heads * head_dim < hidden_size``). A model that was like that from the start (an
    explicit ``head_dim``) is treated alike: its indices are then only checked to be non-negative.
    """
    if family is not None and not family.config_has_head_dim:
        return True
    head_dim = getattr(config, "head_dim", None)
    return head_dim is None or config.num_attention_heads * head_dim == config.hidden_size


def _check_layers(where: str, field: str, value, num_layers: int, bound: int | None, order: str | None) -> None:
    """Checks that ``config.<field>`` is a list of ``num_layers`` lists of ints in ``[0, bound)`` (any int >= 0
    when ``bound`` is None), in ``order`` (``"distinct"``, ``"increasing"``, or None for any)."""
    if not isinstance(value, list) or not all(isinstance(layer, list) for layer in value):
        raise ValueError(
            f"{where}: config.{field} = {value!r} must be a list holding one list of head indices per decoder layer."
        )
    if len(value) != num_layers:
        raise ValueError(
            f"{where}: config.{field} has {len(value)} layers; the config has num_hidden_layers={num_layers}."
        )
    allowed = f"[0, {bound})" if bound is not None else "[0, ...)"
    for layer, indices in enumerate(value):
        bad = [i for i in indices if type(i) is not int or i < 0 or (bound is not None and i >= bound)]
        if bad:
            raise ValueError(
                f"{where}: config.{field}[{layer}] = {indices} holds {bad[0]!r}, not a head index in {allowed} "
                f"(layer {layer})."
            )
        if len(set(indices)) < len(indices) if order == "distinct" else order and any(
                a > b for a, b in itertools.pairwise(indices)):
            raise ValueError(f"{where}: config.{field}[{layer}] = {indices} must be {order} (layer {layer}).")


def _check_key_value_index(where: str, layer: int, index: list, num_heads: int, num_kv: int, grouped: bool) -> None:
    """Checks layer ``layer``'s ``key_value_index``: ``num_heads`` positions that read all ``num_kv`` kept heads."""
    expected = list(range(num_heads)) if not grouped else None
    if len(index) != num_heads or sorted(set(index)) != list(range(num_kv)) or expected not in (None, index):
        allowed = f"{expected}" if expected is not None else f"{num_heads} positions covering range({num_kv})"
        raise ValueError(
            f"{where}: config.key_value_index[{layer}] = {index} does not fit layer {layer}'s {num_heads} kept query "
            f"heads and {num_kv} kept key/value heads (allowed: {allowed})."
        )


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
    return not getattr(model.config, OUTPUT_BIAS_ATTRIBUTE, False) and uniform_layers(model)


def uniform_layers(model: PreTrainedModel) -> bool:
    """Whether every layer has the head layout that the family's stock modules build from ``model.config``.

    False for a model compacted to layers of different sizes or unequal groups (``config.kept_heads``).
    """
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
