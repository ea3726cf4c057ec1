"""Physically removes pruned attention heads: smaller, faster models that save and load.

A gate at 0 still costs its head's full computation. ``compact`` turns a gated model into an ordinary model of
the same class whose query, key, value and output projections only hold the heads that are still active, with
the active gates' values folded into the output projection (a head gated at 0.5 keeps computing half its output).

Per family (see ``gates.ADAPTERS``):

- GPT-2: the fused ``c_attn`` (a ``Conv1D``, weight ``[in, 3 * heads * head_dim]``) keeps the kept heads'
  columns in each of its query, key and value sections; ``split_size`` becomes ``kept * head_dim``.
- OPT: ``q_proj``, ``k_proj`` and ``v_proj`` keep the kept heads' rows; ``num_heads`` becomes ``kept``.
- GPT-NeoX: the fused ``query_key_value`` is laid out per head as ``[heads, 3 (q, k, v), head_dim]`` rows (its
  forward views the output as ``[..., heads, 3 * head_dim]`` and chunks the last dimension in three).
- Llama, Mistral, Qwen2 (grouped-query attention, query head ``h`` reads key/value head ``h // group_size``):
  query heads are removed one by one and a key/value head only when every query head of its group is pruned.
  The kept groups may then hold different numbers of query heads (say 3, 1 and 2), which one
  ``num_key_value_groups`` cannot express. Such a layer duplicates key/value heads so that every group has the
  same size: with ``g`` the greatest common divisor of the kept group sizes, a key/value head whose group keeps
  ``c`` query heads appears ``c / g`` times and the layer's ``num_key_value_groups`` is ``g``. This is exact
  (rotary embeddings do not depend on the head), keeps the stock attention modules and every attention
  implementation (eager, SDPA, flash), and costs only the duplicated rows of ``k_proj``/``v_proj`` and their
  cache; a layer whose groups stay equal duplicates nothing. On SmolLM2 (9 query heads in 3 groups), keeping 5 or 6
  heads per layer usually leaves unequal groups and 5 or 6 key/value heads instead of 3 (see ``docs/speed.md``).

A layer whose heads are all pruned gets an ``EmptyAttention``: no projection, no attention, its output is the
output projection's bias (or zero). It still writes a one-number-per-token placeholder into the key/value cache
so that the cache knows how many tokens it has seen.

The config of a compacted model records what was kept: ``config.kept_heads[l]`` lists the original query heads
that layer ``l`` kept and ``config.kept_key_value_heads[l]`` the original key/value head of each of its key/value
heads (duplicates included; equal to ``kept_heads[l]`` for families without grouped-query attention).
``load_pruned`` rebuilds the model from these. When every layer keeps the same numbers of query and key/value
heads (Llama family, whose config has an explicit ``head_dim``), ``num_attention_heads`` and
``num_key_value_heads`` are rewritten as well (where the config class accepts them: ``LlamaConfig`` wants
``hidden_size`` to be a multiple of ``num_attention_heads``), so the directory also loads with plain
``AutoModelForCausalLM.from_pretrained``. Other directories make ``from_pretrained`` fail on the weights' shapes
rather than load wrong weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.pytorch_utils import Conv1D

from sentinel_lightning.gates import (
    ADAPTERS,
    HeadGates,
    adapter_for,
    decoder_layers,
    detach_gates,
    find_gates,
    head_shape,
)
from sentinel_lightning.pretrained import forget_quantization

GROUPED_QUERY_FAMILIES = ("llama", "mistral", "qwen2")


class EmptyAttention(nn.Module):
    """The attention of a layer whose heads are all pruned: returns the output projection's bias, or zero.

    Args:
        hidden_size: Width of the model.
        layer_idx: Index of the decoder layer, for the key/value cache.
        bias: Whether the removed output projection had a bias (kept as ``self.bias``).
    """

    def __init__(self, hidden_size: int, layer_idx: int, bias: bool) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        """Maps ``hidden_states`` ``[batch, seq, hidden]`` to the constant ``[batch, seq, hidden]`` output."""
        names = ("cache", "past_key_values", "layer_past")  # what the families call it
        cache = next((kwargs[name] for name in names if kwargs.get(name) is not None), None)
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)  # GPT-2's encoder-decoder cache
            # The cache counts tokens by the sequence length of its keys, from the first layer: keep it counting.
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        output = torch.zeros_like(hidden_states)
        if self.bias is not None:
            output = output + self.bias
        return output, None

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, bias={self.bias is not None}"


# ----------------------------------------------------------------------------------------------------------------
# Counting


def count_parameters(model: nn.Module) -> int:
    """Number of distinct weights of a model (tied weights once, gates excluded)."""
    return sum(parameter.numel() for parameter in _weights(model))


def weight_bytes(model: nn.Module) -> int:
    """Bytes taken by the distinct weights of a model (tied weights once, gates excluded)."""
    return sum(parameter.numel() * parameter.element_size() for parameter in _weights(model))


def _weights(model: nn.Module) -> list[nn.Parameter]:
    gates = [module for module in model.modules() if isinstance(module, HeadGates)]
    gate_parameters = {id(parameter) for module in gates for parameter in module.parameters()}
    return [parameter for parameter in model.parameters() if id(parameter) not in gate_parameters]


# ----------------------------------------------------------------------------------------------------------------
# Compaction


def causal_lm_of(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face causal LM of ``model``: the model itself, or the one a LightningModule holds."""
    if isinstance(model, PreTrainedModel):
        return model
    for submodule in model.modules():
        if isinstance(submodule, PreTrainedModel):
            return submodule
    raise ValueError(
        f"model is a {type(model).__name__} holding no Hugging Face PreTrainedModel; pass a causal LM or a "
        "LightningModule (such as GatedLanguageModel) that holds one."
    )


