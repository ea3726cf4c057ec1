"""Merged key/value heads: the plan, the gated forward, exact compaction to a uniform layout, the fitted merge,
the callback."""

import lightning as L
import pytest
import torch
from conftest import byte_tokenizer, tiny_data, tiny_model, tiny_trainer
from test_compaction import cached_bytes_per_token, compact_exactly
from test_saving import load_without_package

from sentinel_lightning.callbacks import HeadMetrics, HeadPruning, HeadReactivation, KeyValueMerging
from sentinel_lightning.callbacks.merging import _fit_layer
from sentinel_lightning.compaction import kv_cache_bytes_per_token
from sentinel_lightning.gates import attach_gates
from sentinel_lightning.measure.key_value_statistics import record_key_value_statistics
from sentinel_lightning.merging import as_complex_rows, as_real_rows, merge_groups, merge_mix, merged_layout
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


@pytest.mark.parametrize(("fit", "compensate"), [(True, "linear"), (False, "none")])
def test_the_callback_merges_before_its_epoch_and_reactivation_leaves_merged_layers(fit, compensate, tmp_path, tokens):
    module = GatedLanguageModel(model=nine_heads(), learning_rate=1e-3)
    merging = KeyValueMerging(num_key_value_heads=2, epoch=1, fit=fit)
    pruning = HeadPruning("random", schedule={0: 1 / 9}, scope="layer", compensate=compensate)
    reactivation = HeadReactivation(tolerance=0.0)  # any regression asks for the pruned heads back
    metrics = [HeadMetrics()] if compensate != "none" else []
    trainer = tiny_trainer(max_epochs=3, limit_train_batches=2, callbacks=[*metrics, pruning, merging, reactivation])
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
    # A fitted merge moves heads onto their anchors' key/value heads: every mix row is one-hot.
    assert bool(((mix == 0) | (mix == 1)).all()) == fit


