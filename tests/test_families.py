"""The family registry: every registered family provides every piece, and its surgery keeps a layer's output."""

import copy
import pickle
import types

import pytest
import torch
from conftest import HEAD_COMPACTING, tiny_model
from test_compaction import key_value_widths

from sentinel_lightning.gates import attach_gates, detach_gates
from sentinel_lightning.standalone.families import (
    FAMILIES,
    AttentionFamily,
    EmptyAttention,
    attention_modules,
    decoder_layers,
    family_of,
    head_shape,
    num_key_value_heads,
    output_projections,
)
from sentinel_lightning.standalone.pruned_modeling import has_query_slots, resize_attention
from sentinel_lightning.tiny import tiny_config

PRUNED = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]  # layer 0 loses every head; layer 1 keeps unequal groups (1, 2)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_registered_family_provides_every_piece(model_type):
    entry = FAMILIES[model_type]
    assert isinstance(entry, AttentionFamily) and entry.model_type == model_type
    assert entry.layers and entry.attention and entry.output_projection and entry.cache_keywords
    for method in ("_slice_kept", "_resize_kept", "tiny_config"):
        assert getattr(type(entry), method) is not getattr(AttentionFamily, method), f"{model_type} lacks {method}"
    config = tiny_config(model_type)
    assert config.model_type == model_type
    model = tiny_model(model_type)
    assert family_of(model) is entry
    layers = entry.decoder_layers(model)
    assert len(layers) == 2 and decoder_layers(model) == layers
    attentions = [entry.attention_of(layer) for layer in layers]
    assert attention_modules(model) == attentions
    assert output_projections(model) == [entry.output_projection_of(attention) for attention in attentions]
    assert head_shape(model) == entry.head_shape(model) == (2, 4, 8)
    num_kv = num_key_value_heads(model)
    assert num_kv == (2 if entry.grouped_query else 4) and entry.group_size(model.config) * num_kv == 4
    empty = entry.empty_attention(attentions[0], 0)
    assert isinstance(empty, EmptyAttention) and empty.cache_keywords == entry.cache_keywords


def _surgery(entry: AttentionFamily, model, gates) -> None:
    """Cuts every layer of ``model`` (gates detached) to the heads ``gates`` keeps, the values folded in."""
    _, num_heads, head_dim = entry.head_shape(model)
    num_kv = entry.num_key_value_heads(model.config)
    for index, layer in enumerate(entry.decoder_layers(model)):
        kept = gates.active[index].nonzero().flatten().tolist()
        kv_sources = entry.key_value_sources(kept, num_heads, num_kv)
        kv_index = entry.key_value_index(kept, num_heads, num_kv)
        attention = entry.attention_of(layer)
        tensors = entry.slice_heads(attention, kept, kv_sources, gates.values[index, kept].detach(), head_dim)
        resized = resize_attention(entry, layer, index, kv_index, head_dim)
        with torch.no_grad():
            result = resized.load_state_dict(tensors, strict=False)
        assert not result.unexpected_keys
        assert sorted(tensors) == sorted(name for name, _ in resized.named_parameters())


@pytest.mark.parametrize("family", HEAD_COMPACTING)
def test_slicing_and_resizing_keep_the_gated_output(family, tokens):
    model = tiny_model(family)
    gates = attach_gates(model)
    with torch.no_grad():
        gates.values.copy_(torch.linspace(0.25, 1.75, 8).reshape(2, 4))
    gates.prune(PRUNED)
    with torch.no_grad():
        expected = model(tokens).logits
    cut = copy.deepcopy(model)
    detach_gates(cut)
    _surgery(family_of(cut), cut, gates)

    with torch.no_grad():
        logits = cut(tokens).logits
    assert (logits - expected).abs().max().item() <= 1e-4
    assert isinstance(attention_modules(cut)[0], EmptyAttention)
    kept_width = 3 * head_shape(cut)[2]
    output = family_of(cut).output_projection_of(attention_modules(cut)[1])
    assert output.weight.numel() == kept_width * cut.config.hidden_size  # 3 of 4 heads kept
    if family_of(cut).grouped_query:  # groups of 1 and 2 query heads: both key/value heads once, read by index
        attention = attention_modules(cut)[1]
        assert has_query_slots(attention) and attention.num_key_value_groups == 2
        assert output.slots == (0, 2, 3) and key_value_widths(cut)[1] == 2 * kept_width // 3 * cut.config.hidden_size


def test_grouped_query_families_never_repeat_key_value_heads_for_unequal_groups():
    for entry in FAMILIES.values():
        expected = [0, 1] if entry.grouped_query else [1, 2, 3]
        assert entry.key_value_sources([1, 2, 3], num_heads=4, num_kv_heads=2) == expected
        assert entry.key_value_index([1, 2, 3], num_heads=4, num_kv_heads=2) == ([0, 1, 1] if entry.grouped_query
                                                                               else [0, 1, 2])


def test_unsupported_model_gives_a_clear_error():
    with pytest.raises(ValueError, match=r"Unsupported model Linear.*gpt2.*llama"):
        family_of(torch.nn.Linear(2, 2))
    model = torch.nn.Linear(2, 2)
    model.config = types.SimpleNamespace(model_type="t5")
    with pytest.raises(ValueError, match=r"Unsupported model Linear \(model_type='t5'\).*gpt_neox.*qwen2"):
        head_shape(model)
    with pytest.raises(ValueError, match=r"family='t5' has no tiny config; choose one of"):
        tiny_config("t5")


class _Recorder:
    """A user's own forward pre-hook (picklable): notes its name in ``calls`` each time it runs."""

    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def __call__(self, module, args) -> None:
        self.calls.append(self.name)


def test_detach_removes_exactly_the_hooks_attach_registered(tokens):
    model = tiny_model("llama")
    projection = output_projections(model)[1]
    calls = []
    projection.register_forward_pre_hook(_Recorder("before", calls))
    gates = attach_gates(model)
    projection.register_forward_pre_hook(_Recorder("after", calls))
    # One per layer on the output projection, and for families that merge key/value heads the key, value and
    # attention hooks of ``HeadGates.key_value_mix`` (idle until a merge): all kept by attach_gates.
    assert len(gates._hook_handles) == 2 * (1 + 3 * family_of(model).merges_key_values)
    gates.prune([(1, 0), (1, 1), (1, 2), (1, 3)])
    gated = model(tokens).logits
    clone, restored = copy.deepcopy(model), pickle.loads(pickle.dumps(model))

    detach_gates(model)

    calls.clear()
    plain = model(tokens).logits
    assert calls == ["before", "after"]  # the user's hooks survive, in order
    assert not torch.allclose(plain, gated)
    for other in (clone, restored):  # the copies keep their own gates until detached themselves
        assert torch.allclose(other(tokens).logits, gated, atol=1e-6)
        detach_gates(other)
        assert torch.allclose(other(tokens).logits, plain, atol=1e-6)