@torch.no_grad()
def compact(model: nn.Module) -> PreTrainedModel:
    """Returns a copy of a gated model with its pruned heads removed from the weights and its gates folded in.

    The input is not modified. The result is an ordinary model of the same class, in eval mode, without gates or
    hooks, whose logits equal the gated model's (see the module docstring for how each family is cut).

    Args:
        model: A gated causal LM (see ``attach_gates``), or a LightningModule holding one. A model without gates
            is returned as an eval-mode copy (nothing is pruned).

    Returns:
        The compacted model. ``config.kept_heads`` and ``config.kept_key_value_heads`` (lists over layers) record
        the original heads each layer kept.
    """
    source = causal_lm_of(model)
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
    adapter = adapter_for(compacted)
    num_layers, num_heads, head_dim = head_shape(compacted)
    if (gates.num_layers, gates.num_heads) != (num_layers, num_heads):
        raise ValueError(
            f"The gates are [{gates.num_layers}, {gates.num_heads}] but the model has {num_layers} layers of "
            f"{num_heads} heads; attach the gates to this model with attach_gates."
        )
    active = gates.active.detach().cpu().clone()  # [num_layers, num_heads]
    values = gates.values.detach().cpu().clone()  # [num_layers, num_heads]
    detach_gates(compacted)
    previous_heads, previous_kv_heads = _previous_record(compacted, num_layers, num_heads)
    num_kv_heads = _num_kv_heads(compacted)

    kept_heads, kept_kv_heads = [], []
    for index, layer in enumerate(decoder_layers(compacted)):
        kept = active[index].nonzero().flatten().tolist()
        kv_sources = kept
        if adapter.family in GROUPED_QUERY_FAMILIES:
            kv_sources = _key_value_sources(kept, num_heads, num_kv_heads)
        attention = getattr(layer, adapter.attention)
        tensors = _SLICERS[adapter.family](attention, kept, kv_sources, values[index, kept], head_dim)
        if len(kept) < num_heads or len(kv_sources) != num_kv_heads:
            attention = _resized_attention(attention, adapter.family, index, len(kept), len(kv_sources), head_dim)
            setattr(layer, adapter.attention, attention)
        _copy_tensors(attention, tensors)
        kept_heads.append([previous_heads[index][head] for head in kept])
        kept_kv_heads.append([previous_kv_heads[index][head] for head in kv_sources])
    _record(compacted.config, adapter.family, kept_heads, kept_kv_heads, head_dim)
    return compacted.eval()


def _num_kv_heads(model: PreTrainedModel) -> int:
    return getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads


