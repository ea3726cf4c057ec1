"""The model families sentinel-lightning supports: the one place that knows how each one lays out its attention.

Notation (as in nanoGPT / litgpt):

- ``L``: decoder layers; ``H``: query heads per layer; ``K``: key/value heads per layer (``K == H`` without
  grouped-query attention); ``G = H // K``: query heads per key/value head (the group size);
  ``D``: head dim; ``C``: hidden size (the model's width); ``h``: the kept query heads of one layer.

Query head ``q`` reads key/value head ``q // G``. Everything outside this module speaks ``[L, H]`` and asks the
family (``family_of(model)``) where the layers, attention modules and output projections are, how to slice the
projections for kept heads and how to resize an attention module. ``FAMILIES`` maps ``config.model_type`` to
one ``AttentionFamily``; adding a family is one new entry there (the tests take their families from it).

This module is standalone: it imports only torch and transformers, because ``save_pruned`` copies it (with
``pruned_modeling.py``) into the folders of compacted models, which then load without sentinel-lightning.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)
from transformers.pytorch_utils import Conv1D

# Set in the config of a compacted model whose family's config cannot state the output biases compaction added.
OUTPUT_BIAS_ATTRIBUTE = "attention_output_bias"


class EmptyAttention(nn.Module):
    """The attention of a layer whose heads are all pruned: returns the output projection's bias, or zero.

    It still writes a one-number-per-token placeholder into the key/value cache so that the cache knows how many
    tokens it has seen (the cache counts tokens by the sequence length of its keys, from the first layer).

    Args:
        hidden_size: Width ``C`` of the model.
        layer_idx: Index of the decoder layer, for the key/value cache.
        bias: Whether the removed output projection had a bias (kept as ``self.bias``, ``[C]``).
        cache_keywords: The keyword arguments under which the family's decoder layer passes the cache.
    """

    def __init__(self, hidden_size: int, layer_idx: int, bias: bool, cache_keywords: tuple[str, ...]) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.cache_keywords = tuple(cache_keywords)
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        """Maps ``hidden_states`` ``[B, T, C]`` to the constant output ``[B, T, C]`` (no attention weights)."""
        cache = next((kwargs[name] for name in self.cache_keywords if kwargs.get(name) is not None), None)
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)  # GPT-2's encoder-decoder cache
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)  # [B, 1, T, 1]
            cache.update(placeholder, placeholder, self.layer_idx)
        output = torch.zeros_like(hidden_states)  # [B, T, C]
        if self.bias is not None:
            output = output + self.bias
        return output, None

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, bias={self.bias is not None}"


# ----------------------------------------------------------------------------------------------------------------
# Tensor helpers shared by the families' slicing and resizing


def _head_features(heads: list[int], head_dim: int, offset: int = 0) -> torch.Tensor:
    """Feature indices ``[len(heads) * D]`` of ``heads`` in a ``[H * D]`` layout starting at ``offset``."""
    heads = torch.tensor(heads, dtype=torch.long).reshape(-1, 1)  # [h, 1]
    return (offset + heads * head_dim + torch.arange(head_dim)).flatten()  # [h, D] -> [h * D]


def _feature_scale(scale: torch.Tensor, head_dim: int, like: torch.Tensor) -> torch.Tensor:
    """Each kept head's gate repeated over its features: ``[h]`` -> ``[h * D]``, on ``like``'s device and dtype."""
    return scale.repeat_interleave(head_dim).to(device=like.device, dtype=like.dtype)


def _bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def _out_features(projection: nn.Module) -> int:
    """Output width of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (``nf``; its weight is ``[in, out]``)."""
    return projection.out_features if isinstance(projection, nn.Linear) else projection.nf


def _empty_like(factory, reference: nn.Module) -> nn.Module:
    """Builds ``factory()`` without initialising it, on the device and dtype of ``reference``'s weight."""
    with torch.device("meta"):
        module = factory()
    weight = reference.weight
    return module.to_empty(device=weight.device).to(weight.dtype)


