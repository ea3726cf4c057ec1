from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import VOCAB, tiny_model, tiny_trainer
from torch.utils.data import DataLoader, TensorDataset

from sentinel_lightning import HeadMetrics
from sentinel_lightning.gates import attach_gates, find_gates
from sentinel_lightning.losses import causal_lm_nll
from sentinel_lightning.measure.head_outputs import ExampleImportance, HeadOutputRecording
from sentinel_lightning.measure.statistics import HeadStatistics, measure_head_metrics
from sentinel_lightning.standalone.families import output_projections


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
    handle = output_projections(model)[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[0]), prepend=True
    )
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


def compensated_loss_changes(model, tokens, mean):
    """``[B, L, H]``: each example's first-order loss change ``sum_t <dL_b/dx, m - x>`` when each head's gated
    output ``x`` (the output projection's input) is replaced by ``mean`` ``[L, H, D]``, ``L_b`` differentiated alone."""
    gates = find_gates(model)
    changes, inputs = [], []
    handles = [
        projection.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        for projection in output_projections(model)
    ]
    for example in tokens:
        inputs.clear()
        nll_sum, count = causal_lm_nll(model, {"input_ids": example[None]})
        gradients = torch.autograd.grad(nll_sum / count, inputs)
        change = [
            torch.einsum("thd,thd->h", g[0].unflatten(-1, (gates.num_heads, -1)), (m - x[0].unflatten(-1, m.shape)))
            for g, x, m in zip(gradients, inputs, mean)
        ]
        changes.append(torch.stack(change))
    for handle in handles:
        handle.remove()
    return torch.stack(changes)


def test_compensated_importance_is_the_first_order_loss_change_of_writing_the_mean(family, tokens):
    model = tiny_model(family)
    gates = attach_gates(model)
    gates.prune([(1, 2)])
    with torch.no_grad():
        gates.values[0, 1] = 0.5  # the change is that of the gated output
    with HeadOutputRecording(model) as recording:
        nll_sum, count = causal_lm_nll(model, {"input_ids": tokens})
        (nll_sum / count).backward()
    mean = recording.output_sums / recording.positions  # one pass: centred on its own mean output
    expected = compensated_loss_changes(model, tokens, mean).abs().mean(dim=0)  # [L, H]
    expected[1, 2] = 0.0  # a pruned head's output is already replaced
    assert torch.allclose(recording.compensated_importance, expected, rtol=1e-4, atol=1e-7)
    # A constant shift of every output is invisible to plain importance, not to the compensated one.
    prior = torch.randn_like(recording.output_sums)
    with HeadOutputRecording(model, prior_sums=prior * 1000, prior_positions=1000) as centred_elsewhere:
        nll_sum, count = causal_lm_nll(model, {"input_ids": tokens})
        (nll_sum / count).backward()
    assert torch.allclose(centred_elsewhere.example_importance, recording.example_importance)
    assert not torch.allclose(centred_elsewhere.compensated_importance, recording.compensated_importance)


# ----------------------------------------------------------------------------------------------------------------
# The estimators built on the recording: HeadStatistics' example_importance and output_mean


def per_example_importance(model, tokens):
    """The mean over examples of |dL_b/dg| ``[L, H]``, each example's own mean token loss differentiated alone."""
    gates = find_gates(model)
    total = torch.zeros_like(gates.values)
    for example in tokens:
        nll_sum, count = causal_lm_nll(model, {"input_ids": example[None]})
        (gradient,) = torch.autograd.grad(nll_sum / count, gates.values)
        total += gradient.abs()
    return total / tokens.shape[0]


def test_measured_example_importance_is_the_mean_over_examples_of_each_gradient(family, tokens):
    model = tiny_model(family)
    gates = attach_gates(model)
    gates.prune([(1, 2)])
    batches = [{"input_ids": tokens[:1]}, {"input_ids": tokens[1:]}, {"input_ids": tokens}]
    measured = measure_head_metrics(model, batches)
    every_example = torch.cat([batch["input_ids"] for batch in batches])
    assert torch.allclose(measured["example_importance"], per_example_importance(model, every_example), atol=1e-6)
    with HeadOutputRecording(model) as recording:  # one batch: the recording's sum is its mean of |dL_b/dg|
        nll_sum, count = causal_lm_nll(model, {"input_ids": tokens})
        (nll_sum / count).backward()
    assert torch.allclose(
        measure_head_metrics(model, [{"input_ids": tokens}])["example_importance"], recording.example_importance
    )
    assert measured["example_importance"][1, 2] == 0
    assert torch.all(measured["grad_norm"] <= measured["example_importance"] + 1e-7)  # examples cancel in the batch


def test_measured_output_mean_is_each_heads_mean_output(tokens):
    model = tiny_model("llama")
    gates = attach_gates(model)
    seen = []
    projection = output_projections(model)[1]
    handle = projection.register_forward_pre_hook(lambda module, args: seen.append(args[0]), prepend=True)
    output_mean = measure_head_metrics(model, [{"input_ids": tokens}, {"input_ids": tokens[:1, :5]}])["output_mean"]
    handle.remove()
    positions = torch.cat([hidden.detach().flatten(0, 1) for hidden in seen])  # [positions, H * D]
    expected = positions.mean(dim=0).unflatten(-1, (gates.num_heads, gates.head_dim))  # [H, D]
    assert output_mean.shape == (2, 4, gates.head_dim) and torch.allclose(output_mean[1], expected, atol=1e-6)


class FrozenLlama(L.LightningModule):
    """A plain Llama (no dropout: train mode = eval mode) that never changes (lr 0), fed fixed batches."""

    def __init__(self):
        super().__init__()
        self.lm = tiny_model("llama").train()

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return self.lm(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_head_metrics_record_what_measure_head_metrics_measures(accumulate):
    """Per-example importance and mean outputs during fit, gradient accumulation included, equal the measurement."""
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, VOCAB, (12, 16), generator=generator)
    loader = DataLoader(TensorDataset(blocks), batch_size=3)  # 4 batches
    metrics = HeadMetrics(entropy_every_n_steps=1)
    trainer = tiny_trainer(limit_val_batches=0, accumulate_grad_batches=accumulate, callbacks=[metrics])
    trainer.fit(FrozenLlama(), loader)
    during_fit = metrics.compute()
    model = tiny_model("llama")
    attach_gates(model)
    measured = measure_head_metrics(model, [{"input_ids": batch} for (batch,) in loader])
    for key in ("entropy", "example_importance", "compensated_importance", "output_mean"):
        assert torch.allclose(during_fit[key], measured[key], rtol=1e-4, atol=1e-7), key
    assert metrics.statistics.example_importance.weight == 12 and metrics.statistics.output_mean.weight == 12 * 16
    assert metrics.statistics.grad_norm.weight == 4 // accumulate
    restored = HeadMetrics(entropy_every_n_steps=1)  # a resumed run continues from exactly these states
    restored.load_state_dict(metrics.state_dict())
    restored.setup(trainer, trainer.lightning_module, "fit")
    assert all(torch.equal(restored.compute()[key], during_fit[key]) for key in during_fit if key != "entropy")
    assert not any(len(p._forward_pre_hooks) > 1 for p in output_projections(trainer.lightning_module.lm))


def test_the_amp_loss_scale_is_divided_out_of_the_step():
    metrics = HeadMetrics()
    metrics.statistics = HeadStatistics(1, 2)
    metrics._step_importance = ExampleImportance(torch.tensor([[4.0, 8.0]]), torch.tensor([[12.0, 0.0]]), examples=2)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=SimpleNamespace(get_scale=lambda: 4.0)))
    metrics._take_step_importance(trainer)
    assert torch.equal(metrics.statistics.example_importance.compute(), torch.tensor([[1.0, 2.0]]))
    assert torch.equal(metrics.statistics.compensated_importance.compute(), torch.tensor([[3.0, 0.0]]))
    assert metrics._step_importance is None  # taken by the step, examples and all
