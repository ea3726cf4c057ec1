import copy
import pickle

import pytest
import torch
from conftest import VOCAB, tiny_model

from sentinel_lightning.gates import HeadGates, attach_gates, detach_gates, find_gates, find_or_attach_gates
from sentinel_lightning.standalone.families import head_shape, output_projections


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_gates_at_one_give_the_plain_logits(family, tokens, implementation):
    model = tiny_model(family)
    model.set_attn_implementation(implementation)
    plain = model(tokens).logits
    gates = attach_gates(model)
    assert gates.values.shape == (2, 4) and torch.all(gates.values == 1.0) and gates.active.all()
    assert (model(tokens).logits - plain).abs().max() <= 1e-5


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_zero_gate_equals_zeroing_the_heads_slice(family, tokens, implementation):
    model = tiny_model(family)
    model.set_attn_implementation(implementation)
    _, _, head_dim = head_shape(model)
    layer, head = 1, 2
    projection = output_projections(model)[layer]

    def zero_slice(module, args):
        hidden = args[0].clone()
        hidden[..., head * head_dim : (head + 1) * head_dim] = 0
        return (hidden, *args[1:])

    handle = projection.register_forward_pre_hook(zero_slice)
    expected = model(tokens).logits
    handle.remove()
    gates = attach_gates(model)
    gates.prune([(layer, head)])
    assert (model(tokens).logits - expected).abs().max() <= 1e-5


def test_partial_gate_scales_the_head(tokens):
    model = tiny_model("llama")
    gates = attach_gates(model)
    full = model(tokens).logits
    with torch.no_grad():
        gates.values[0, 1] = 0.5
    half = model(tokens).logits
    with torch.no_grad():
        gates.values[0, 1] = 0.0
    zero = model(tokens).logits
    assert not torch.allclose(full, half) and not torch.allclose(half, zero)


def test_prune_reactivate_and_properties():
    gates = HeadGates(num_layers=3, num_heads=4, head_dim=8)
    with torch.no_grad():
        gates.values[1, 2] = 0.7
    gates.prune([(1, 2), (0, 0)])
    assert gates.pruned_heads() == [(0, 0), (1, 2)]
    assert gates.num_active == 10 and gates.sparsity == pytest.approx(2 / 12)
    assert gates.effective()[1, 2] == 0.0 and gates.effective()[0, 1] == 1.0
    with torch.no_grad():
        gates.values[1, 2] = 0.1  # an optimizer moved it while pruned
    gates.reactivate([(1, 2)])
    assert gates.values[1, 2].item() == pytest.approx(0.7) and gates.active[1, 2]
    assert gates.pruned_heads() == [(0, 0)]
    with pytest.raises(ValueError, match=r"\(3, 0\)"):
        gates.prune([(3, 0)])


def test_pruned_gate_gets_no_gradient(tokens):
    model = tiny_model("gpt2")
    gates = attach_gates(model)
    gates.prune([(0, 3)])
    model(tokens).logits.sum().backward()
    assert gates.values.grad[0, 3] == 0.0
    assert (gates.values.grad[gates.active] != 0).all()


def test_gates_travel_in_state_dict_and_copies(tokens):
    model = tiny_model("opt")
    gates = attach_gates(model)
    gates.prune([(1, 1)])
    state = model.state_dict()
    assert {"head_gates.values", "head_gates.active"} <= set(state)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone_gates = find_gates(clone)
        assert clone_gates is not gates
        clone_gates.prune([(0, 0)])  # the copy's hooks follow the copy's gates, not the original's
        assert torch.allclose(clone(tokens).logits, _pruned_logits(tokens, [(1, 1), (0, 0)]), atol=1e-5)


def _pruned_logits(tokens, heads):
    model = tiny_model("opt")
    attach_gates(model).prune(heads)
    return model(tokens).logits


def test_attach_is_idempotent_and_detach_restores(tokens):
    model = tiny_model("gpt_neox")
    plain = model(tokens).logits
    gates = attach_gates(model)
    assert attach_gates(model) is gates and find_or_attach_gates(model) is gates
    gates.prune([(0, 0), (1, 1)])
    detach_gates(model)
    assert find_gates(model) is None
    assert torch.equal(model(tokens).logits, plain)


def test_unsupported_model_names_class_and_families():
    with pytest.raises(ValueError, match=r"Unsupported model Linear.*gpt2.*llama"):
        attach_gates(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"no HeadGates and no transformers\.PreTrainedModel"):
        find_or_attach_gates(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_grouped_query_llama_has_a_gate_per_query_head(tokens):
    model = tiny_model("llama", num_heads=4, num_kv_heads=1)
    gates = attach_gates(model)
    assert (gates.num_layers, gates.num_heads) == (2, 4)
    assert model(tokens).logits.shape == (*tokens.shape, VOCAB)
