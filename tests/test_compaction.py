"""Compaction: pruned heads leave the weights (key/value heads never repeated), logits and greedy generation stay."""

import copy
import itertools
import os
import pickle

import pytest
import torch
from conftest import GROUPED, HEAD_COMPACTING, VOCAB, byte_tokenizer, tiny_data, tiny_model, tiny_trainer
from transformers import AutoModelForCausalLM

from sentinel_lightning import GatedLanguageModel
from sentinel_lightning.cli.export import export_checkpoint
from sentinel_lightning.compaction import (
    compact,
    count_parameters,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    weight_bytes,
)
from sentinel_lightning.gates import attach_gates, find_gates
from sentinel_lightning.saving import load_pruned, save_pruned
from sentinel_lightning.standalone.families import (
    FAMILIES,
    EmptyAttention,
    LayerHeadCount,
    attention_modules,
    family_of,
    head_shape,
)
from sentinel_lightning.standalone.pruned_modeling import has_query_slots
from sentinel_lightning.tiny import tiny_config

GROUPED_COMPACTING = [name for name in GROUPED if name in HEAD_COMPACTING]
WHOLE_LAYERS_ONLY = [name for name in FAMILIES if name not in HEAD_COMPACTING]
STOCK_HEAD_COUNTS = [name for name in HEAD_COMPACTING if FAMILIES[name].config_has_head_dim]  # uniform: stock


def pruned_model(family: str, attn_implementation: str = "sdpa"):
    """3 layers of 4 heads (2 key/value heads for the grouped families), partial gates, and three kinds of layer.

    Layer 0 loses every head; layer 1 loses head 0, leaving its key/value groups unequal (1 and 2 query heads);
    layer 2 loses heads 1 and 3 (groups of 1 and 1).
    """
    model = tiny_model(family, num_layers=3, num_heads=4, num_kv_heads=2)
    model.config._attn_implementation = attn_implementation
    gates = attach_gates(model)
    with torch.no_grad():
        gates.values.copy_(torch.linspace(0.25, 1.75, 12).reshape(3, 4))  # partial gates everywhere
    gates.prune([(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (2, 1), (2, 3)])
    return model


def compact_exactly(gated, tokens):
    """``compact(gated)``, checked to give the gated model's logits and greedy continuation."""
    with torch.no_grad():
        expected = gated(tokens).logits
    compacted = compact(gated)
    with torch.no_grad():
        assert (compacted(tokens).logits - expected).abs().max().item() <= 1e-4
    assert torch.equal(greedy(compacted, tokens[:1]), greedy(gated, tokens[:1]))
    return compacted


def greedy(model, prompt, tokens=8):
    return model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens, min_new_tokens=tokens,
        do_sample=False, pad_token_id=VOCAB - 4,
    )


def key_value_widths(model) -> list[int]:
    """Weights of each layer's key projection (the fused projection for GPT-2 / GPT-NeoX, the key section of
    Phi-3's, 0 for an empty layer)."""
    widths = []
    for attention in attention_modules(model):
        if hasattr(attention, "qkv_proj"):  # Phi-3: [(h + 2 * k) * D, C], the query section is o_proj's input
            key_rows = (attention.qkv_proj.out_features - attention.o_proj.in_features) // 2
            widths.append(key_rows * attention.qkv_proj.in_features)
            continue
        projection = next((getattr(attention, name) for name in ("k_proj", "c_attn", "query_key_value")
                           if hasattr(attention, name)), None)
        widths.append(0 if projection is None else projection.weight.numel())
    return widths


def cached_bytes_per_token(model, tokens) -> int:
    """Bytes of keys and values the key/value cache really holds after ``tokens`` ``[B, T]``, per token and row."""
    with torch.no_grad():
        cache = model(tokens, use_cache=True).cache
    stored = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return stored // tokens.numel()


