"""Saving and loading compacted models: load_pruned, plain from_pretrained, remote code without the package."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import HEAD_COMPACTING, byte_tokenizer, tiny_model
from test_compaction import GROUPED, STOCK_HEAD_COUNTS, greedy, key_value_widths, pruned_model
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import GgufConfig

from sentinel_lightning.compaction import compact, count_parameters
from sentinel_lightning.gates import attach_gates, find_gates
from sentinel_lightning.saving import MODELING_MODULE, load_pruned, save_pruned
from sentinel_lightning.standalone.families import attention_modules
from sentinel_lightning.standalone.pruned_modeling import has_query_slots, key_value_indices

CODE_FILES = ("families.py", "pruned_modeling.py", f"{MODELING_MODULE}.py")

# Run in a fresh interpreter (-I: no user site, no current folder on sys.path) in which sentinel_lightning cannot
# be imported, even though it is installed: loads the folder sys.argv[1] (trust_remote_code when sys.argv[2] is
# "1") and compares with the expected logits and greedy tokens that the test saved next to it.
WITHOUT_PACKAGE = '''
import sys


class HidePackage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "sentinel_lightning":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")


sys.meta_path.insert(0, HidePackage())
try:
    import sentinel_lightning
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("sentinel_lightning is still importable")

import torch
from transformers import AutoModelForCausalLM

folder, trust = sys.argv[1], sys.argv[2] == "1"
expected = torch.load(sys.argv[3])
model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust, output_loading_info=True)
problems = {key: value for key, value in info.items() if value}
assert not problems, problems
model.eval()
with torch.no_grad():
    logits = model(expected["tokens"]).logits
difference = (logits - expected["logits"]).abs().max().item()
assert difference <= 1e-5, difference
prompt = expected["tokens"][:1]
generated = model.generate(
    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8, do_sample=False,
    pad_token_id=expected["pad_token_id"],
)
assert torch.equal(generated, expected["generated"])
assert not [name for name in sys.modules if name.startswith("sentinel_lightning")]
print(type(model).__name__, sorted({type(module).__name__ for module in model.modules()
                                    if type(module).__name__.endswith(("Attention", "Slots"))}))
'''


def load_without_package(folder, model, tokens, tmp_path, trust_remote_code: bool) -> str:
    """Loads ``folder`` in a subprocess that cannot import sentinel_lightning; returns what it prints.

    The subprocess checks the loading info (no missing or unexpected keys), the logits (to 1e-5 of ``model``'s)
    and greedy generation with the key/value cache.
    """
    pad_token_id = 256
    with torch.no_grad():
        expected = {
            "tokens": tokens, "logits": model(tokens).logits, "pad_token_id": pad_token_id,
            "generated": greedy(model, tokens[:1]),
        }
    torch.save(expected, tmp_path / "expected.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    arguments = [str(folder), "1" if trust_remote_code else "0", str(tmp_path / "expected.pt")]
    result = subprocess.run(
        [sys.executable, "-I", "-c", WITHOUT_PACKAGE, *arguments], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("family", HEAD_COMPACTING)
def test_save_and_load_pruned_round_trip(family, tokens, tmp_path):
    gated = pruned_model(family)
    save_pruned(gated, str(tmp_path), tokenizer=byte_tokenizer())  # compacts on the way
    loaded = load_pruned(str(tmp_path))
    with torch.no_grad():
        assert (loaded(tokens).logits - gated(tokens).logits).abs().max().item() <= 1e-4
    assert type(loaded) is type(gated)
    compacted = compact(gated)
    assert count_parameters(loaded) == count_parameters(compacted)
    assert key_value_widths(loaded) == key_value_widths(compacted)  # no key/value head repeated on the way
    assert has_query_slots(attention_modules(loaded)[1]) == (family in GROUPED)
    assert os.path.isfile(tmp_path / "model.safetensors") and os.path.isfile(tmp_path / "tokenizer.json")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["kept_heads"] == [[], [1, 2, 3], [0, 2]]
    # Not uniform (an empty layer): saved with its modeling code, which the config points at.
    assert all(os.path.isfile(tmp_path / name) for name in CODE_FILES)
    assert config["auto_map"] == {
        "AutoConfig": f"{MODELING_MODULE}.Pruned{type(gated.config).__name__}",
        "AutoModelForCausalLM": f"{MODELING_MODULE}.Pruned{type(gated).__name__}",
    }
    assert config["model_type"] == f"sentinel_{gated.config.model_type}"  # plain transformers must not build it


def uniform_model(family: str):
    """2 layers of 6 query heads in 2 groups; every layer loses one query head of each group."""
    gated = tiny_model(family, num_layers=2, num_heads=6, num_kv_heads=2, width=48)
    attach_gates(gated).prune([(0, 0), (0, 4), (1, 2), (1, 3)])
    return gated


def uniform_llama():
    return uniform_model("llama")


def test_uniform_llama_loads_with_plain_from_pretrained(tokens, tmp_path):
    gated = uniform_llama()
    save_pruned(gated, str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads) == (4, 2)
    assert loaded.config.head_dim == 8
    with torch.no_grad():
        assert (loaded(tokens).logits - gated(tokens).logits).abs().max().item() <= 1e-4
    assert torch.equal(greedy(loaded, tokens[:1]), greedy(gated, tokens[:1]))
    assert not any(os.path.isfile(tmp_path / name) for name in CODE_FILES)  # a plain transformers folder
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("family", STOCK_HEAD_COUNTS)
def test_uniform_folder_loads_in_a_process_without_the_package(family, tokens, tmp_path):
    compacted = compact(uniform_model(family))
    save_pruned(compacted, str(tmp_path / "model"))
    assert not any(os.path.isfile(tmp_path / "model" / name) for name in CODE_FILES)  # a stock folder
    printed = load_without_package(tmp_path / "model", compacted, tokens, tmp_path, trust_remote_code=False)
    assert printed.split()[0] == type(compacted).__name__


@pytest.mark.parametrize("family", HEAD_COMPACTING)  # GPT-NeoX renames a checkpoint key
def test_any_layout_loads_with_remote_code_in_a_process_without_the_package(family, tokens, tmp_path):
    """Layer 0 empty, layer 1 unequal groups (grouped-query families), layer 2 a different number of heads."""
    compacted = compact(pruned_model(family))
    save_pruned(compacted, str(tmp_path / "model"))
    printed = load_without_package(tmp_path / "model", compacted, tokens, tmp_path, trust_remote_code=True)
    assert printed.split()[0] == f"Pruned{type(compacted).__name__}"
    assert "EmptyAttention" in printed
    assert ("OutputSlots" in printed) == (family in GROUPED)  # unequal groups in query slots


def test_unequal_layers_refuse_plain_from_pretrained_but_load_pruned(tokens, tmp_path):
    gated = tiny_model("llama", num_layers=2, num_heads=6, num_kv_heads=2, width=48)
    attach_gates(gated).prune([(0, 0), (1, 2), (1, 3)])
    save_pruned(gated, str(tmp_path))
    with pytest.raises(ValueError, match="trust_remote_code"):  # never silently re-initialised
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


def test_folders_saved_with_repeated_key_value_heads_still_read():
    """Before ``key_value_index`` existed, unequal groups were saved as equal groups of repeated key/value heads."""
    config = tiny_model("llama").config
    config.kept_heads, config.kept_key_value_heads = [[], [1, 2, 3]], [[], [0, 1, 1]]
    assert key_value_indices(config) == [[], [0, 1, 2]]


def test_a_config_that_disagrees_with_itself_is_refused(tmp_path):
    save_pruned(pruned_model("llama"), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["key_value_index"][1] = [0, 0, 0]  # leaves kept key/value head 1 unread
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"key_value_index\[1\]"):
        load_pruned(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# Nothing lost or left stale (issue 11)


def test_save_refuses_a_folder_that_holds_files(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text("mine")
    with pytest.raises(FileExistsError, match=r"model'.*README\.md.*overwrite=True"):
        save_pruned(uniform_llama(), str(folder))
    assert sorted(os.listdir(folder)) == ["README.md"]
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no staging folder left behind
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="directory="):
        save_pruned(uniform_llama(), str(tmp_path / "file"), overwrite=True)


def test_overwrite_leaves_no_stale_model_files_and_keeps_other_files(tokens, tmp_path):
    folder = tmp_path / "model"
    save_pruned(pruned_model("llama"), str(folder), tokenizer=byte_tokenizer())  # with modeling code + tokenizer
    stale = ["pytorch_model.bin", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "vocab.json",
             "merges.txt", "generation_config.json", "configuration_other.py"]
    for name in stale:
        (folder / name).write_text("stale")
    (folder / "README.md").write_text("mine")
    (folder / "notes").mkdir()
    assert all(os.path.isfile(folder / name) for name in CODE_FILES)

    gated = uniform_llama()
    save_pruned(gated, str(folder), overwrite=True)  # a plain transformers folder, no tokenizer

    save_pruned(gated, str(tmp_path / "fresh"))
    assert set(os.listdir(folder)) == set(os.listdir(tmp_path / "fresh")) | {"README.md", "notes"}
    assert (folder / "README.md").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["fresh", "model"]
    loaded = AutoModelForCausalLM.from_pretrained(str(folder))  # no stale auto_map, shard index or .bin in the way
    with torch.no_grad():
        assert (loaded(tokens).logits - gated(tokens).logits).abs().max().item() <= 1e-4


def test_saving_into_the_folder_the_model_was_loaded_from(tokens, tmp_path):
    save_pruned(uniform_llama(), str(tmp_path))
    loaded = load_pruned(str(tmp_path))  # 2 layers of 4 query heads in 2 groups
    attach_gates(loaded).prune([(0, 0), (1, 3)])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pruned(loaded, str(tmp_path))
    save_pruned(loaded, str(tmp_path), overwrite=True)
    again = load_pruned(str(tmp_path))
    with torch.no_grad():
        assert (again(tokens).logits - loaded(tokens).logits).abs().max().item() <= 1e-4
    assert again.config.kept_heads == [[2, 3, 5], [0, 1, 4]]  # original indices of the 6-head model


def test_a_failed_save_leaves_the_folder_as_it_was(tmp_path):
    folder = tmp_path / "model"
    save_pruned(uniform_llama(), str(folder))
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}

    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pruned(pruned_model("llama"), str(folder), tokenizer=BrokenTokenizer(), overwrite=True)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert sorted(os.listdir(tmp_path)) == ["model"]


@pytest.mark.parametrize("where", ["weight", "gate"])
def test_save_refuses_non_finite_weights_or_gates(where, tmp_path):
    gated = pruned_model("llama")
    with torch.no_grad():
        if where == "weight":
            gated.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
        else:
            find_gates(gated).values[1, 2] = float("inf")
    name = "model.layers.1.self_attn.k_proj.weight" if where == "weight" else "head_gates.values"
    with pytest.raises(ValueError, match=rf"non-finite.*\({name}\)"):
        save_pruned(gated, str(tmp_path / "model"))
    assert not os.path.exists(tmp_path / "model")


# ----------------------------------------------------------------------------------------------------------------
# load_pruned checks the layout its config records (issue 11)


def saved_with(tmp_path, family: str, **fields) -> str:
    """A folder of ``pruned_model(family)`` (kept heads [[], [1, 2, 3], [0, 2]]) whose config.json has ``fields``."""
    folder = tmp_path / family
    save_pruned(pruned_model(family), str(folder))
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize(
    "fields, message",
    [
        # contradicts the weights: layer 1 holds 3 query heads
        ({"kept_heads": [[], [1, 2], [0, 2]], "key_value_index": [[], [0, 1], [0, 1]]},
         r"layer 1 \(config\.kept_heads\[1\] = \[1, 2\].*q_proj\.weight is \[24, 32\] in the weights"),
        ({"kept_heads": [1, 2, 3]}, r"config\.kept_heads = \[1, 2, 3\] must be a list holding one list"),
        ({"kept_heads": "[[], [1, 2, 3], [0, 2]]"}, r"config\.kept_heads = .* must be a list"),
        ({"kept_heads": [[], [1, 2, "3"], [0, 2]]}, r"config\.kept_heads\[1\] = .* holds '3'"),
        ({"kept_heads": [[], [1, 2, 9], [0, 2]]}, r"config\.kept_heads\[1\] = \[1, 2, 9\] holds 9, .*\[0, 4\)"),
        ({"kept_heads": [[], [-1, 2, 3], [0, 2]]}, r"config\.kept_heads\[1\] = \[-1, 2, 3\] holds -1"),
        ({"kept_heads": [[], [3, 3, 1], [0, 2]]}, r"config\.kept_heads\[1\] = \[3, 3, 1\] must be distinct"),
        ({"kept_heads": [[1, 2, 3], [0, 2]]}, r"config\.kept_heads has 2 layers.*num_hidden_layers=3"),
        ({"kept_key_value_heads": [[], [0, 5], [0, 1]]}, r"config\.kept_key_value_heads\[1\] = \[0, 5\] holds 5"),
        ({"key_value_index": [[], [0, 1, 7], [0, 1]]}, r"config\.key_value_index\[1\] = \[0, 1, 7\]"),
    ],
)
def test_load_pruned_names_the_layer_and_field_of_a_bad_layout(fields, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_pruned(saved_with(tmp_path, "llama", **fields))


def test_load_pruned_refuses_separate_key_value_heads_without_grouped_query_attention(tmp_path):
    folder = saved_with(tmp_path, "gpt2", kept_key_value_heads=[[], [0, 1, 2], [0, 2]])
    with pytest.raises(ValueError, match=r"kept_key_value_heads\[1\] = \[0, 1, 2\] must equal config\.kept_heads\[1\]"):
        load_pruned(folder)
    folder = saved_with(tmp_path / "b", "gpt2", kept_heads=[[], [1, 2, 7], [0, 2]])
    with pytest.raises(ValueError, match=r"kept_heads\[1\] = \[1, 2, 7\] holds 7, not a head index in \[0, 4\)"):
        load_pruned(folder)
