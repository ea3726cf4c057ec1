"""Merged key/value heads: the plan, the gated forward, exact compaction to a uniform layout, the callback."""

import pytest
import torch
from conftest import byte_tokenizer, tiny_data, tiny_model, tiny_trainer
from test_compaction import cached_bytes_per_token, compact_exactly
from test_saving import load_without_package

from sentinel_lightning.callbacks import HeadPruning, HeadReactivation, KeyValueMerging
from sentinel_lightning.compaction import kv_cache_bytes_per_token
from sentinel_lightning.gates import attach_gates
from sentinel_lightning.merging import merge_groups, merge_mix, merged_layout
from sentinel_lightning.module import GatedLanguageModel
from sentinel_lightning.saving import load_pruned, save_pruned
from sentinel_lightning.standalone.families import FAMILIES
from sentinel_lightning.standalone.pruned_modeling import stock_describes

MERGING = [name for name, entry in FAMILIES.items() if entry.merges_key_values]


def nine_heads(family="llama", attn_implementation="sdpa"):
    """SmolLM2's attention in small: 2 layers of 9 query heads in 3 groups of 3."""
    model = tiny_model(family, num_layers=2, num_heads=9, num_kv_heads=3, width=72)
    model.config._attn_implementation = attn_implementation
    return model


def merge(gates, num_merged, group_size=3):
    for layer in range(gates.num_layers):
        groups = merge_groups(gates.active[layer], group_size, num_merged)
        gates.set_key_value_mix(layer, merge_mix(groups, gates.num_heads, group_size), group_size)


def test_merge_groups_keep_the_largest_groups_and_fill_them_with_the_rest():
    active = torch.ones(9, dtype=torch.bool)
    active[4] = False  # group 1 keeps heads 3 and 5
    assert merge_groups(active, 3, 2) == [[0, 1, 2, 3], [5, 6, 7, 8]]
    assert merge_groups(torch.ones(9, dtype=torch.bool), 3, 1) == [list(range(9))]
    mix = merge_mix([[0, 1, 2, 3], [5, 6, 7, 8]], 9, 3)
    assert torch.equal(mix[3], torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64))  # 3 of group 0, 1 of group 1
    assert torch.equal(mix[5], torch.tensor([0.0, 0.25, 0.75], dtype=torch.float64))
    assert torch.equal(mix[4], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))  # pruned: reads its own
    order, kv_index, rows = merged_layout(mix, [0, 1, 2, 3, 5, 6, 7, 8])
    assert order == [0, 1, 2, 3, 5, 6, 7, 8] and kv_index == [0, 0, 0, 0, 1, 1, 1, 1] and rows.shape == (2, 3)
    assert merge_groups(torch.ones(9, dtype=torch.bool), 3, 2) == [[0, 1, 2, 6, 7], [3, 4, 5, 8]]  # 5 and 4
    assert merge_groups(torch.zeros(9, dtype=torch.bool), 3, 2) == []
    with pytest.raises(ValueError, match=r"num_key_value_heads=4 must lie in \[1, 3\]"):
        merge_groups(torch.ones(9, dtype=torch.bool), 3, 4)


def test_an_identity_mix_computes_the_plain_model(tokens):
    plain = nine_heads()
    gated = nine_heads()
    gates = attach_gates(gated)
    identity = merge_mix([], 9, 3)
    for layer in range(2):
        gates.set_key_value_mix(layer, identity, 3)
    assert not gates.merged_layers().any()
    with torch.no_grad():
        assert torch.allclose(gated(tokens).logits, plain(tokens).logits, atol=1e-6)


def test_groups_that_cannot_be_equal_run_in_query_slots_and_stay_exact(tokens):
    gated = nine_heads()
    merge(attach_gates(gated), 2)  # 9 query heads: merged groups of 5 and 4
    compacted = compact_exactly(gated, tokens)
    assert compacted.config.key_value_index == [[0] * 5 + [1] * 4] * 2 and not stock_describes(compacted)
    assert kv_cache_bytes_per_token(compacted) * 3 == kv_cache_bytes_per_token(gated) * 2


