"""Output compensation: a pruned head writes its mean output instead of zero, and compaction folds it into a bias."""

import json
import os

import lightning as L
import pytest
import torch
from conftest import HEAD_COMPACTING, tiny_model
from test_compaction import GROUPED, STOCK_HEAD_COUNTS, greedy, pruned_model
from test_saving import CODE_FILES, load_without_package, uniform_model

from sentinel_lightning import GatedLanguageModel, HeadMetrics, HeadPruning
from sentinel_lightning.compaction import compact
from sentinel_lightning.gates import attach_gates, find_gates
from sentinel_lightning.saving import load_pruned, save_pruned
from sentinel_lightning.standalone.families import (
    FAMILIES,
    OUTPUT_BIAS_ATTRIBUTE,
    EmptyAttention,
    attention_modules,
    output_projections,
)


def compensate(model, seed: int = 0):
    """Gives every pruned head of a gated model a random compensation (and the active ones one that is unused)."""
    gates = find_gates(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gates.compensation.copy_(torch.randn(gates.compensation.shape, generator=generator))
    return model


def replaced_by_hand(model, values, active, compensation):
    """Forward pre-hooks on a plain model that gate each head and overwrite each pruned head's slice."""
    num_heads, head_dim = active.shape[1], compensation.shape[-1]

    def hook_of(layer):
        def hook(module, args):
            heads = args[0].unflatten(-1, (num_heads, head_dim)) * (values[layer] * active[layer]).unsqueeze(-1)
            for head in (~active[layer]).nonzero().flatten().tolist():
                heads[..., head, :] = compensation[layer, head]
            return (heads.flatten(-2), *args[1:])

        return hook

    return [projection.register_forward_pre_hook(hook_of(layer)) for layer, projection in
            enumerate(output_projections(model))]


@pytest.mark.parametrize("compensated", [True, False])
def test_a_pruned_head_writes_exactly_its_compensation(family, tokens, compensated):
    gated = pruned_model(family)
    gates = find_gates(gated)
    if compensated:
        compensate(gated)
    plain = tiny_model(family, num_layers=3, num_heads=4, num_kv_heads=2)
    plain.config._attn_implementation = "sdpa"
    values, active, compensation = gates.values.detach(), gates.active, gates.compensation
    handles = replaced_by_hand(plain, values, active, compensation)
    with torch.no_grad():
        expected = plain(tokens).logits
        logits = gated(tokens).logits
    for handle in handles:
        handle.remove()
    assert torch.equal(logits, expected)  # zero compensation: exactly today's zeroed heads
    with torch.no_grad():
        assert not torch.equal(plain(tokens).logits, logits)


def test_old_checkpoints_without_compensation_load_with_zeros():
    model = tiny_model("llama")
    attach_gates(model).prune([(0, 1)])
    state = model.state_dict()
    del state["head_gates.compensation"]
    fresh = tiny_model("llama")
    gates = attach_gates(fresh)
    with torch.no_grad():
        gates.compensation.fill_(1.0)
    fresh.load_state_dict(state)  # strict
    assert not gates.compensation.any() and not gates.active[0, 1]


def fit(callbacks, epochs=2):
    from conftest import tiny_data, tiny_trainer

    L.seed_everything(0)
    module = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    tiny_trainer(max_epochs=epochs, callbacks=callbacks).fit(module, tiny_data())
    return module


@pytest.mark.parametrize("compensated", [True, False])
def test_head_pruning_compensates_with_the_head_metrics_mean_output(compensated):
    metrics = HeadMetrics(reset_on_prune=False)
    pruning = HeadPruning("gradient", {1: 0.25}, compensate=compensated)  # after the last epoch: metrics stay
    module = fit([metrics, pruning])
    gates = module.gates
    pruned = ~gates.active
    assert int(pruned.sum()) == 2
    output_mean = metrics.compute()["output_mean"]  # [L, H, D]
    assert output_mean.shape == gates.compensation.shape and torch.isfinite(output_mean).all()
    if compensated:
        assert torch.allclose(gates.compensation[pruned], output_mean[pruned]) and gates.compensation[pruned].any()
    else:
        assert not gates.compensation[pruned].any()
    assert not gates.compensation[gates.active].any()  # only pruned heads get one
    assert torch.equal(module.state_dict()["gates.compensation"], gates.compensation)  # checkpoints carry it


def test_compensation_needs_head_metrics_and_a_bool():
    with pytest.raises(ValueError, match="compensate='yes'"):
        HeadPruning(compensate="yes")
    with pytest.raises(ValueError, match=r"compensate='mean'\) needs a HeadMetrics"):
        fit([HeadPruning("random", {0: 0.25}, compensate=True)], epochs=1)


def test_pruning_with_unknown_means_writes_zero_and_warns():
    gates = attach_gates(tiny_model("llama"))
    means = torch.ones(gates.compensation.shape)
    means[0, 1] = float("nan")
    with pytest.warns(UserWarning, match="no finite mean output for 1"):
        HeadPruning.prune(L.Trainer(logger=False, enable_checkpointing=False), gates, [(0, 1), (1, 2)], None, means)
    assert not gates.compensation[0, 1].any() and torch.equal(gates.compensation[1, 2], means[1, 2])


# Uniform layouts of these families state the biases compaction adds in their config, or cannot.
STATES_OUTPUT_BIAS = [name for name in STOCK_HEAD_COUNTS if FAMILIES[name].bias_attribute is not None]
NO_OUTPUT_BIAS = [name for name in STOCK_HEAD_COUNTS if FAMILIES[name].bias_attribute is None]


@pytest.mark.parametrize("family", HEAD_COMPACTING)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_compaction_folds_the_compensation_exactly(family, attn_implementation, tokens, tmp_path):
    """Layer 0 empty, layer 1 unequal groups (grouped families), layer 2 two heads of four; partial gates."""
    gated = compensate(pruned_model(family, attn_implementation))
    with torch.no_grad():
        expected = gated(tokens).logits
    compacted = compact(gated)
    with torch.no_grad():
        assert (compacted(tokens).logits - expected).abs().max().item() <= 1e-4
        first = compacted(tokens[:, :8], use_cache=True)
        second = compacted(tokens[:, 8:], cache=first.cache, use_cache=True)
    assert (second.logits - expected[:, 8:]).abs().max().item() <= 1e-4
    assert torch.equal(greedy(compacted, tokens[:1]), greedy(gated, tokens[:1]))
    empty = attention_modules(compacted)[0]
    assert isinstance(empty, EmptyAttention) and empty.bias is not None and empty.bias.any()
    entry, had_bias = FAMILIES[family], output_projections(gated)[1].bias is not None
    assert getattr(compacted.config, OUTPUT_BIAS_ATTRIBUTE, False) == (entry.bias_attribute is None and not had_bias)
    if entry.bias_attribute is not None and not had_bias:
        assert getattr(compacted.config, entry.bias_attribute)
        assert not attention_modules(compacted)[2].q_proj.bias.any()  # zero, so that the stock modules fit
    # Loading builds the biases the config records.
    save_pruned(compacted, str(tmp_path))
    with torch.no_grad():
        assert (load_pruned(str(tmp_path))(tokens).logits - expected).abs().max().item() <= 1e-4


def test_zero_compensation_adds_no_bias(tokens):
    compacted = compact(pruned_model("mistral"))
    assert all(attention.o_proj.bias is None for attention in attention_modules(compacted)[1:])
    assert not hasattr(compacted.config, OUTPUT_BIAS_ATTRIBUTE)


@pytest.mark.parametrize("family", STATES_OUTPUT_BIAS)
def test_uniform_compensated_layouts_load_with_plain_transformers(family, tokens, tmp_path):
    compacted = compact(compensate(uniform_model(family)))
    save_pruned(compacted, str(tmp_path / "model"))
    assert not any(os.path.isfile(tmp_path / "model" / name) for name in CODE_FILES)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config[FAMILIES[family].bias_attribute] is True and OUTPUT_BIAS_ATTRIBUTE not in config
    printed = load_without_package(tmp_path / "model", compacted, tokens, tmp_path, trust_remote_code=False)
    assert printed.split()[0] == type(compacted).__name__


@pytest.mark.parametrize("family", NO_OUTPUT_BIAS)  # Mistral, Qwen2, Phi-3: no config states an o_proj bias
def test_uniform_compensated_layouts_without_a_bias_setting_ship_their_modeling_code(family, tokens, tmp_path):
    gated = uniform_model(family)
    compacted = compact(compensate(gated))
    save_pruned(compacted, str(tmp_path / "model"))
    assert all(os.path.isfile(tmp_path / "model" / name) for name in CODE_FILES)  # no config states an o_proj bias
    with torch.no_grad():
        assert (load_pruned(str(tmp_path / "model"))(tokens).logits - gated(tokens).logits).abs().max() <= 1e-4
    printed = load_without_package(tmp_path / "model", compacted, tokens, tmp_path, trust_remote_code=True)
    assert printed.split()[0] == f"Pruned{type(compacted).__name__}"


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_compensated_layouts_load_with_remote_code_without_the_package(family, tokens, tmp_path):
    compacted = compact(compensate(pruned_model(family)))
    save_pruned(compacted, str(tmp_path / "model"))
    printed = load_without_package(tmp_path / "model", compacted, tokens, tmp_path, trust_remote_code=True)
    assert "EmptyAttention" in printed and ("QuerySlots" in printed) == (family in GROUPED)