def redundant_heads(family="llama"):
    """6 query heads in 3 groups, group 1's keys a complex scale of group 0's per rotary pair and its values a linear
    map of group 0's, group 2 pruned: one key/value head can serve heads 0-3 exactly, but not their mean."""
    model = tiny_model(family, num_layers=2, num_heads=6, num_kv_heads=3, width=48)
    generator = torch.Generator().manual_seed(1)
    head_dim = 8
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            for name, transform in (("k_proj", "scale"), ("v_proj", "map")):
                projection = getattr(attention, name)
                weight = projection.weight.view(3, head_dim, -1)
                rows = [weight[0]] + ([projection.bias.view(3, head_dim)[0][:, None]] if projection.bias is not None
                                      else [])
                source = torch.cat(rows, dim=1)  # [D, C'] group 0's rows, its bias last
                if transform == "scale":
                    scale = torch.randn(head_dim // 2, dtype=torch.complex64, generator=generator)
                    copied = as_real_rows(as_complex_rows(source) * scale[:, None])
                else:
                    copied = (torch.eye(head_dim) + 0.5 * torch.randn(head_dim, head_dim, generator=generator)) @ source
                weight[1] = copied[:, : weight.shape[-1]]
                if projection.bias is not None:
                    projection.bias.view(3, head_dim)[1] = copied[:, -1]
    gates = attach_gates(model)
    gates.prune([(layer, head) for layer in range(2) for head in (4, 5)])
    return model, gates


@pytest.mark.parametrize("family", MERGING)
def test_a_fitted_merge_is_exact_where_the_heads_are_redundant_and_a_mean_is_not(family, tokens):
    fitted, gates = redundant_heads(family)
    with torch.no_grad():
        expected = fitted(tokens).logits
    statistics = record_key_value_statistics(fitted, [{"input_ids": tokens}])
    assert statistics.tokens == tokens.numel()
    for layer in range(2):
        groups = merge_groups(gates.active[layer], 2, 1)
        assert groups == [[0, 1, 2, 3]]
        gates.set_key_value_mix(layer, _fit_layer(fitted, gates, layer, statistics, groups, 2), 2)
    assert gates.merged_layers().tolist() == [True, True]
    with torch.no_grad():
        assert (fitted(tokens).logits - expected).abs().max() <= 1e-4
    compacted = compact_exactly(fitted, tokens)
    assert (compacted.config.num_attention_heads, compacted.config.num_key_value_heads) == (4, 1)
    assert stock_describes(compacted)

    averaged, gates = redundant_heads(family)
    merge(gates, 1, group_size=2)
    with torch.no_grad():
        assert (averaged(tokens).logits - expected).abs().max() > 1e-2


def test_a_fitted_merge_keeps_a_random_model_closer_than_the_mean(tokens):
    """Heads that are not redundant: the fit keeps what the output uses, the mean blurs it (logits' distance to the
    model before the merge, one query head in nine pruned, three key/value heads merged into two)."""
    distances = {}
    for fit in (True, False):
        model = nine_heads()
        gates = attach_gates(model)
        gates.prune([(0, 4), (1, 8)])
        with torch.no_grad():
            expected = model(tokens).logits
        statistics = record_key_value_statistics(model, [{"input_ids": tokens}])
        for layer in range(2):
            groups = merge_groups(gates.active[layer], 3, 2)
            mix = _fit_layer(model, gates, layer, statistics, groups, 3) if fit else merge_mix(groups, 9, 3)
            gates.set_key_value_mix(layer, mix, 3)
        with torch.no_grad():
            distances[fit] = float((model(tokens).logits - expected).pow(2).mean())
    assert distances[True] < 0.5 * distances[False]


def test_a_fitted_merge_is_refused_where_it_cannot_rewrite_the_projections():
    module = GatedLanguageModel(model=nine_heads(), lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(ValueError, match=r"rewrites the q_proj weights, which are a Linear here \(LoRA"):
        KeyValueMerging(num_key_value_heads=2).setup(tiny_trainer(), module, "fit")
    KeyValueMerging(num_key_value_heads=2, fit=False).setup(tiny_trainer(), module, "fit")
    with pytest.raises(ValueError, match=r"fit='yes' must be True"):
        KeyValueMerging(num_key_value_heads=2, fit="yes")
    with pytest.raises(ValueError, match=r"calibration_batches=0 must be a positive integer"):
        KeyValueMerging(num_key_value_heads=2, calibration_batches=0)


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


class MergedWeights(L.Callback):
    """Keeps every attention weight as the first step of epoch 1 meets it (after a merge before that epoch)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 0:
            self.weights = {name: value.clone() for name, value in pl_module.model.state_dict().items()
                            if "self_attn" in name}


def test_a_run_resumed_before_the_fitted_merge_merges_as_the_uninterrupted_one(tmp_path):
    """The merge's calibration batches travel in the checkpoint taken before it."""

    def run(max_epochs, ckpt_path=None):
        L.seed_everything(0)
        module = GatedLanguageModel(model=nine_heads(), learning_rate=1e-3)
        spy = MergedWeights()
        callbacks = [HeadMetrics(), HeadPruning("gradient", schedule={0: 1 / 9}, scope="layer", compensate="linear"),
                     KeyValueMerging(num_key_value_heads=2, epoch=1, calibration_batches=2), spy]
        trainer = tiny_trainer(max_epochs=max_epochs, limit_train_batches=2, callbacks=callbacks)
        trainer.fit(module, tiny_data(block_size=32, batch_size=2), ckpt_path=ckpt_path)
        return module, trainer, spy

    whole, _, merged = run(2)
    half, trainer, _ = run(1)
    assert not half.gates.merged_layers().any()
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    state = torch.load(tmp_path / "half.ckpt", weights_only=False)["callbacks"]["KeyValueMerging"]
    assert len(state["recent_batches"]) == 2
    resumed, _, merged_after_resuming = run(2, ckpt_path=tmp_path / "half.ckpt")
    assert whole.gates.merged_layers().all()
    assert torch.equal(whole.gates.key_value_mix, resumed.gates.key_value_mix)
    assert merged.weights.keys() == merged_after_resuming.weights.keys()
    for name, expected in merged.weights.items():
        assert torch.equal(expected, merged_after_resuming.weights[name]), name


def test_a_fitted_merge_refuses_batches_without_input_ids_and_a_diverged_model(tokens):
    module = GatedLanguageModel(model=nine_heads())
    merging = KeyValueMerging(num_key_value_heads=2, epoch=0)
    trainer = tiny_trainer()
    merging.setup(trainer, module, "fit")
    with pytest.raises(ValueError, match=r"must be dicts with 'input_ids'.*got tuple. Pass fit=False"):
        merging.on_train_batch_start(trainer, module, (tokens, tokens), 0)
    module.gates.prune([(0, 4), (1, 8)])
    with torch.no_grad():
        module.model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"statistics on the calibration batches are not finite at epoch 0"):
        merging.on_train_batch_start(trainer, module, {"input_ids": tokens}, 0)
    assert not module.gates.merged_layers().any()  # nothing merged into the diverged model
