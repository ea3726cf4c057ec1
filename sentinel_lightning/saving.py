"""Saving and loading compacted models: config, safetensors and tokenizer, with per-layer head counts.

``save_pruned`` writes a compacted model (compacting a gated one first); ``load_pruned`` rebuilds each layer's
attention with the head counts the config records (``config.kept_heads``, ``config.kept_key_value_heads``, see
``compaction``) before transformers loads the weights into it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from sentinel_lightning.compaction import compact
from sentinel_lightning.families import family_of
from sentinel_lightning.gates import find_causal_lm, find_gates


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
    causal_lm = find_causal_lm(model)
    if find_gates(causal_lm) is not None:
        causal_lm = compact(causal_lm)
    os.makedirs(directory, exist_ok=True)
    with _without_quantization_config(causal_lm):
        causal_lm.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _rebuild_layers(model: PreTrainedModel) -> None:
    """Gives a model built from a compacted config the per-layer head counts its config records."""
    config = model.config
    kept_heads = getattr(config, "kept_heads", None)
    if kept_heads is None:
        return
    kept_kv_heads = getattr(config, "kept_key_value_heads", None) or kept_heads
    family = family_of(model)
    layers = family.decoder_layers(model)
    if not (len(kept_heads) == len(kept_kv_heads) == len(layers)):
        raise ValueError(
            f"config.kept_heads has {len(kept_heads)} and config.kept_key_value_heads {len(kept_kv_heads)} layers, "
            f"but the model has {len(layers)} decoder layers."
        )
    _, _, head_dim = family.head_shape(model)
    for index, (layer, heads, kv_heads) in enumerate(zip(layers, kept_heads, kept_kv_heads)):
        if heads and len(heads) % max(len(kv_heads), 1):
            raise ValueError(
                f"config.kept_heads: layer {index} keeps {len(heads)} query heads, not a multiple of its "
                f"{len(kv_heads)} key/value heads."
            )
        resized = family.resize(family.attention_of(layer), index, len(heads), len(kv_heads), head_dim)
        family.set_attention(layer, resized)


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
