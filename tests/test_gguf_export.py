"""GGUF export without a runtime: how each layout is described to llama.cpp, what is refused, what is written."""

import gguf
import pytest
import torch
from conftest import tiny_model

from sentinel_lightning.compaction import compact
from sentinel_lightning.gates import attach_gates
from sentinel_lightning.gguf_export import LayerLayout, architecture_of, check_quantize, layer_layouts, write_gguf

# Pruned (layer, head) pairs of a 3-layer Llama of 4 query heads in 2 groups (head dim 8), by layout.
LAYOUTS = {
    "plain": None,
    "uniform": [(layer, head) for layer in range(3) for head in (2, 3)],  # one whole group in every layer
    "sizes": [(0, 0), (0, 1), (2, 2), (2, 3)],  # layers of 1, 2 and 1 groups, equal groups inside each
    "unequal": [(0, 0), (1, 3), (2, 0), (2, 1)],  # groups of 1 and 2 query heads in layers 0 and 1
    "empty": [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0)],  # layer 1 without attention
    "empty_first": [(0, 0), (0, 1), (0, 2), (0, 3), (2, 3)],  # layer 0 without attention
}


def pruned_llama(layout: str, compensation: bool = False, family: str = "llama", width: int = 32):
    """A compacted tiny Llama of 3 layers of 4 heads (head dim ``width / 4``) with the heads of ``LAYOUTS[layout]``
    pruned (random compensation: non-zero output biases, an empty layer's included)."""
    model = tiny_model(family, num_layers=3, num_heads=4, num_kv_heads=2, width=width)
    if LAYOUTS[layout] is None:
        return model
    gates = attach_gates(model)
    torch.manual_seed(3)
    gates.prune(LAYOUTS[layout], compensation=torch.randn(3, 4, width // 4) if compensation else None)
    return compact(model)


@torch.no_grad()
def transformers_greedy(model, prompt: list[int], count: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10, 5, 200, 17]


def test_layouts_follow_the_kept_groups():
    assert layer_layouts(pruned_llama("plain")) == [LayerLayout(4, 2, (0, 1, 2, 3))] * 3
    assert layer_layouts(pruned_llama("uniform")) == [LayerLayout(2, 1, (0, 1))] * 3
    assert layer_layouts(pruned_llama("sizes")) == [
        LayerLayout(2, 1, (0, 1)), LayerLayout(4, 2, (0, 1, 2, 3)), LayerLayout(2, 1, (0, 1))]
    # Layer 0 keeps query heads 1 (group 0) and 2, 3 (group 1): group 0 gets 2 slots, its second one padding.
    unequal = layer_layouts(pruned_llama("unequal"))
    assert unequal[0] == LayerLayout(4, 2, (0, 2, 3)) and unequal[0].padding == 1
    assert unequal[1] == LayerLayout(4, 2, (0, 1, 2)) and unequal[2] == LayerLayout(2, 1, (0, 1))


def test_a_layer_without_attention_has_no_heads_unless_it_is_the_first_or_adds_a_bias():
    assert layer_layouts(pruned_llama("empty"))[1] == LayerLayout(0, 0, ())
    assert layer_layouts(pruned_llama("empty_first"))[0] == LayerLayout(1, 1, (), zero_head=True)
    compensated = pruned_llama("empty", compensation=True)
    bias = compensated.model.layers[1].self_attn.bias
    assert bias is not None and bias.abs().sum() > 0
    assert layer_layouts(compensated, [None, bias, None])[1] == LayerLayout(1, 1, (), zero_head=True)


def test_uniform_layouts_are_llama_and_others_deci(tmp_path):
    assert architecture_of(layer_layouts(pruned_llama("uniform"))) == "llama"
    assert architecture_of(layer_layouts(pruned_llama("sizes"))) == "deci"
    summary = write_gguf(pruned_llama("sizes"), str(tmp_path / "sizes.gguf"))
    reader = gguf.GGUFReader(str(tmp_path / "sizes.gguf"))
    assert reader.fields["general.architecture"].contents() == "deci" == summary["architecture"]
    assert reader.fields["deci.attention.head_count"].contents() == [2, 4, 2] == summary["num_heads"]
    assert reader.fields["deci.attention.head_count_kv"].contents() == [1, 2, 1]
    assert reader.fields["deci.attention.key_length"].contents() == 8  # not hidden size / heads of layer 0 (16)
    names = {tensor.name for tensor in reader.tensors}
    assert "blk.0.attn_q.weight" in names and "output.weight" in names and "blk.0.attn_q.bias" not in names


def test_the_rotary_permutation_and_the_padding_are_written(tmp_path):
    model = pruned_llama("unequal")
    write_gguf(model, str(tmp_path / "unequal.gguf"))
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(str(tmp_path / "unequal.gguf")).tensors}
    query = torch.from_numpy(tensors["blk.0.attn_q.weight"].data.copy())  # [4 slots * 8, 32]
    output = torch.from_numpy(tensors["blk.0.attn_output.weight"].data.copy())  # [32, 4 slots * 8]
    source = model.model.layers[0].self_attn
    assert query[8:16].abs().sum() == 0 and output[:, 8:16].abs().sum() == 0  # the padding slot
    # Slot 0 holds kept head 0: its rows go from halves (Hugging Face) to interleaved pairs (llama.cpp).
    head = source.q_proj.weight[:8].detach()
    assert torch.equal(query[0:8], torch.stack([head[:4], head[4:]], dim=1).reshape(8, 32))
    assert torch.equal(output[:, 16:32], source.o_proj.weight[:, 8:24].detach())


def test_bad_arguments_are_refused_with_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match=r"quantize='q9'.*q8_0"):
        check_quantize("q9")
    assert check_quantize("Q8_0") == "q8_0" and check_quantize("f32") is None
    with pytest.raises(ValueError, match=r"Llama family.*model_type='gpt2'"):
        write_gguf(tiny_model("gpt2"), str(tmp_path / "gpt2.gguf"))
    (tmp_path / "taken.gguf").write_text("mine")
    with pytest.raises(FileExistsError, match=r"taken\.gguf.*overwrite"):
        write_gguf(pruned_llama("plain"), str(tmp_path / "taken.gguf"))
    assert (tmp_path / "taken.gguf").read_text() == "mine"
