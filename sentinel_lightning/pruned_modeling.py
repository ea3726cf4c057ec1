"""The modeling of compacted models: per-layer head counts and key/value heads read through an index.

Notation as in ``families.py``: ``h`` kept query heads and ``k`` kept key/value heads in one layer, ``D`` head
dim, ``B`` batch, ``T`` new tokens, ``S`` tokens in the key/value cache.

A compacted layer keeps query heads ``config.kept_heads[l]`` and key/value heads
``config.kept_key_value_heads[l]`` (original indices, no repeats); its ``i``-th kept query head reads kept
key/value head ``config.key_value_index[l][i]``. When every kept key/value head is read by the same number of
query heads (equal groups) the family's stock attention module expresses the layer. Otherwise the layer gets a
``KeyValueIndexAttention``: the stock forward, except that after the key/value cache update the ``k`` key/value
heads are expanded to the ``h`` query heads by that index, so the cache and the projections hold each key/value
head once.

``rebuild_layers`` gives a model built from a compacted config these layers before the weights are loaded into
it; ``saving.load_pruned`` uses it, and so does the modeling code ``save_pruned`` writes next to the weights.

This module is standalone: it imports only torch, transformers and ``.families`` (relatively), because
``save_pruned`` copies it into model folders that load without sentinel-lightning (``trust_remote_code=True``).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg

from .families import OUTPUT_BIAS_ATTRIBUTE, AttentionFamily, family_of


class KeyValueIndexAttention:
    """Mixin over a grouped-query family's attention class whose kept groups are unequal (see the module docstring).

    ``key_value_indexed`` makes the classes (``KeyValueIndexed<Stock>``) and converts modules. The forward is the
    stock one of Llama, Mistral and Qwen2 (projections, rotary embeddings from the stock modeling module, cache
    update with its keyword arguments, dispatch through ``ALL_ATTENTION_FUNCTIONS`` to eager, SDPA or flash,
    sliding window, scaling, dropout) with ``num_key_value_groups = 1`` and the index expansion after the cache.

    Attributes:
        kv_index: Kept key/value head read by each kept query head, ``h`` entries in ``range(k)``.
    """

    kv_index: tuple[int, ...]
    _stock_class: type[nn.Module]
    _apply_rotary: Callable
    _eager_attention: Callable

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Maps ``hidden_states`` ``[B, T, C]`` to ``([B, T, C], attention weights or None)``, as the stock forward."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, T, h * D] -> [B, h, T, D]
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, T, k * D] -> [B, k, T, D]
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, k, T, D]
        cos, sin = position_embeddings
        query, key = self._apply_rotary(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)  # [B, k, S, D]
        index = self._kv_index_on(key.device)  # [h]
        key, value = key.index_select(1, index), value.index_select(1, index)  # [B, k, S, D] -> [B, h, S, D]
        sliding_window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
        if sliding_window is not None:  # Mistral and Qwen2 pass it; Llama has none
            kwargs["sliding_window"] = sliding_window
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager_attention)
        output, weights = interface(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )
        output = output.reshape(*input_shape, -1).contiguous()  # [B, T, h, D] -> [B, T, h * D]
        return self.o_proj(output), weights

    def _kv_index_on(self, device: torch.device) -> torch.Tensor:
        """``kv_index`` as a tensor ``[h]`` on ``device`` (kept between calls; not part of the state dict)."""
        index = self.__dict__.get("_kv_index_tensor")
        if index is None or index.device != device:
            index = torch.tensor(self.kv_index, dtype=torch.long, device=device)
            self.__dict__["_kv_index_tensor"] = index
        return index

    def extra_repr(self) -> str:
        return f"kv_index={list(self.kv_index)}"

    def __reduce_ex__(self, protocol):
        """Pickles and copies as ``KeyValueIndexed<Stock>``, a class made at run time (rebuilt from the stock one)."""
        return _new_indexed, (self._stock_class,), self.__getstate__()


_INDEXED_CLASSES: dict[type, type] = {}


def _indexed_class(stock_class: type[nn.Module]) -> type[nn.Module]:
    """``KeyValueIndexed<Stock>``: the ``KeyValueIndexAttention`` subclass of a family's attention class."""
    if stock_class not in _INDEXED_CLASSES:
        modeling = sys.modules[stock_class.__module__]  # the family's modeling module: its rotary and eager functions
        members = {
            "_stock_class": stock_class,
            "_apply_rotary": staticmethod(modeling.apply_rotary_pos_emb),
            "_eager_attention": staticmethod(modeling.eager_attention_forward),
            "__module__": __name__,
        }
        name = f"KeyValueIndexed{stock_class.__name__}"
        _INDEXED_CLASSES[stock_class] = type(name, (KeyValueIndexAttention, stock_class), members)
    return _INDEXED_CLASSES[stock_class]


def _new_indexed(stock_class: type[nn.Module]) -> nn.Module:
    """An empty ``KeyValueIndexed<Stock>`` instance, for pickling and copying (state set afterwards)."""
    indexed = _indexed_class(stock_class)
    return indexed.__new__(indexed)


def key_value_indexed(attention: nn.Module, kv_index: list[int]) -> nn.Module:
    """Turns a resized grouped-query attention module into a ``KeyValueIndexAttention`` of ``kv_index`` (in place).

    Args:
        attention: A Llama, Mistral or Qwen2 attention module (or one converted before) whose projections hold
            ``h = len(kv_index)`` query and ``k = max(kv_index) + 1`` key/value heads.
        kv_index: Kept key/value head read by each kept query head.

    Returns:
        ``attention``, now of class ``KeyValueIndexed<Stock>``.
    """
    stock_class = getattr(attention, "_stock_class", type(attention))
    modeling = sys.modules[stock_class.__module__]
    if not all(hasattr(modeling, name) for name in ("apply_rotary_pos_emb", "eager_attention_forward")):
        raise ValueError(f"{stock_class.__name__} is not a grouped-query attention that key/value indexing supports.")
    attention.__class__ = _indexed_class(stock_class)
    attention.kv_index = tuple(kv_index)
    attention.__dict__.pop("_kv_index_tensor", None)  # made again from kv_index on the next forward
    attention.num_key_value_groups = 1  # the index expands the key/value heads; repeat_kv must not
    return attention


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
        The layer's attention module now: the stock module resized (equal groups), a ``KeyValueIndexAttention``
        (unequal groups) or an ``EmptyAttention`` (no head kept).
    """
    num_heads, num_kv_heads = len(kv_index), len(set(kv_index))
    attention = family.resize(family.attention_of(layer), layer_idx, num_heads, num_kv_heads, head_dim)
    if num_heads and not equal_groups(kv_index):
        attention = key_value_indexed(attention, kv_index)
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