@pytest.mark.parametrize("family", HEAD_COMPACTING)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_compact_keeps_logits_and_generation(family, attn_implementation, tokens):
    gated = pruned_model(family, attn_implementation)
    with torch.no_grad():
        expected = gated(tokens).logits
    parameters_before = count_parameters(gated)

    compacted = compact(gated)

    with torch.no_grad():
        logits = compacted(tokens).logits
    assert (logits - expected).abs().max().item() <= 1e-4
    assert torch.equal(greedy(compacted, tokens[:1]), greedy(gated, tokens[:1]))
    with torch.no_grad():  # step by step with the cache, positions taken from it (layer 0 has no attention left)
        first = compacted(tokens[:, :8], use_cache=True)
        second = compacted(tokens[:, 8:], cache=first.cache, use_cache=True)
    assert (second.logits - expected[:, 8:]).abs().max().item() <= 1e-4
    assert type(compacted) is type(gated) and not compacted.training
    assert find_gates(compacted) is None
    assert not any(module._forward_pre_hooks for module in compacted.modules())
    assert count_parameters(compacted) < parameters_before
    assert isinstance(attention_modules(compacted)[0], EmptyAttention)
    assert compacted.config.kept_heads == [[], [1, 2, 3], [0, 2]]
    # No key/value head is repeated: layer 1's groups of 1 and 2 query heads keep both key/value heads once.
    expected_kv = [[], [0, 1], [0, 1]] if family in GROUPED else [[], [1, 2, 3], [0, 2]]
    assert compacted.config.kept_key_value_heads == expected_kv
    expected_index = [[], [0, 1, 1], [0, 1]] if family in GROUPED else [[], [0, 1, 2], [0, 1]]
    assert compacted.config.key_value_index == expected_index
    assert has_query_slots(attention_modules(compacted)[1]) == (family in GROUPED)
    assert all(after <= before for after, before in zip(key_value_widths(compacted), key_value_widths(gated)))
    assert kv_cache_bytes_per_token(compacted) < kv_cache_bytes_per_token(gated)
    # The input is left as it was: still gated, same weights, same logits.
    assert find_gates(gated) is not None and count_parameters(gated) == parameters_before
    with torch.no_grad():
        assert torch.equal(gated(tokens).logits, expected)


@pytest.mark.parametrize("family", GROUPED_COMPACTING)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_unequal_groups_keep_logits_with_fewer_key_value_heads(family, attn_implementation, tokens):
    """9 query heads in 3 groups; the kept groups hold 3, 1 and 2 query heads in layer 0 and 1, 2, 0 in layer 1."""
    gated = tiny_model(family, num_layers=2, num_heads=9, num_kv_heads=3, width=72)
    gated.config._attn_implementation = attn_implementation
    gates = attach_gates(gated)
    with torch.no_grad():
        gates.values.copy_(torch.linspace(0.5, 1.5, 18).reshape(2, 9))
    gates.prune([(0, 4), (0, 5), (0, 8), (1, 1), (1, 2), (1, 5), (1, 6), (1, 7), (1, 8)])
    compacted = compact_exactly(gated, tokens)
    assert compacted.config.kept_key_value_heads == [[0, 1, 2], [0, 1]]
    assert compacted.config.key_value_index == [[0, 0, 0, 1, 2, 2], [0, 1, 1]]
    head_dim = 8
    assert key_value_widths(compacted) == [3 * head_dim * 72, 2 * head_dim * 72]  # k_proj [k * D, C]
    # Each layer runs its query heads in equal slots of its largest group: 3 x 3 and 2 x 2 slots.
    assert [attention.num_key_value_groups for attention in attention_modules(compacted)] == [3, 2]
    queries = [getattr(attention, "q_proj", None) or attention.qkv_proj for attention in attention_modules(compacted)]
    assert [query.slots for query in queries] == [(0, 1, 2, 3, 6, 7), (0, 2, 3)]
    outputs = [family_of(compacted).output_projection_of(attention) for attention in attention_modules(compacted)]
    assert [output.in_features for output in outputs] == [6 * head_dim, 3 * head_dim]  # the kept heads only
    # The cache holds only the kept key/value heads: (3 + 2) heads, keys and values, float32.
    short = tokens[:, :4]  # within the tiny sliding windows
    assert kv_cache_bytes_per_token(compacted) == cached_bytes_per_token(compacted, short) == 5 * 2 * head_dim * 4


