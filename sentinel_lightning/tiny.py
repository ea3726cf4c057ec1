"""Tiny randomly initialised models of every supported family, for tests and the scripts' ``--quick`` modes.

They pair with the offline byte-level tokenizer (``pretrained.byte_level_tokenizer``, 257 tokens): real Hugging
Face models, built from a config in milliseconds, with nothing downloaded.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

TINY_VOCAB = 260  # the byte-level tokenizer's 256 bytes and its special token (id 256) fit


def tiny_config(
    family: str = "llama", num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, width: int = 32
) -> PretrainedConfig:
    """A config of ``family`` with ``num_layers`` layers, ``num_heads`` heads and hidden size ``width``.

    ``num_kv_heads`` applies to the grouped-query families (Llama, Mistral, Qwen2).
    """
    common = dict(
        vocab_size=TINY_VOCAB, max_position_embeddings=256, pad_token_id=256, bos_token_id=256, eos_token_id=256
    )
    if family == "gpt2":
        return GPT2Config(n_layer=num_layers, n_head=num_heads, n_embd=width, n_positions=256, **common)
    if family == "opt":
        return OPTConfig(
            num_hidden_layers=num_layers, num_attention_heads=num_heads, hidden_size=width,
            ffn_dim=2 * width, word_embed_proj_dim=width, **common,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            num_hidden_layers=num_layers, num_attention_heads=num_heads, hidden_size=width,
            intermediate_size=2 * width, **common,
        )
    grouped = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if family not in grouped:
        raise ValueError(f"family={family!r} has no tiny config; choose one of {sorted(['gpt2', 'opt', 'gpt_neox', *grouped])}.")
    return grouped[family](
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        hidden_size=width, intermediate_size=2 * width, **common,
    )


def tiny_model(family: str = "llama", seed: int = 0, **kwargs) -> PreTrainedModel:
    """A randomly initialised causal LM of ``family`` (seeded), in eval mode; ``kwargs`` go to ``tiny_config``."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **kwargs)).eval()
