import torch
from conftest import tiny_model

from sentinel_lightning.gates import attach_gates
from sentinel_lightning.measure.attention_entropy import attention_entropy


def _reference_entropy(model, tokens, mask):
    """Entropy from the eager attention probabilities that transformers itself returns."""
    model.set_attn_implementation("eager")
    attentions = model(tokens, attention_mask=mask, output_attentions=True).attentions  # L x [B, H, T, T]
    model.set_attn_implementation("sdpa")
    per_query = torch.stack([-torch.special.xlogy(a, a).sum(-1) for a in attentions])  # [L, B, H, T]
    return (per_query * mask[None, :, None, :]).sum(dim=(1, 3))  # [L, H]


def test_entropy_matches_eager_attention_weights_and_excludes_padding(family, tokens):
    model = tiny_model(family)
    attach_gates(model)
    mask = torch.ones_like(tokens)
    mask[1, 7:] = 0  # right padding in the second sequence
    sums, count = attention_entropy(model, tokens, mask)
    assert sums.shape == (2, 4) and count == int(mask.sum())
    assert torch.allclose(sums, _reference_entropy(model, tokens, mask), atol=1e-4)


def test_entropy_pass_restores_the_model(tokens):
    model = tiny_model("llama").train()
    before = model(tokens).logits
    attention_entropy(model, tokens)
    assert model.config._attn_implementation == "sdpa" and model.training
    assert torch.equal(model(tokens).logits, before)


def test_uniform_attention_has_log_n_entropy():
    model = tiny_model("llama", num_kv_heads=4)
    with torch.no_grad():  # zero queries: every query attends uniformly to its causal prefix
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    tokens = torch.randint(3, 200, (1, 6))
    sums, count = attention_entropy(model, tokens)
    expected = sum(torch.log(torch.tensor(float(n))) for n in range(1, 7))  # query i sees i keys
    assert torch.allclose(sums, torch.full((2, 4), expected.item()), atol=1e-5) and count == 6


def test_sink_mass_and_rest_entropy_of_known_distributions():
    from sentinel_lightning.measure.attention_entropy import attention_statistics

    probs = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.25, 0.25], [0.0, 0.5, 0.5]]]])  # [B=1, H=1, T=3, S=3]
    stats = attention_statistics(probs)
    assert torch.allclose(stats["sink_mass"], torch.tensor([[[1.0, 0.5, 0.0]]]))
    log2 = torch.log(torch.tensor(2.0))
    assert torch.allclose(stats["rest_entropy"], torch.tensor([[[0.0, log2, log2]]]), atol=1e-6)
    assert torch.allclose(stats["entropy"], torch.tensor([[[0.0, 1.5 * log2, log2]]]), atol=1e-6)