def _previous_record(model: PreTrainedModel, num_layers: int, num_heads: int) -> tuple[list, list]:
    """The original heads of each current head, when ``model`` was compacted before, else the identity."""
    kept = getattr(model.config, "kept_heads", None)
    if kept is None:
        identity = [list(range(max(num_heads, _num_kv_heads(model)))) for _ in range(num_layers)]
        return identity, identity
    if any(len(heads) != num_heads for heads in kept):
        raise ValueError(
            f"This model was compacted before with different numbers of heads per layer "
            f"({[len(heads) for heads in kept]}); gates of {num_heads} heads per layer cannot describe it."
        )
    return kept, getattr(model.config, "kept_key_value_heads", kept)


def _key_value_sources(kept: list[int], num_heads: int, num_kv_heads: int) -> list[int]:
    """The key/value head of each compacted key/value head, duplicated so that every group has the same size.

    Args:
        kept: The kept query heads of one layer, ascending.
        num_heads: Query heads of the layer before compaction.
        num_kv_heads: Key/value heads of the layer before compaction.

    Returns:
        Key/value head indices (with repeats); compacted query head ``i`` reads compacted key/value head
        ``i // (len(kept) // len(result))``.
    """
    group_size = num_heads // num_kv_heads
    counts = [0] * num_kv_heads
    for head in kept:
        counts[head // group_size] += 1
    kept_groups = [count for count in counts if count]
    if not kept_groups:
        return []
    uniform = math.gcd(*kept_groups)
    return [kv_head for kv_head, count in enumerate(counts) for _ in range(count // uniform)]


def _record(config, family: str, kept_heads: list[list[int]], kept_kv_heads: list[list[int]], head_dim: int) -> None:
    """Writes the kept heads into ``config`` and, where stock modules can express it, the uniform head counts."""
    config.kept_heads = kept_heads
    config.kept_key_value_heads = kept_kv_heads
    shapes = {(len(heads), len(kv_heads)) for heads, kv_heads in zip(kept_heads, kept_kv_heads)}
    if family not in GROUPED_QUERY_FAMILIES or len(shapes) != 1:
        return
    (num_heads, num_kv_heads), = shapes
    if num_heads == 0:
        return
    missing = object()
    names = ("num_attention_heads", "num_key_value_heads", "head_dim")
    before = {name: getattr(config, name, missing) for name in names}
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = num_heads, num_kv_heads, head_dim
    try:
        config.validate()
    except Exception:  # e.g. LlamaConfig insists that hidden_size is a multiple of num_attention_heads
        for name, value in before.items():
            if value is missing:
                delattr(config, name)
            else:
                setattr(config, name, value)


def _head_features(heads: list[int], head_dim: int, offset: int = 0) -> torch.Tensor:
    """Feature indices ``[len(heads) * head_dim]`` of ``heads`` in a ``[heads * head_dim]`` layout."""
    heads = torch.tensor(heads, dtype=torch.long).reshape(-1, 1)
    return (offset + heads * head_dim + torch.arange(head_dim)).flatten()


def _feature_scale(scale: torch.Tensor, head_dim: int, like: torch.Tensor) -> torch.Tensor:
    """Each kept head's gate repeated over its features: ``[kept]`` -> ``[kept * head_dim]``."""
    return scale.repeat_interleave(head_dim).to(device=like.device, dtype=like.dtype)


def _bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def _empty_tensors(output: nn.Module) -> dict[str, torch.Tensor]:
    bias = _bias(output)
    return {} if bias is None else {"bias": bias.detach().clone()}


def _slice_gpt2(attention, kept, kv_sources, scale, head_dim) -> dict[str, torch.Tensor]:
    """GPT-2: ``c_attn`` weight ``[hidden, 3 * H * D]`` (``Conv1D`` is ``[in, out]``), ``c_proj`` ``[H * D, hidden]``.

    Returns the new tensors by parameter name (relative to ``attention``); the same for every ``_slice_*``.
    """
    if not kept:
        return _empty_tensors(attention.c_proj)
    width = attention.c_proj.weight.shape[0]  # H * D
    columns = torch.cat([_head_features(kept, head_dim, section * width) for section in range(3)])  # q, k, v
    rows = _head_features(kept, head_dim)
    output = attention.c_proj.weight
    return {
        "c_attn.weight": attention.c_attn.weight[:, columns],
        "c_attn.bias": attention.c_attn.bias[columns],
        "c_proj.weight": output[rows] * _feature_scale(scale, head_dim, output)[:, None],
        "c_proj.bias": attention.c_proj.bias,
    }


def _slice_separate(attention, kept, kv_sources, scale, head_dim, names) -> dict[str, torch.Tensor]:
    """Separate query, key, value and output ``nn.Linear`` projections (OPT and the Llama family)."""
    query, key, value, output = names
    if not kept:
        return _empty_tensors(getattr(attention, output))
    kv_rows = _head_features(kv_sources, head_dim)
    rows = {query: _head_features(kept, head_dim), key: kv_rows, value: kv_rows}
    tensors = {}
    for name, index in rows.items():
        projection = getattr(attention, name)
        tensors[f"{name}.weight"] = projection.weight[index]
        if _bias(projection) is not None:
            tensors[f"{name}.bias"] = projection.bias[index]
    projection = getattr(attention, output)
    weight = projection.weight  # [hidden, H * D]
    tensors[f"{output}.weight"] = weight[:, _head_features(kept, head_dim)] * _feature_scale(scale, head_dim, weight)
    if _bias(projection) is not None:
        tensors[f"{output}.bias"] = projection.bias
    return tensors


def _slice_gpt_neox(attention, kept, kv_sources, scale, head_dim) -> dict[str, torch.Tensor]:
    """GPT-NeoX: ``query_key_value`` weight ``[H * 3 * D, hidden]``, rows ``[H, 3 (q, k, v), D]``; ``dense``
    ``[hidden, H * D]``."""
    if not kept:
        return _empty_tensors(attention.dense)
    fused = attention.query_key_value
    index = torch.tensor(kept, dtype=torch.long)
    tensors = {"query_key_value.weight": fused.weight.unflatten(0, (-1, 3 * head_dim))[index].flatten(0, 1)}
    if _bias(fused) is not None:
        tensors["query_key_value.bias"] = fused.bias.unflatten(0, (-1, 3 * head_dim))[index].flatten()
    weight = attention.dense.weight  # [hidden, H * D]
    tensors["dense.weight"] = weight[:, _head_features(kept, head_dim)] * _feature_scale(scale, head_dim, weight)
    if _bias(attention.dense) is not None:
        tensors["dense.bias"] = attention.dense.bias
    return tensors


def _slice_opt(attention, kept, kv_sources, scale, head_dim):
    return _slice_separate(attention, kept, kv_sources, scale, head_dim, ("q_proj", "k_proj", "v_proj", "out_proj"))


def _slice_llama(attention, kept, kv_sources, scale, head_dim):
    return _slice_separate(attention, kept, kv_sources, scale, head_dim, ("q_proj", "k_proj", "v_proj", "o_proj"))


_SLICERS = {
    "gpt2": _slice_gpt2,
    "opt": _slice_opt,
    "gpt_neox": _slice_gpt_neox,
    "llama": _slice_llama,
    "mistral": _slice_llama,
    "qwen2": _slice_llama,
}


def _copy_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copies ``tensors`` (names relative to ``module``) into the module's parameters of the same shapes."""
    parameters = dict(module.named_parameters())
    for name, tensor in tensors.items():
        parameters[name].copy_(tensor.contiguous())


# ----------------------------------------------------------------------------------------------------------------
# Shapes: shared by compaction (which then copies the weights in) and loading (which loads them).


def _empty_like(factory, reference: nn.Module) -> nn.Module:
    """Builds ``factory()`` without initialising it, on the device and dtype of ``reference``'s weight."""
    with torch.device("meta"):
        module = factory()
    weight = reference.weight
    return module.to_empty(device=weight.device).to(weight.dtype)


def _linear(reference: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    bias = _bias(reference) is not None
    return _empty_like(lambda: nn.Linear(in_features, out_features, bias=bias), reference)


def _resized_attention(
    attention: nn.Module, family: str, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int
) -> nn.Module:
    """Gives ``attention`` uninitialised projections for ``num_heads`` query and ``num_kv_heads`` key/value heads.

    Sets the attributes its forward reads. Returns the module to put in the decoder layer: ``attention`` itself,
    or an ``EmptyAttention`` when ``num_heads`` is 0.
    """
    output_name = ADAPTERS[family].output_projection
    output = getattr(attention, output_name)
    if num_heads == 0:
        hidden = output.weight.shape[1] if isinstance(output, Conv1D) else output.weight.shape[0]
        empty = EmptyAttention(hidden, layer_idx, bias=_bias(output) is not None)
        return empty.to(device=output.weight.device, dtype=output.weight.dtype)
    width = num_heads * head_dim
    if family == "gpt2":
        hidden = attention.c_attn.weight.shape[0]
        attention.c_attn = _empty_like(lambda: Conv1D(3 * width, hidden), attention.c_attn)
        attention.c_proj = _empty_like(lambda: Conv1D(hidden, width), attention.c_proj)
        attention.split_size, attention.num_heads = width, num_heads
    elif family == "gpt_neox":
        hidden = attention.query_key_value.in_features
        attention.query_key_value = _linear(attention.query_key_value, hidden, 3 * width)
        attention.dense = _linear(attention.dense, width, hidden)
    else:
        query, key, value = attention.q_proj, attention.k_proj, attention.v_proj
        hidden = query.in_features
        attention.q_proj = _linear(query, hidden, width)
        attention.k_proj = _linear(key, hidden, num_kv_heads * head_dim)
        attention.v_proj = _linear(value, hidden, num_kv_heads * head_dim)
        setattr(attention, output_name, _linear(output, width, output.out_features))
        if family == "opt":
            attention.num_heads = num_heads
        else:
            attention.num_key_value_groups = num_heads // num_kv_heads
    return attention


def _rebuild_layers(model: PreTrainedModel) -> None:
    """Gives a model built from a compacted config the per-layer head counts its config records."""
    config = model.config
    kept_heads = getattr(config, "kept_heads", None)
    if kept_heads is None:
        return
    kept_kv_heads = getattr(config, "kept_key_value_heads", None) or kept_heads
    layers = decoder_layers(model)
    if not (len(kept_heads) == len(kept_kv_heads) == len(layers)):
        raise ValueError(
            f"config.kept_heads has {len(kept_heads)} and config.kept_key_value_heads {len(kept_kv_heads)} layers, "
            f"but the model has {len(layers)} decoder layers."
        )
    adapter = adapter_for(model)
    _, _, head_dim = head_shape(model)
    for index, (layer, heads, kv_heads) in enumerate(zip(layers, kept_heads, kept_kv_heads)):
        if heads and len(heads) % max(len(kv_heads), 1):
            raise ValueError(
                f"config.kept_heads: layer {index} keeps {len(heads)} query heads, not a multiple of its "
                f"{len(kv_heads)} key/value heads."
            )
        attention = getattr(layer, adapter.attention)
        resized = _resized_attention(attention, adapter.family, index, len(heads), len(kv_heads), head_dim)
        setattr(layer, adapter.attention, resized)


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading


@contextlib.contextmanager
def _without_quantization_config(model: PreTrainedModel):
    """Hides a left-over ``quantization_config`` (a GGUF origin) of a de-quantised model while it is saved."""
    config = model.config
    if getattr(config, "quantization_config", None) is None:
        yield
        return
    quantized = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if quantized:
        raise ValueError(
            f"model holds quantised weights ({quantized[:3]}...); save_pruned saves de-quantised (floating point) "
            "models only."
        )
    saved = config.quantization_config, getattr(model, "hf_quantizer", None)
    del config.quantization_config
    model.hf_quantizer = None
    try:
        yield
    finally:
        config.quantization_config, model.hf_quantizer = saved


def save_pruned(model: nn.Module, directory: str, tokenizer=None) -> str:
    """Saves a pruned model (compacting it first when it still has gates) as config, safetensors and tokenizer.

    Args:
        model: A compacted model, or a gated model / LightningModule (compacted here; the input is not modified).
        directory: Folder to write into (created if missing).
        tokenizer: A tokenizer to save alongside, or None.

    Returns:
        ``directory``, which ``load_pruned`` (and, for uniform Llama-family models, ``from_pretrained``) loads.
    """
    causal_lm = causal_lm_of(model)
    if find_gates(causal_lm) is not None:
        causal_lm = compact(causal_lm)
    os.makedirs(directory, exist_ok=True)
    with _without_quantization_config(causal_lm):
        causal_lm.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_pruned(directory: str, **kwargs: Any) -> PreTrainedModel:
    """Loads a model written by ``save_pruned``, with its per-layer head counts.

    Transformers' own ``from_pretrained`` does the loading (key renaming, tied weights, dtype, device map), for a
    model whose layers are given the head counts in ``config.kept_heads`` before the weights arrive.

    Args:
        directory: Folder holding ``config.json`` and the safetensors weights.
        **kwargs: Passed to ``from_pretrained`` (e.g. ``attn_implementation="eager"``, ``dtype=torch.bfloat16``).

    Returns:
        The model, an instance of its ordinary class, in eval mode.
    """
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"directory={directory!r} has no config.json; save the model with save_pruned.")
    config = AutoConfig.from_pretrained(directory)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"directory={directory!r} holds a {type(config).__name__}, which is not a causal LM config.")
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    def __init__(self, config, *args, **kwargs) -> None:
        base.__init__(self, config, *args, **kwargs)
        _rebuild_layers(self)  # the kept heads' shapes, before from_pretrained loads the weights into them

    # Named like the base class, which is how transformers finds the family's checkpoint key renamings.
    pruned_class = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})
    model, info = pruned_class.from_pretrained(directory, config=config, output_loading_info=True, **kwargs)
    problems = {key: sorted(value) for key, value in info.items() if key != "error_msgs" and value}
    if problems or info.get("error_msgs"):
        errors = info.get("error_msgs") or ""
        raise ValueError(f"The weights in {directory!r} do not fit its config: {problems} {errors}")
    model.__class__ = base  # an ordinary model again, which saves as its own architecture
    return model.eval()