def _give_biases(attention: nn.Module, names: tuple[str, ...], reference: torch.Tensor) -> None:
    """Gives the projections ``names`` of ``attention`` (an ``EmptyAttention`` itself) zero biases where they have
    none, on ``reference``'s device and dtype."""
    modules = [attention] if isinstance(attention, EmptyAttention) else [getattr(attention, name) for name in names]
    for module in modules:
        if getattr(module, "bias", None) is None:
            width = module.hidden_size if isinstance(module, EmptyAttention) else _out_features(module)
            module.bias = nn.Parameter(torch.zeros(width, device=reference.device, dtype=reference.dtype))


def _linear(reference: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised ``nn.Linear`` like ``reference`` (bias, device, dtype) with new sizes."""
    bias = _bias(reference) is not None
    return _empty_like(lambda: nn.Linear(in_features, out_features, bias=bias), reference)


# ----------------------------------------------------------------------------------------------------------------
# The families


class AttentionFamily:
    """What sentinel-lightning needs to know about one model family; the shared behaviour of every family.

    A subclass sets the class attributes and implements ``_slice_kept``, ``_resize_kept`` and ``tiny_config``.
    Without grouped-query attention (the default here) a family has one key/value head per query head.

    Attributes:
        model_type: The ``config.model_type`` this entry serves.
        layers: Dotted path from the causal LM to the list of decoder layers.
        attention: Attribute of a decoder layer that holds the attention module.
        output_projection: Attribute of the attention module that holds the output projection.
        cache_keywords: Keyword arguments under which the decoder layer passes the key/value cache to the
            attention module (what an ``EmptyAttention`` must read).
        grouped_query: Whether query heads share key/value heads (``K <= H``, see ``key_value_sources``).
        config_has_head_dim: Whether the config states ``head_dim`` explicitly, so that rewriting
            ``num_attention_heads`` / ``num_key_value_heads`` describes fewer heads of the same ``D``.
        bias_attribute: The config attribute that gives the attention projections biases (Llama's
            ``attention_bias``: query, key, value and output together), through which a config states an output
            bias that compaction adds; None when the family's config cannot state one alone (compaction then sets
            ``config.attention_output_bias``, see ``add_output_biases``).
        bias_projections: The projections ``bias_attribute`` gives biases to.
        merges_key_values: Whether query heads can read mixes of key/value heads (``merging``): separate
            ``k_proj`` / ``v_proj`` whose outputs are the keys and values, with nothing per head after them but
            the rotary embedding, which commutes with mixing heads.
        compacts_heads: Whether ``compact`` can remove some of a layer's heads exactly (False: only whole layers,
            see ``Olmo2Family``; gating and pruning work either way).
    """

    model_type: str = ""
    layers: str = ""
    attention: str = ""
    output_projection: str = ""
    cache_keywords: tuple[str, ...] = ("cache", "past_key_values")
    grouped_query: bool = False
    config_has_head_dim: bool = False
    bias_attribute: str | None = None
    bias_projections: tuple[str, ...] = ()
    merges_key_values: bool = False
    compacts_heads: bool = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_type={self.model_type!r})"

    # Where things are

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        """The ``L`` decoder layers of ``model``, in order."""
        module = model
        for name in self.layers.split("."):
            module = getattr(module, name)
        return list(module)

    def attention_of(self, layer: nn.Module) -> nn.Module:
        """The attention module of one decoder layer."""
        return getattr(layer, self.attention)

    def set_attention(self, layer: nn.Module, attention: nn.Module) -> None:
        """Puts ``attention`` into a decoder layer in place of its attention module."""
        setattr(layer, self.attention, attention)

    def output_projection_of(self, attention: nn.Module) -> nn.Module:
        """The output projection of an attention module: input ``[B, T, H * D]``, output ``[B, T, C]``."""
        return getattr(attention, self.output_projection)

    # Heads

    def head_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """``(L, H, D)`` of ``model``, as its config describes it."""
        config = model.config
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return len(self.decoder_layers(model)), num_heads, head_dim

    def num_key_value_heads(self, config: PretrainedConfig) -> int:
        """``K``, the key/value heads per layer that ``config`` describes (``H`` without grouped-query attention)."""
        return config.num_attention_heads

    def group_size(self, config: PretrainedConfig) -> int:
        """``G = H // K``, the query heads that share one key/value head."""
        return config.num_attention_heads // self.num_key_value_heads(config)

    def key_value_sources(self, kept: list[int], num_heads: int, num_kv_heads: int) -> list[int]:
        """The key/value heads a layer keeps with query heads ``kept``: those read by a kept query head, no repeats.

        Without grouped-query attention every kept query head keeps its own key/value head.

        Args:
            kept: The kept query heads of one layer, ascending (``h`` of them).
            num_heads: ``H`` of the layer before compaction.
            num_kv_heads: ``K`` of the layer before compaction.

        Returns:
            Original key/value head indices, ascending (``k <= min(h, K)`` of them).
        """
        group_size = self._kept_group_size(num_heads, num_kv_heads)
        return sorted({head // group_size for head in kept})

    def key_value_index(self, kept: list[int], num_heads: int, num_kv_heads: int) -> list[int]:
        """Which kept key/value head each kept query head reads: positions in ``key_value_sources``, ``h`` of them.

        Ascending, since query head ``q`` reads key/value head ``q // G``; every group keeps at least one query head.
        """
        group_size = self._kept_group_size(num_heads, num_kv_heads)
        position = {kv_head: i for i, kv_head in enumerate(self.key_value_sources(kept, num_heads, num_kv_heads))}
        return [position[head // group_size] for head in kept]

    def _kept_group_size(self, num_heads: int, num_kv_heads: int) -> int:
        """``G``: ``H // K`` with grouped-query attention, else 1 (each query head has its own key/value head)."""
        return num_heads // num_kv_heads if self.grouped_query else 1

    # Weight surgery

    def slice_heads(
        self, attention: nn.Module, kept: list[int], kv_sources: list[int], scale: torch.Tensor, head_dim: int
    ) -> dict[str, torch.Tensor]:
        """The projections' tensors for the kept heads, the gates folded into the output projection.

        Args:
            attention: The attention module before resizing.
            kept: Kept query heads (``h`` of them), ascending.
            kv_sources: Original key/value head of each kept key/value head (see ``key_value_sources``).
            scale: Gate value of each kept head, ``[h]``.
            head_dim: ``D``.

        Returns:
            New tensors by parameter name relative to ``attention`` (to copy into the module ``resize`` returns);
            only the output projection's bias when ``kept`` is empty.
        """
        if not kept:
            bias = _bias(self.output_projection_of(attention))
            return {} if bias is None else {"bias": bias.detach().clone()}
        return self._slice_kept(attention, kept, kv_sources, scale, head_dim)

    def resize(
        self, attention: nn.Module, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int
    ) -> nn.Module:
        """Gives ``attention`` uninitialised projections for ``num_heads`` query and ``num_kv_heads`` kv heads.

        Also sets the attributes the family's forward reads. Returns the module to put in the decoder layer:
        ``attention`` itself, or an ``EmptyAttention`` when ``num_heads`` is 0.
        """
        if num_heads == 0:
            return self.empty_attention(attention, layer_idx)
        self._resize_kept(attention, num_heads, num_kv_heads, head_dim)
        return attention

    def empty_attention(self, attention: nn.Module, layer_idx: int) -> EmptyAttention:
        """The ``EmptyAttention`` replacing ``attention`` when every head of layer ``layer_idx`` is pruned."""
        output = self.output_projection_of(attention)
        empty = EmptyAttention(_out_features(output), layer_idx, _bias(output) is not None, self.cache_keywords)
        return empty.to(device=output.weight.device, dtype=output.weight.dtype)

    # Output biases (output compensation)

    def output_matrix(self, attention: nn.Module) -> torch.Tensor:
        """The output projection's weight as ``[C, H * D]`` (GPT-2's ``Conv1D`` stores it transposed)."""
        projection = self.output_projection_of(attention)
        return projection.weight.T if isinstance(projection, Conv1D) else projection.weight

    def output_bias_of(self, attention: nn.Module) -> torch.Tensor | None:
        """The bias ``[C]`` an attention sublayer adds to its output (an ``EmptyAttention``'s own), or None."""
        if isinstance(attention, EmptyAttention):
            return attention.bias
        return _bias(self.output_projection_of(attention))

    def add_output_biases(self, model: nn.Module) -> None:
        """Gives every attention sublayer of ``model`` an output bias (zeros where it had none), stated in the config.

        Through ``bias_attribute`` where the family has one (the other projections it governs get zero biases, so
        that the stock modules describe the model), else as ``config.attention_output_bias = True``, which
        ``restore_output_biases`` reads when a model is built from the config. Nothing changes when every
        sublayer has an output bias already.
        """
        attentions = [self.attention_of(layer) for layer in self.decoder_layers(model)]
        if all(self.output_bias_of(attention) is not None for attention in attentions):
            return
        if self.bias_attribute is not None:
            setattr(model.config, self.bias_attribute, True)
            names = self.bias_projections
        else:
            setattr(model.config, OUTPUT_BIAS_ATTRIBUTE, True)
            names = (self.output_projection,)
        reference = next(model.parameters())
        for attention in attentions:
            _give_biases(attention, () if isinstance(attention, EmptyAttention) else names, reference)

    def restore_output_biases(self, model: nn.Module) -> None:
        """Gives a model built from a config with ``attention_output_bias`` its output biases (to be loaded)."""
        if getattr(model.config, OUTPUT_BIAS_ATTRIBUTE, False):
            reference = next(model.parameters())
            for layer in self.decoder_layers(model):
                attention = self.attention_of(layer)
                names = () if isinstance(attention, EmptyAttention) else (self.output_projection,)
                _give_biases(attention, names, reference)

    def set_query_width(self, attention: nn.Module, num_heads: int) -> None:
        """Makes a resized attention's forward split ``num_heads`` query heads off its fused projection (Phi-3);
        ``pruned_modeling.place_query_slots`` calls it with the number of query slots."""
        raise NotImplementedError(f"{self!r} has no fused query/key/value projection.")

    def _slice_kept(self, attention, kept, kv_sources, scale, head_dim) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self!r} does not implement _slice_kept.")

    def _resize_kept(self, attention: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        raise NotImplementedError(f"{self!r} does not implement _resize_kept.")

    # Tests

    def tiny_config(self, num_layers: int, num_heads: int, num_kv_heads: int, width: int, **common) -> PretrainedConfig:
        """A tiny config of this family (``tiny.tiny_config`` supplies ``common``: vocabulary and special tokens).

        Args:
            num_layers: ``L``.
            num_heads: ``H``.
            num_kv_heads: ``K`` (grouped-query families only).
            width: ``C``.
            **common: Keyword arguments every family's config takes.
        """
        raise NotImplementedError(f"{self!r} has no tiny config.")


class GPT2Family(AttentionFamily):
    """GPT-2: a fused ``c_attn`` ``Conv1D`` (weight ``[C, 3 * H * D]``: query, key and value sections) and ``c_proj``
    (weight ``[H * D, C]``); the forward splits ``c_attn``'s output at ``split_size`` and views heads of ``D``."""

    model_type, layers, attention, output_projection = "gpt2", "transformer.h", "attn", "c_proj"
    cache_keywords = ("cache", "past_key_values", "layer_past")

    def _slice_kept(self, attention, kept, kv_sources, scale, head_dim) -> dict[str, torch.Tensor]:
        width = attention.c_proj.weight.shape[0]  # H * D
        columns = torch.cat([_head_features(kept, head_dim, section * width) for section in range(3)])  # [3 * h * D]
        rows = _head_features(kept, head_dim)  # [h * D]
        output = attention.c_proj.weight  # [H * D, C]
        return {
            "c_attn.weight": attention.c_attn.weight[:, columns],  # [C, 3 * h * D]
            "c_attn.bias": attention.c_attn.bias[columns],
            "c_proj.weight": output[rows] * _feature_scale(scale, head_dim, output)[:, None],  # [h * D, C]
            "c_proj.bias": attention.c_proj.bias,
        }

    def _resize_kept(self, attention: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        width, hidden = num_heads * head_dim, attention.c_attn.weight.shape[0]
        attention.c_attn = _empty_like(lambda: Conv1D(3 * width, hidden), attention.c_attn)
        attention.c_proj = _empty_like(lambda: Conv1D(hidden, width), attention.c_proj)
        attention.split_size, attention.num_heads = width, num_heads

    def tiny_config(self, num_layers: int, num_heads: int, num_kv_heads: int, width: int, **common) -> PretrainedConfig:
        return GPT2Config(n_layer=num_layers, n_head=num_heads, n_embd=width, n_positions=256, **common)


class GPTNeoXFamily(AttentionFamily):
    """GPT-NeoX: a fused ``query_key_value`` ``nn.Linear`` whose weight ``[H * 3 * D, C]`` is laid out per head as
    ``[H, 3 (q, k, v), D]`` rows (the forward views its output as ``[..., H, 3 * D]`` and chunks the last dimension
    in three); ``dense`` weight ``[C, H * D]``."""

    model_type, layers, attention, output_projection = "gpt_neox", "gpt_neox.layers", "attention", "dense"
    cache_keywords = ("cache", "past_key_values", "layer_past")

    def _slice_kept(self, attention, kept, kv_sources, scale, head_dim) -> dict[str, torch.Tensor]:
        fused = attention.query_key_value
        index = torch.tensor(kept, dtype=torch.long)  # [h]
        # [H * 3 * D, C] -> [H, 3 * D, C] -> [h, 3 * D, C] -> [h * 3 * D, C]
        tensors = {"query_key_value.weight": fused.weight.unflatten(0, (-1, 3 * head_dim))[index].flatten(0, 1)}
        if _bias(fused) is not None:  # [H * 3 * D] -> [H, 3 * D] -> [h, 3 * D] -> [h * 3 * D]
            tensors["query_key_value.bias"] = fused.bias.unflatten(0, (-1, 3 * head_dim))[index].flatten()
        weight = attention.dense.weight  # [C, H * D]
        tensors["dense.weight"] = weight[:, _head_features(kept, head_dim)] * _feature_scale(scale, head_dim, weight)
        if _bias(attention.dense) is not None:
            tensors["dense.bias"] = attention.dense.bias
        return tensors

    def _resize_kept(self, attention: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        width, hidden = num_heads * head_dim, attention.query_key_value.in_features
        attention.query_key_value = _linear(attention.query_key_value, hidden, 3 * width)
        attention.dense = _linear(attention.dense, width, hidden)

    def tiny_config(self, num_layers: int, num_heads: int, num_kv_heads: int, width: int, **common) -> PretrainedConfig:
        return GPTNeoXConfig(
            num_hidden_layers=num_layers, num_attention_heads=num_heads, hidden_size=width,
            intermediate_size=2 * width, **common,
        )


class SeparateProjectionsFamily(AttentionFamily):
    """Separate ``q_proj``, ``k_proj``, ``v_proj`` (weights ``[H * D, C]``, ``[K * D, C]``, ``[K * D, C]``) and an
    output ``nn.Linear`` (weight ``[C, H * D]``): OPT and the Llama family share this surgery."""

    attention = "self_attn"

    def _slice_kept(self, attention, kept, kv_sources, scale, head_dim) -> dict[str, torch.Tensor]:
        kv_rows = _head_features(kv_sources, head_dim)  # [k * D]
        rows = {"q_proj": _head_features(kept, head_dim), "k_proj": kv_rows, "v_proj": kv_rows}
        tensors = {}
        for name, index in rows.items():
            projection = getattr(attention, name)
            tensors[f"{name}.weight"] = projection.weight[index]  # [h * D or k * D, C]
            if _bias(projection) is not None:
                tensors[f"{name}.bias"] = projection.bias[index]
        name, projection = self.output_projection, self.output_projection_of(attention)
        weight = projection.weight  # [C, H * D]
        tensors[f"{name}.weight"] = weight[:, _head_features(kept, head_dim)] * _feature_scale(scale, head_dim, weight)
        if _bias(projection) is not None:
            tensors[f"{name}.bias"] = projection.bias
        return tensors

    def _resize_kept(self, attention: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        output, hidden = self.output_projection_of(attention), attention.q_proj.in_features
        attention.q_proj = _linear(attention.q_proj, hidden, num_heads * head_dim)
        attention.k_proj = _linear(attention.k_proj, hidden, num_kv_heads * head_dim)
        attention.v_proj = _linear(attention.v_proj, hidden, num_kv_heads * head_dim)
        setattr(attention, self.output_projection, _linear(output, num_heads * head_dim, output.out_features))


class OPTFamily(SeparateProjectionsFamily):
    """OPT: separate projections, ``K == H``; the forward views heads with ``num_heads``."""

    model_type, layers, output_projection = "opt", "model.decoder.layers", "out_proj"

    def _resize_kept(self, attention: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super()._resize_kept(attention, num_heads, num_kv_heads, head_dim)
        attention.num_heads = num_heads

    def tiny_config(self, num_layers: int, num_heads: int, num_kv_heads: int, width: int, **common) -> PretrainedConfig:
        return OPTConfig(
            num_hidden_layers=num_layers, num_attention_heads=num_heads, hidden_size=width,
            ffn_dim=2 * width, word_embed_proj_dim=width, **common,
        )


class GroupedQueryFamily(SeparateProjectionsFamily):
    """Llama, Mistral, Qwen2, Qwen3, Gemma 3, SmolLM3: grouped-query attention, query head ``q`` reads key/value
    head ``q // G``.

    Query heads are removed one by one and a key/value head only when every query head of its group is pruned;
    key/value heads are never repeated, so the key/value projections and cache only shrink. A layer whose kept
    groups stay equal (each kept key/value head read by the same number ``g`` of query heads) keeps the stock
    module with ``num_key_value_groups = g``. Kept groups of different sizes (say 3, 1 and 2 query heads) cannot
    be expressed by one ``num_key_value_groups``: ``pruned_modeling.resize_attention`` then runs the layer's
    query heads in equal slots (``pruned_modeling.QuerySlots``).

    What the stock forward does between the projections and the output projection is left to it: Qwen3's and
    Gemma 3's RMSNorms on each query and key head (weight ``[D]``, shared by the heads, so kept as it is),
    Gemma 3's ``query_pre_attn_scalar`` and sliding layers, SmolLM3's layers without rotary embeddings.

    Args:
        model_type: The ``config.model_type`` served.
        config_class: The family's config class (for ``tiny_config``).
        bias_attribute: See ``AttentionFamily``; None when ``o_proj`` never has a bias (Mistral, Qwen2).
        tiny_settings: ``(num_layers, head_dim) -> dict``: the family's own settings in ``tiny_config`` (an explicit
            ``head_dim``, sliding or rotary-free layers), or None.
        merges_key_values: False for a family that normalises each key head after ``k_proj`` (Qwen3, Gemma 3):
            the norm of a mix of heads is not a mix of normalised heads, so ``merging`` would not be exact.
    """

    layers, output_projection = "model.layers", "o_proj"
    grouped_query = config_has_head_dim = merges_key_values = True

    def __init__(
        self, model_type: str, config_class: type[PretrainedConfig], bias_attribute: str | None = None,
        tiny_settings=None, merges_key_values: bool = True,
    ) -> None:
        self.model_type = model_type
        self.merges_key_values = merges_key_values and type(self).merges_key_values
        self.config_class = config_class
        self.bias_attribute = bias_attribute
        self.bias_projections = ("q_proj", "k_proj", "v_proj", "o_proj")
        self.tiny_settings = tiny_settings

    def num_key_value_heads(self, config: PretrainedConfig) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def _slice_kept(self, attention, kept, kv_sources, scale, head_dim) -> dict[str, torch.Tensor]:
        tensors = super()._slice_kept(attention, kept, kv_sources, scale, head_dim)
        for name, parameter in attention.named_parameters():  # per-head norms (weight [D]) are not cut
            tensors.setdefault(name, parameter)
        return tensors

    def _resize_kept(self, attention: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super()._resize_kept(attention, num_heads, num_kv_heads, head_dim)
        attention.num_key_value_groups = num_heads // num_kv_heads  # exact for equal groups only (class docstring)

    def tiny_config(self, num_layers: int, num_heads: int, num_kv_heads: int, width: int, **common) -> PretrainedConfig:
        settings = self.tiny_settings(num_layers, width // num_heads) if self.tiny_settings else {}
        return self.config_class(
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            hidden_size=width, intermediate_size=2 * width, **settings, **common,
        )


class LayerHeadCount:
    """The model config as one decoder layer's attention sees it: its own ``num_attention_heads``, the rest shared.

    Phi-3's forward splits the fused projection's output at ``config.num_attention_heads * head_dim``; a layer
    that keeps ``h`` query heads reads ``h`` there while every other attribute (``_attn_implementation`` included,
    read and written) stays the model's.
    """

    def __init__(self, config: PretrainedConfig, num_attention_heads: int) -> None:
        object.__setattr__(self, "shared", config.shared if isinstance(config, LayerHeadCount) else config)
        object.__setattr__(self, "num_attention_heads", num_attention_heads)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "shared":  # copy and pickle look these up before the state is set
            raise AttributeError(name)
        return getattr(self.shared, name)

    def __setattr__(self, name: str, value) -> None:
        if name == "num_attention_heads":
            object.__setattr__(self, name, value)
        else:
            setattr(self.shared, name, value)

    def __repr__(self) -> str:
        return f"LayerHeadCount(num_attention_heads={self.num_attention_heads})"


class Phi3Family(GroupedQueryFamily):
    """Phi-3 / Phi-4-mini: grouped-query attention through one fused ``qkv_proj`` (weight ``[(H + 2K) * D, C]``:
    query, key and value sections), ``o_proj`` weight ``[C, H * D]``, neither with a bias; partial rotary
    embeddings (inside each head, so heads are cut whole).

    The fused projection is cut in place (its three sections' kept rows), never split into modules, so a uniform
    layout stays a stock Phi-3. The forward splits the query section at ``config.num_attention_heads * D`` and the
    key section at ``self.num_key_value_heads * D``: a resized layer gets both, its head count through a
    ``LayerHeadCount`` in place of its ``config`` (with unequal kept groups, the number of query slots of its
    ``pruned_modeling.QueryKeyValueSlots``). Its config cannot state an output bias (compaction then sets
    ``attention_output_bias`` and the folder ships its modeling code). Its key/value heads are not merged
    (``merging`` mixes separate key and value projections).
    """

    merges_key_values = False

    def __init__(self) -> None:
        super().__init__("phi3", Phi3Config, tiny_settings=lambda num_layers, head_dim: {
            "head_dim": head_dim, "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5},
        })

    def _slice_kept(self, attention, kept, kv_sources, scale, head_dim) -> dict[str, torch.Tensor]:
        fused, output = attention.qkv_proj, attention.o_proj
        query_width = output.in_features  # H * D
        kv_width = (fused.out_features - query_width) // 2  # K * D
        rows = torch.cat([  # [h * D + 2 * k * D]: the kept query heads, then their key and value heads
            _head_features(kept, head_dim),
            _head_features(kv_sources, head_dim, query_width),
            _head_features(kv_sources, head_dim, query_width + kv_width),
        ])
        tensors = {"qkv_proj.weight": fused.weight[rows]}  # [h * D + 2 * k * D, C]
        weight = output.weight  # [C, H * D]
        tensors["o_proj.weight"] = weight[:, _head_features(kept, head_dim)] * _feature_scale(scale, head_dim, weight)
        for name in ("qkv_proj", "o_proj"):  # biases only where output compensation gave one
            if _bias(getattr(attention, name)) is not None:
                bias = getattr(attention, name).bias
                tensors[f"{name}.bias"] = bias[rows] if name == "qkv_proj" else bias
        return tensors

    def _resize_kept(self, attention: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        hidden = attention.qkv_proj.in_features
        attention.qkv_proj = _linear(attention.qkv_proj, hidden, (num_heads + 2 * num_kv_heads) * head_dim)
        attention.o_proj = _linear(attention.o_proj, num_heads * head_dim, attention.o_proj.out_features)
        attention.num_key_value_heads = num_kv_heads
        attention.num_key_value_groups = num_heads // num_kv_heads  # equal groups; else see place_query_slots
        self.set_query_width(attention, num_heads)

    def set_query_width(self, attention: nn.Module, num_heads: int) -> None:
        attention.config = LayerHeadCount(attention.config, num_heads)


class Olmo2Family(GroupedQueryFamily):
    """OLMo 2: separate projections, with RMSNorms over the whole query and key projections (``q_norm`` weight
    ``[H * D]``, ``k_norm`` ``[K * D]``) before the heads are split.

    The norm of each kept head's query divides by the root mean square of every head's query: removing a head
    changes what the heads that stay compute, and no smaller projection gives the same value (it depends on the
    removed rows' output for every input). Gating and pruning work; ``compact`` removes whole layers only (a layer
    whose heads are all pruned is exact) and refuses any other layout with an error saying so.
    """

    compacts_heads = merges_key_values = False

    def __init__(self) -> None:
        super().__init__("olmo2", Olmo2Config, bias_attribute="attention_bias")

    def _slice_kept(self, attention, kept, kv_sources, scale, head_dim) -> dict[str, torch.Tensor]:
        num_heads = attention.q_proj.out_features // head_dim
        if len(kept) < num_heads:
            raise ValueError(
                f"compact cannot remove {num_heads - len(kept)} of a layer's {num_heads} heads from OLMo 2 "
                f"(model_type={self.model_type!r}) exactly: its q_norm and k_norm normalise the whole query and key "
                "projections (num_heads * head_dim), so removing a head changes the normalisation of the heads that "
                "stay. Prune whole layers (HeadPruning(unit='layer')), whose removal is exact, or keep the gated model."
            )
        return super()._slice_kept(attention, kept, kv_sources, scale, head_dim)


def _gemma3_settings(num_layers: int, head_dim: int) -> dict:
    """Sliding and full layers alternating, a window shorter than the tests' sequences, a scalar that is not D."""
    layer_types = ["sliding_attention" if index % 2 == 0 else "full_attention" for index in range(num_layers)]
    return {"head_dim": head_dim, "layer_types": layer_types, "sliding_window": 6, "query_pre_attn_scalar": 16}


FAMILIES: dict[str, AttentionFamily] = {
    family.model_type: family
    for family in (
        GPT2Family(),
        OPTFamily(),
        GPTNeoXFamily(),
        GroupedQueryFamily("llama", LlamaConfig, bias_attribute="attention_bias"),  # Mistral, Qwen2: o_proj never
        GroupedQueryFamily("mistral", MistralConfig),
        GroupedQueryFamily("qwen2", Qwen2Config),
        GroupedQueryFamily("qwen3", Qwen3Config, "attention_bias", lambda num_layers, head_dim: {
            "head_dim": head_dim, "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1,
        }, merges_key_values=False),
        GroupedQueryFamily("gemma3_text", Gemma3TextConfig, "attention_bias", _gemma3_settings,
                           merges_key_values=False),
        GroupedQueryFamily("smollm3", SmolLM3Config, "attention_bias", lambda num_layers, head_dim: {
            "no_rope_layer_interval": 2,  # every second layer without rotary embeddings
        }),
        Phi3Family(),
        Olmo2Family(),
    )
}


# ----------------------------------------------------------------------------------------------------------------
# Model-level look-ups


def family_of(model: nn.Module) -> AttentionFamily:
    """The family of a Hugging Face causal LM, by ``config.model_type``.

    Raises:
        ValueError: naming the model's class, its ``model_type`` and the supported families.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"Unsupported model {type(model).__name__} (model_type={model_type!r}): sentinel-lightning gates the "
            f"attention heads of these families: {', '.join(sorted(FAMILIES))}."
        )
    return FAMILIES[model_type]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The ``L`` decoder layers of a supported causal LM, in order."""
    return family_of(model).decoder_layers(model)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in order (``L`` of them)."""
    family = family_of(model)
    return [family.attention_of(layer) for layer in family.decoder_layers(model)]


def output_projections(model: nn.Module) -> list[nn.Module]:
    """The attention output projection (input ``[B, T, H * D]``) of every decoder layer, in order."""
    family = family_of(model)
    return [family.output_projection_of(attention) for attention in attention_modules(model)]


def head_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(L, H, D)`` of a supported causal LM."""
    return family_of(model).head_shape(model)


def num_key_value_heads(model: nn.Module) -> int:
    """``K``, the key/value heads per layer of a supported causal LM (``H`` without grouped-query attention)."""
    return family_of(model).num_key_value_heads(model.config)