@pytest.mark.parametrize("family", HEAD_COMPACTING)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_whole_group_leaves_with_its_key_value_head(family, attn_implementation, tokens):
    gated = tiny_model(family, num_layers=2, num_heads=4, num_kv_heads=2)
    gated.config._attn_implementation = attn_implementation
    gates = attach_gates(gated)
    with torch.no_grad():
        gates.values.copy_(torch.linspace(0.25, 1.75, 8).reshape(2, 4))
    gates.prune([(1, 0), (1, 1)])  # layer 1's first group (two heads of their own without grouped queries)
    compacted = compact_exactly(gated, tokens)
    assert compacted.config.kept_heads == [[0, 1, 2, 3], [2, 3]]
    before, after = key_value_widths(gated), key_value_widths(compacted)
    assert after[0] == before[0] and 2 * after[1] == before[1]  # the group's key/value head is gone


@pytest.mark.parametrize("family", WHOLE_LAYERS_ONLY)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_norms_across_heads_compact_whole_layers_only(family, attn_implementation, tokens, tmp_path):
    """OLMo 2 normalises the whole query projection: removing some heads of a layer is refused, a layer is exact."""
    for pruned in ([(1, 0)], [(1, 0), (1, 1)]):  # an uneven mask, a whole group
        gated = tiny_model(family)
        attach_gates(gated).prune(pruned)
        with pytest.raises(ValueError, match=rf"model_type='{family}'.*normalis.*unit='layer'"):
            compact(gated)
    gated = tiny_model(family, num_layers=3)
    gated.config._attn_implementation = attn_implementation
    gates = attach_gates(gated)
    with torch.no_grad():
        gates.values.copy_(torch.linspace(0.25, 1.75, 12).reshape(3, 4))
    gates.prune([(1, head) for head in range(4)])
    compacted = compact_exactly(gated, tokens)
    assert isinstance(attention_modules(compacted)[1], EmptyAttention)
    assert count_parameters(compacted) < count_parameters(gated)
    save_pruned(compacted, str(tmp_path))
    with torch.no_grad():
        assert (load_pruned(str(tmp_path))(tokens).logits - compacted(tokens).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", STOCK_HEAD_COUNTS)
def test_an_explicit_head_dim_need_not_fill_the_width(family, tokens, tmp_path):
    """4 heads of 16 in a width of 32 (as Qwen3 and Gemma 3 state ``head_dim``); a uniform layout stays stock."""
    config = tiny_config(family, num_layers=2, num_heads=4, num_kv_heads=2, width=32)
    config.head_dim = 16
    torch.manual_seed(0)
    gated = AutoModelForCausalLM.from_config(config).eval()
    assert head_shape(gated) == (2, 4, 16)
    attach_gates(gated).prune([(0, 0), (0, 2), (1, 1), (1, 3)])  # one query head of each group
    compacted = compact_exactly(gated, tokens)
    assert (compacted.config.num_attention_heads, compacted.config.num_key_value_heads) == (2, 2)
    save_pruned(compacted, str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.config.head_dim == 16
    with torch.no_grad():
        assert (loaded(tokens).logits - compacted(tokens).logits).abs().max().item() <= 1e-5


def test_phi4_mini_long_rope_keeps_its_head_counts_and_ships_modeling_code(tokens, tmp_path):
    """Long-rope factors are sized by hidden_size // num_attention_heads: the config cannot state fewer heads."""
    config = tiny_config("phi3", num_layers=2, num_heads=4, num_kv_heads=2, width=32)
    del config.head_dim
    config.original_max_position_embeddings = 64
    config.rope_parameters = {"rope_type": "longrope", "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
                              "short_factor": [1.0, 1.5], "long_factor": [2.0, 3.0]}
    torch.manual_seed(0)
    gated = AutoModelForCausalLM.from_config(config).eval()
    attach_gates(gated).prune([(0, 0), (0, 2), (1, 1), (1, 3)])  # uniform
    compacted = compact_exactly(gated, tokens)
    assert compacted.config.num_attention_heads == 4 and compacted.config.rope_parameters["short_factor"] == [1.0, 1.5]
    save_pruned(compacted, str(tmp_path))
    assert os.path.isfile(tmp_path / "modeling_pruned.py")
    with torch.no_grad():
        assert (load_pruned(str(tmp_path))(tokens).logits - compacted(tokens).logits).abs().max().item() <= 1e-5


def test_a_fused_projection_layer_keeps_its_own_head_count_through_copies(tokens):
    """Phi-3 splits its fused projection at config.num_attention_heads: a resized layer has its own."""
    gated = tiny_model("phi3", num_layers=3)
    attach_gates(gated).prune([(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 3)])  # layer 2 keeps its 4 heads
    compacted = compact_exactly(gated, tokens)
    resized, untouched = attention_modules(compacted)[1:]
    assert isinstance(resized.config, LayerHeadCount) and resized.config.num_attention_heads == 2
    assert resized.config.shared is compacted.config is untouched.config and compacted.config.num_attention_heads == 4
    with torch.no_grad():
        expected = compacted(tokens).logits
    for copied in (copy.deepcopy(compacted), pickle.loads(pickle.dumps(compacted))):
        copied.set_attn_implementation("eager")  # every layer reads it from the model's config
        resized = attention_modules(copied)[1]
        assert resized.config.shared is copied.config and resized.config._attn_implementation == "eager"
        with torch.no_grad():
            assert (copied(tokens).logits - expected).abs().max().item() <= 1e-5


def test_every_pruned_query_head_lowers_the_parameter_count():
    model = tiny_model("llama", num_layers=1, num_heads=6, num_kv_heads=2, width=48)
    gates = attach_gates(model)
    counts, kv_bytes = [count_parameters(model)], [kv_cache_bytes_per_token(model)]
    for head in (0, 4, 1, 3, 5):  # leaves unequal groups on the way
        gates.prune([(0, head)])
        compacted = compact(model)
        counts.append(count_parameters(compacted))
        kv_bytes.append(kv_cache_bytes_per_token(compacted))
    assert all(after < before for before, after in itertools.pairwise(counts))
    assert all(after <= before for before, after in itertools.pairwise(kv_bytes))
    assert kv_bytes[-1] == kv_bytes[0] // 2  # one key/value head left of 2


@pytest.mark.parametrize("family", HEAD_COMPACTING)
def test_kv_cache_bytes_per_token_counts_what_the_cache_stores(family, tokens):
    tokens = tokens[:, :4]  # within the tiny sliding windows (6), past which a sliding layer's cache stops growing
    gated = pruned_model(family)
    compacted = compact(gated)
    _, _, head_dim = family_of(gated).head_shape(gated)
    num_kv = 2 if family in GROUPED else 4
    assert kv_cache_bytes_per_token(gated) == 3 * 2 * num_kv * head_dim * 4 == cached_bytes_per_token(gated, tokens)
    kept_kv = [0, 2, 2] if family in GROUPED else [0, 3, 2]
    expected = sum(2 * count * head_dim * 4 if count else 2 * 4 for count in kept_kv)  # the empty layer: 2 numbers
    assert kv_cache_bytes_per_token(compacted) == expected == cached_bytes_per_token(compacted, tokens)
    assert kv_cache_bytes_per_token(compacted.to(torch.bfloat16)) == expected // 2


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "llama"])
def test_kv_cache_bytes_counts_sliding_windows(family, tokens):
    # The tiny qwen3 and gemma3_text have one sliding layer of window 6 (it keeps 5 tokens) and one full layer.
    compacted = compact(pruned_model(family))
    with torch.no_grad():
        cache = compacted(tokens[:1], use_cache=True).cache
    stored = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    assert kv_cache_bytes(compacted, tokens.shape[1]) == stored
    assert kv_cache_bytes(compacted, 3) == 3 * kv_cache_bytes_per_token(compacted)  # within every window
    if family == "llama":
        assert stored == tokens.shape[1] * kv_cache_bytes_per_token(compacted)
    else:
        assert stored < tokens.shape[1] * kv_cache_bytes_per_token(compacted)
    for context in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"context={context!r}"):
            kv_cache_bytes(compacted, context)


