"""Tiny randomly initialised models of every supported family, for tests and the scripts' ``--quick`` modes.

They pair with the offline byte-level tokenizer (``pretrained.byte_level_tokenizer``, 257 tokens): real Hugging
Face models, built from a config in milliseconds, with nothing downloaded. Each family's config comes from its
entry in ``families.FAMILIES``.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from sentinel_lightning.standalone.families import FAMILIES

TINY_VOCAB = 260  # the byte-level tokenizer's 256 bytes and its special token (id 256) fit


def tiny_config(
    family: str = "llama", num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, width: int = 32
) -> PretrainedConfig:
    """A config of ``family`` with ``num_layers`` layers, ``num_heads`` heads and hidden size ``width``.

    ``num_kv_heads`` applies to the grouped-query families (``families.AttentionFamily.grouped_query``); each
    family adds its own settings (Qwen3's and Gemma 3's sliding layers, SmolLM3's layers without rotary
    embeddings, Phi-3's partial rotary embeddings), with ``head_dim = width // num_heads``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} has no tiny config; choose one of {sorted(FAMILIES)}.")
    common = {
        "vocab_size": TINY_VOCAB, "max_position_embeddings": 256, "pad_token_id": 256, "bos_token_id": 256,
        "eos_token_id": 256,
    }
    return FAMILIES[family].tiny_config(num_layers, num_heads, num_kv_heads, width, **common)


def tiny_model(family: str = "llama", seed: int = 0, **kwargs) -> PreTrainedModel:
    """A randomly initialised causal LM of ``family`` (seeded), in eval mode; ``kwargs`` go to ``tiny_config``."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **kwargs)).eval()


def save_tiny_model(folder: str, family: str = "llama") -> str:
    """Saves ``tiny_model(family)`` with the byte-level tokenizer into ``folder`` (for ``--model.model folder``).

    Returns:
        ``folder``.
    """
    from sentinel_lightning.pretrained import byte_level_tokenizer

    tiny_model(family).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder
