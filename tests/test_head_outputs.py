import pytest
import torch
from conftest import tiny_model

from sentinel_lightning.families import output_projections
from sentinel_lightning.gates import attach_gates
from sentinel_lightning.head_outputs import HeadOutputRecording
from sentinel_lightning.metrics import causal_lm_nll


def test_per_example_gradients_add_up_to_the_gate_gradient(family, tokens):
    model = tiny_model(family)
    gates = attach_gates(model)
    gates.prune([(1, 2)])
    with HeadOutputRecording(model) as recording:
        nll_sum, count = causal_lm_nll(model, {"input_ids": tokens})
        (nll_sum / count).backward()
    assert recording.examples == tokens.shape[0]
    assert torch.allclose(recording.example_gradient, gates.values.grad, atol=1e-6)
    assert recording.example_importance[1, 2] == 0 and (recording.example_importance[gates.active] > 0).all()
    # Examples cancel in the batch gradient, never in the per-example mean: |sum| <= sum of |.|.
    assert torch.all(gates.values.grad.abs() <= recording.example_importance + 1e-7)


def test_output_sums_are_what_the_heads_write_before_their_gates(tokens):
    model = tiny_model("llama")
    gates = attach_gates(model)
    with torch.no_grad():
        gates.values[0, 1] = 0.25  # the recording sees the head's output, not the gated one
    seen = []
    handle = output_projections(model)[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]), prepend=True)
    with torch.no_grad(), HeadOutputRecording(model) as recording:
        model(tokens)
    handle.remove()
    (before_any_hook,) = seen
    expected = before_any_hook.unflatten(-1, (4, gates.head_dim)).sum(dim=(0, 1))  # [H, D]
    assert recording.positions == tokens.numel()
    assert torch.allclose(recording.output_sums[0], expected, atol=1e-5)


def test_the_recording_removes_its_hooks(tokens):
    model = tiny_model("gpt2")
    attach_gates(model)
    counts = [len(projection._forward_pre_hooks) for projection in output_projections(model)]
    with HeadOutputRecording(model):
        assert [len(p._forward_pre_hooks) for p in output_projections(model)] == [c + 2 for c in counts]
    assert [len(projection._forward_pre_hooks) for projection in output_projections(model)] == counts
    with pytest.raises(ValueError, match="no HeadGates"):
        HeadOutputRecording(tiny_model("gpt2"))
