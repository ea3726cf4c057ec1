"""Compaction: pruned heads leave the weights, logits and greedy generation stay, and the result saves and loads."""

import json
import os

import pytest
import torch
from conftest import VOCAB, byte_tokenizer, tiny_data, tiny_model, tiny_trainer
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import GgufConfig

from sentinel_lightning import GatedLanguageModel
from sentinel_lightning.cli.export import export_checkpoint
from sentinel_lightning.compaction import compact, count_parameters, weight_bytes
from sentinel_lightning.families import FAMILIES, EmptyAttention, attention_modules
from sentinel_lightning.gates import attach_gates, find_gates
from sentinel_lightning.saving import load_pruned, save_pruned

GROUPED = tuple(name for name, entry in FAMILIES.items() if entry.grouped_query)


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


def greedy(model, prompt, tokens=8):
    return model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens, min_new_tokens=tokens,
        do_sample=False, pad_token_id=VOCAB - 4,
    )


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
    expected_kv = [[], [0, 1, 1], [0, 1]] if family in GROUPED else [[], [1, 2, 3], [0, 2]]
    assert compacted.config.kept_key_value_heads == expected_kv
    # The input is left as it was: still gated, same weights, same logits.
    assert find_gates(gated) is not None and count_parameters(gated) == parameters_before
    with torch.no_grad():
        assert torch.equal(gated(tokens).logits, expected)


def test_compact_takes_a_lightning_module(tokens):
    module = GatedLanguageModel(model=tiny_model("llama", num_layers=2)).eval()
    module.gates.prune([(0, 1), (1, 3)])
    compacted = compact(module)
    with torch.no_grad():
        assert (compacted(tokens).logits - module(tokens)).abs().max().item() <= 1e-4
    assert find_gates(module) is not None


@pytest.mark.parametrize(
    "kept, expected",
    [
        ([0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2]),  # nothing pruned: groups of 3
        ([0, 1, 3, 4], [0, 1]),  # equal groups of 2: no duplication
        ([0, 1, 2, 3, 6, 7], [0, 0, 0, 1, 2, 2]),  # groups of 3, 1 and 2: duplicated to groups of 1
        ([0, 1, 2, 6, 7, 8], [0, 2]),  # a whole group pruned: its key/value head goes
        ([], []),
    ],
)
def test_key_value_sources_make_groups_uniform(kept, expected):
    assert FAMILIES["llama"].key_value_sources(kept, num_heads=9, num_kv_heads=3) == expected


def test_save_and_load_pruned_round_trip(family, tokens, tmp_path):
    gated = pruned_model(family)
    save_pruned(gated, str(tmp_path), tokenizer=byte_tokenizer())  # compacts on the way
    loaded = load_pruned(str(tmp_path))
    with torch.no_grad():
        assert (loaded(tokens).logits - gated(tokens).logits).abs().max().item() <= 1e-4
    assert type(loaded) is type(gated)
    assert count_parameters(loaded) == count_parameters(compact(gated))
    assert os.path.isfile(tmp_path / "model.safetensors") and os.path.isfile(tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "config.json").read_text())["kept_heads"] == [[], [1, 2, 3], [0, 2]]


def test_uniform_llama_loads_with_plain_from_pretrained(tokens, tmp_path):
    gated = tiny_model("llama", num_layers=2, num_heads=6, num_kv_heads=2, width=48)
    attach_gates(gated).prune([(0, 0), (0, 4), (1, 2), (1, 3)])  # one query head of each group of 3, every layer
    save_pruned(gated, str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads) == (4, 2)
    with torch.no_grad():
        assert (loaded(tokens).logits - gated(tokens).logits).abs().max().item() <= 1e-4
    assert torch.equal(greedy(loaded, tokens[:1]), greedy(gated, tokens[:1]))


def test_unequal_layers_refuse_plain_from_pretrained_but_load_pruned(tokens, tmp_path):
    gated = tiny_model("llama", num_layers=2, num_heads=6, num_kv_heads=2, width=48)
    attach_gates(gated).prune([(0, 0), (1, 2), (1, 3)])
    save_pruned(gated, str(tmp_path))
    with pytest.raises(RuntimeError):  # never silently re-initialised
        AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert (load_pruned(str(tmp_path))(tokens).logits - gated(tokens).logits).abs().max().item() <= 1e-4


def test_save_drops_a_left_over_gguf_quantization_config(tmp_path):
    model = tiny_model("llama")
    model.config.quantization_config = GgufConfig(gguf_file="model.gguf", dequantize=True)
    save_pruned(model, str(tmp_path))
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert model.config.quantization_config is not None  # the caller's model is left as it was
    load_pruned(str(tmp_path))


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