def export_checkpoint(ckpt_path: str, output_dir: str) -> dict[str, Any]:
    """Turns a fine-tune-with-pruning checkpoint into a compact model folder that loads and serves on its own.

    The ``GatedLanguageModel`` of the checkpoint is rebuilt, its pruned heads are removed and its gates folded
    into the weights (``compact``), and the result is written with ``save_pruned``, together with the model's
    tokenizer when it can be loaded (models built from a config have none).

    Args:
        ckpt_path: Path of a Lightning checkpoint of a ``GatedLanguageModel``.
        output_dir: Folder to write the config, the safetensors weights and the tokenizer into.

    Returns:
        ``{"output_dir", "tokenizer_saved", "heads_before", "heads_after", "parameters_before",
        "parameters_after", "bytes_before", "bytes_after"}``: head and weight counts and the bytes of the weights
        before and after compaction (gates excluded, tied weights once).
    """
    from sentinel_lightning.module import GatedLanguageModel
    from sentinel_lightning.pretrained import load_tokenizer

    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist.")
    module = GatedLanguageModel.load_from_checkpoint(ckpt_path, map_location="cpu")
    hparams = module.hparams
    tokenizer = None
    if hparams.get("model") is not None or hparams.get("model_config") is None:
        try:
            tokenizer = load_tokenizer(hparams.get("model"), hparams.get("gguf_file"))
        except Exception as error:  # the model folder may have no tokenizer; the weights are what matters
            print(f"export: no tokenizer saved ({error})")
    compacted = compact(module)
    save_pruned(compacted, output_dir, tokenizer)
    summary = {
        "output_dir": output_dir,
        "tokenizer_saved": tokenizer is not None,
        "heads_before": module.gates.active.numel(),
        "heads_after": module.gates.num_active,
        "parameters_before": count_parameters(module.model),
        "parameters_after": count_parameters(compacted),
        "bytes_before": weight_bytes(module.model),
        "bytes_after": weight_bytes(compacted),
    }
    print(
        f"export: {summary['heads_after']}/{summary['heads_before']} heads kept; parameters "
        f"{summary['parameters_before']:,} -> {summary['parameters_after']:,}; weights {summary['bytes_before']:,} -> "
        f"{summary['bytes_after']:,} bytes; written to {output_dir}"
    )
    return summary