@pytest.mark.parametrize("family", MERGING)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_merged_heads_compact_exactly_to_a_uniform_layout(family, attn_implementation, tokens):
    gated = nine_heads(family, attn_implementation)
    gates = attach_gates(gated)
    with torch.no_grad():
        gates.values.copy_(torch.linspace(0.5, 1.5, 18).reshape(2, 9))
    gates.prune([(0, 4), (1, 0)])  # one query head per layer: 8 left, in two merged groups of 4
    merge(gates, 2)
    assert gates.merged_layers().tolist() == [True, True]

    compacted = compact_exactly(gated, tokens)

    config = compacted.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (8, 2)
    assert stock_describes(compacted)
    assert config.kept_heads[1] == [1, 3, 4, 5, 2, 6, 7, 8]  # ordered by the merged head they read
    assert config.key_value_index == [[0, 0, 0, 0, 1, 1, 1, 1]] * 2
    head_dim = 8
    assert kv_cache_bytes_per_token(compacted) == cached_bytes_per_token(compacted, tokens) == 2 * 2 * 2 * head_dim * 4
    assert kv_cache_bytes_per_token(compacted) * 3 == kv_cache_bytes_per_token(gated) * 2


def test_every_query_head_can_share_one_key_value_head(tokens):
    gated = nine_heads()
    merge(attach_gates(gated), 1)
    compacted = compact_exactly(gated, tokens)
    assert (compacted.config.num_attention_heads, compacted.config.num_key_value_heads) == (9, 1)


def test_a_merged_folder_loads_in_plain_transformers_in_a_process_without_the_package(tokens, tmp_path):
    gated = nine_heads()
    gates = attach_gates(gated)
    gates.prune([(0, 8), (1, 4)])
    merge(gates, 2)
    save_pruned(gated, str(tmp_path / "model"), tokenizer=byte_tokenizer())
    printed = load_without_package(tmp_path / "model", gated, tokens, tmp_path, trust_remote_code=False)
    assert printed.split()[0] == "LlamaForCausalLM"
    with torch.no_grad():
        assert (load_pruned(str(tmp_path / "model"))(tokens).logits - gated(tokens).logits).abs().max() <= 1e-4


def test_the_callback_merges_before_its_epoch_and_reactivation_leaves_merged_layers(tmp_path, tokens):
    module = GatedLanguageModel(model=nine_heads(), learning_rate=1e-3)
    merging = KeyValueMerging(num_key_value_heads=2, epoch=1)
    pruning = HeadPruning("random", schedule={0: 1 / 9}, scope="layer", compensate="none")
    reactivation = HeadReactivation(tolerance=0.0)  # any regression asks for the pruned heads back
    trainer = tiny_trainer(max_epochs=3, limit_train_batches=2, callbacks=[pruning, merging, reactivation])
    trainer.fit(module, tiny_data(block_size=32, batch_size=2))

    gates = module.gates
    assert gates.merged_layers().tolist() == [True, True] and gates.active.sum(dim=1).tolist() == [8, 8]
    assert not reactivation.events  # its candidates were all in merged layers
    mix = gates.key_value_mix.clone()
    compacted = compact_exactly(module.model, tokens)
    assert (compacted.config.num_attention_heads, compacted.config.num_key_value_heads) == (8, 2)
    # The merge travels in checkpoints: a model loaded from one reads the same merged key/value heads.
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    loaded = GatedLanguageModel.load_from_checkpoint(tmp_path / "run.ckpt", model=nine_heads())
    assert torch.equal(loaded.gates.key_value_mix, mix)


def test_families_that_cannot_merge_are_refused_by_name():
    assert set(MERGING) == {"llama", "mistral", "qwen2", "smollm3"}  # separate k/v projections, no key norms
    for family in ("gpt2", "qwen3"):
        module = GatedLanguageModel(model=tiny_model(family))
        with pytest.raises(ValueError, match=rf"model_type='{family}' cannot merge key/value heads"):
            KeyValueMerging(num_key_value_heads=1).setup(tiny_trainer(), module, "fit")
    with pytest.raises(ValueError, match=r"has 3 key/value heads per layer; merging needs fewer"):
        KeyValueMerging(num_key_value_heads=3).setup(tiny_trainer(), GatedLanguageModel(model=nine_heads()), "fit")
    with pytest.raises(ValueError, match=r"num_key_value_heads=0 must be a positive integer or None"):
        KeyValueMerging(num_key_value_heads=0)
    KeyValueMerging().setup(tiny_trainer(), module, "fit")  # None: merges nothing, whatever the family
