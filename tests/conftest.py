"""Tiny randomly initialised models of every supported family: 2 layers, 4 heads, width 32."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

VOCAB = 260  # the byte-level test tokenizer's 256 bytes and its special token fit


def byte_tokenizer():
    """The package's offline byte-level tokenizer (vocab 257), matching the tiny models."""
    from sentinel_lightning.pretrained import byte_level_tokenizer

    return byte_level_tokenizer()


def tiny_config(family: str, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, width: int = 32):
    """A config of ``family`` with ``num_layers`` layers, ``num_heads`` heads and hidden size ``width``."""
    common = dict(vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=256, bos_token_id=256, eos_token_id=256)
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
    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return config_class(
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        hidden_size=width, intermediate_size=2 * width, **common,
    )


def tiny_model(family: str = "llama", seed: int = 0, **kwargs):
    """A randomly initialised causal LM of ``family`` in eval mode."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **kwargs)).eval()


FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "opt", "gpt_neox"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(3, VOCAB, (2, 12))


def tiny_data(block_size: int = 32, batch_size: int = 4):
    """The embedded corpus with the byte-level tokenizer, in short blocks."""
    from sentinel_lightning.data import LanguageModelingDataModule

    return LanguageModelingDataModule(tokenizer=byte_tokenizer(), block_size=block_size, batch_size=batch_size, cache=False)


def tiny_trainer(**kwargs):
    """A quiet CPU Trainer for a few tiny batches; keyword arguments override the defaults."""
    import lightning as L

    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=4, limit_val_batches=2,
        enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})