def test_key_value_index_attention_copies_and_pickles(tokens):
    compacted = compact(pruned_model("llama"))
    with torch.no_grad():
        expected = compacted(tokens).logits
    for copied in (copy.deepcopy(compacted), pickle.loads(pickle.dumps(compacted))):
        attention = attention_modules(copied)[1]
        assert has_query_slots(attention) and attention.q_proj.slots == (0, 2, 3)  # groups of 1 and 2 in 2 slots each
        with torch.no_grad():
            assert torch.equal(copied(tokens).logits, expected)


def test_a_uniform_compacted_model_compacts_again_to_unequal_groups(tokens):
    gated = tiny_model("llama", num_layers=2, num_heads=6, num_kv_heads=2, width=48)
    attach_gates(gated).prune([(0, 0), (0, 4), (1, 2), (1, 3)])  # uniform: 4 query heads in groups of 2
    first = compact(gated)
    assert (first.config.num_attention_heads, first.config.num_key_value_heads, first.config.head_dim) == (4, 2, 8)
    attach_gates(first).prune([(0, 1), (1, 3)])
    with torch.no_grad():
        expected = first(tokens).logits

    second = compact(first)

    with torch.no_grad():
        assert (second(tokens).logits - expected).abs().max().item() <= 1e-4
    assert second.config.kept_heads == [[1, 3, 5], [0, 1, 4]]  # original heads of the first model
    assert second.config.kept_key_value_heads == [[0, 1], [0, 1]]
    assert second.config.key_value_index == [[0, 1, 1], [0, 0, 1]]
    assert all(has_query_slots(attention) for attention in attention_modules(second))


def test_compact_takes_a_lightning_module(tokens):
    module = GatedLanguageModel(model=tiny_model("llama", num_layers=2)).eval()
    module.gates.prune([(0, 1), (1, 3)])
    compacted = compact(module)
    with torch.no_grad():
        assert (compacted(tokens).logits - module(tokens)).abs().max().item() <= 1e-4
    assert find_gates(module) is not None


@pytest.mark.parametrize(
    "kept, sources, index",
    [
        ([0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2], [0, 0, 0, 1, 1, 1, 2, 2, 2]),  # nothing pruned: groups of 3
        ([0, 1, 3, 4], [0, 1], [0, 0, 1, 1]),  # equal groups of 2
        ([0, 1, 2, 3, 6, 7], [0, 1, 2], [0, 0, 0, 1, 2, 2]),  # groups of 3, 1 and 2: each key/value head once
        ([0, 1, 2, 6, 7, 8], [0, 2], [0, 0, 0, 1, 1, 1]),  # a whole group pruned: its key/value head goes
        ([], [], []),
    ],
)
def test_key_value_sources_never_repeat_a_head(kept, sources, index):
    assert FAMILIES["llama"].key_value_sources(kept, num_heads=9, num_kv_heads=3) == sources
    assert FAMILIES["llama"].key_value_index(kept, num_heads=9, num_kv_heads=3) == index


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="PreTrainedModel"):
        compact(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="directory="):
        load_pruned(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="ckpt_path="):
        export_checkpoint(str(tmp_path / "missing.ckpt"), str(tmp_path / "out"))


@pytest.mark.parametrize("source", ["object", "path"])
def test_export_checkpoint_of_a_tiny_run(source, tokens, tmp_path):
    model = tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2)
    if source == "path":  # a model folder with its tokenizer, which the export saves too
        model.save_pretrained(tmp_path / "base")
        byte_tokenizer().save_pretrained(tmp_path / "base")
        model = str(tmp_path / "base")
    module = GatedLanguageModel(model=model)
    trainer = tiny_trainer(max_steps=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, tiny_data(block_size=32, batch_size=2))
    module.gates.prune([(0, 1), (1, 0), (1, 1)])
    trainer.save_checkpoint(tmp_path / "run.ckpt")

    summary = export_checkpoint(str(tmp_path / "run.ckpt"), str(tmp_path / "export"))

    assert summary["tokenizer_saved"] == (source == "path")
    assert os.path.isfile(tmp_path / "export" / "tokenizer.json") == (source == "path")
    assert (summary["heads_before"], summary["heads_after"]) == (8, 5)
    assert summary["parameters_after"] < summary["parameters_before"] == count_parameters(module.model)
    assert summary["bytes_after"] < summary["bytes_before"] == weight_bytes(module.model)
    loaded = load_pruned(str(tmp_path / "export"))
    assert count_parameters(loaded) == summary["parameters_after"]
    module.eval()
    with torch.no_grad():
        assert (loaded(tokens).logits - module(tokens)).abs().max().item() <= 1e-4
