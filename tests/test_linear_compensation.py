"""Linear compensation: a pruned head writes the ridge least-squares prediction of its output from the kept heads."""

import os

import lightning as L
import pytest
import torch
from conftest import HEAD_COMPACTING, tiny_data, tiny_model, tiny_trainer
from test_compaction import compact_exactly, pruned_model
from test_saving import CODE_FILES, load_without_package, uniform_llama

from sentinel_lightning import GatedLanguageModel, HeadMetrics, HeadPruning
from sentinel_lightning.gates import attach_gates, find_gates
from sentinel_lightning.measure.statistics import measure_head_metrics
from sentinel_lightning.reconstruction import linear_compensation
from sentinel_lightning.saving import load_pruned, save_pruned
from sentinel_lightning.standalone.families import output_projections


def projection_inputs(model, tokens, layer):
    """The input ``[positions, H * D]`` of ``layer``'s output projection after every hook (the gated heads)."""
    seen = []
    handle = output_projections(model)[layer].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return seen[0].flatten(0, 1)


def fit_every_pruned_layer(model, tokens, ridge=1e-2):
    """Measures the statistics on ``tokens`` and gives every layer with pruned heads its linear compensation."""
    gates = find_gates(model)
    metrics = measure_head_metrics(model, [{"input_ids": tokens}], second_moment=True)
    for layer in range(gates.num_layers):
        if not gates.active[layer].all():
            values = torch.where(gates.active, gates.values, gates.values_before_pruning).detach()[layer]
            constants, matrix = linear_compensation(
                metrics["output_mean"][layer], metrics["output_second_moment"][layer], gates.active[layer], values,
                ridge,
            )
            gates.set_linear_compensation(layer, constants, matrix)
    return metrics


def test_the_prediction_is_the_least_squares_fit_in_the_gated_space(family, tokens):
    """On the positions it was fitted on, the linear prediction misses what the pruned heads wrote by no more than
    the mean does (the mean is the prediction with R = 0), partial gates included."""
    model = tiny_model(family)
    gates = attach_gates(model)
    with torch.no_grad():
        gates.values[0].copy_(torch.tensor([0.5, 1.5, 0.8, 1.2]))
    written = projection_inputs(model, tokens, 0)  # what the heads write, gated
    gates.prune([(0, 1), (0, 2)])
    pruned_columns = torch.cat([torch.arange(gates.head_dim) + head * gates.head_dim for head in (1, 2)])
    metrics = measure_head_metrics(model, [{"input_ids": tokens}], second_moment=True)
    gates.compensation[0, 1:3] = metrics["output_mean"][0, 1:3] * torch.tensor([1.5, 0.8]).unsqueeze(-1)
    by_mean = projection_inputs(model, tokens, 0)[:, pruned_columns]
    fit_every_pruned_layer(model, tokens, ridge=0.0)
    by_line = projection_inputs(model, tokens, 0)[:, pruned_columns]
    target = written[:, pruned_columns]
    error_of_line, error_of_mean = (by_line - target).pow(2).sum(), (by_mean - target).pow(2).sum()
    assert error_of_line <= error_of_mean * (1 + 1e-4)
    assert error_of_line < 0.9 * error_of_mean  # the kept heads do tell something
    kept_columns = torch.cat([torch.arange(gates.head_dim) + head * gates.head_dim for head in (0, 3)])
    assert torch.allclose(projection_inputs(model, tokens, 0)[:, kept_columns], written[:, kept_columns], atol=1e-6)


def test_the_matrix_reads_kept_heads_and_writes_pruned_heads_only():
    generator = torch.Generator().manual_seed(0)
    outputs = torch.randn(200, 3 * 2, generator=generator, dtype=torch.float64)  # 3 heads of D = 2
    outputs[:, 2] = 2.0 * outputs[:, 0] - outputs[:, 5] + 0.5  # head 1's first channel: affine in heads 0 and 2
    mean = outputs.mean(0).view(3, 2)
    second_moment = (outputs.T @ outputs / len(outputs)).view(3, 2, 6)
    active = torch.tensor([True, False, True])
    constants, matrix = linear_compensation(mean, second_moment, active, torch.ones(3), ridge=0.0)
    assert not matrix[[0, 1, 4, 5]].any() and not matrix[:, [2, 3]].any() and not constants[active].any()
    predicted = outputs * active.repeat_interleave(2) @ matrix.T + constants.flatten()
    assert torch.allclose(predicted[:, 2], outputs[:, 2], atol=1e-8)  # recovered exactly
    none_kept = torch.zeros(3, dtype=torch.bool)
    everything_pruned, nothing = linear_compensation(mean, second_moment, none_kept, torch.ones(3))
    assert torch.allclose(everything_pruned, mean) and not nothing.any()


@pytest.mark.parametrize("family", HEAD_COMPACTING)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_compaction_folds_the_prediction_exactly(family, attn_implementation, tokens, tmp_path):
    """Layer 0 empty (its mean goes to the bias), layer 1 unequal groups, layer 2 two heads of four; partial gates."""
    gated = pruned_model(family, attn_implementation)
    fit_every_pruned_layer(gated, tokens)
    gates = find_gates(gated)
    assert gates.reconstruction[1:].any() and not gates.reconstruction[0].any()
    with torch.no_grad():
        expected = gated(tokens).logits
    compacted = compact_exactly(gated, tokens)
    save_pruned(compacted, str(tmp_path))
    with torch.no_grad():
        assert (load_pruned(str(tmp_path))(tokens).logits - expected).abs().max().item() <= 1e-4


def test_reactivation_gives_the_dense_model_back(tokens):
    model = tiny_model("qwen2")
    gates = attach_gates(model)
    with torch.no_grad():
        dense = model(tokens).logits
    gates.prune([(0, 0), (1, 2), (1, 3)])
    fit_every_pruned_layer(model, tokens)
    with torch.no_grad():
        assert not torch.allclose(model(tokens).logits, dense, atol=1e-4)
    gates.reactivate([(0, 0), (1, 2), (1, 3)])
    assert not gates.reconstruction.any()
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, dense, atol=1e-6)


def test_head_pruning_fits_the_prediction_and_checkpoints_carry_it(tmp_path):
    L.seed_everything(0)
    metrics = HeadMetrics()
    pruning = HeadPruning("gradient_compensated", {0: 0.25}, compensate="linear")
    module = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    trainer = tiny_trainer(max_epochs=2, callbacks=[metrics, pruning], default_root_dir=tmp_path)
    trainer.fit(module, tiny_data())
    gates = module.gates
    assert gates.reconstruction.shape == (*gates.active.shape, gates.head_dim, gates.num_heads * gates.head_dim)
    predicts = gates.reconstruction.abs().sum(dim=(-2, -1)) > 0  # [L, H]
    assert torch.equal(predicts, ~gates.active)  # every pruned head predicts, no active one does
    assert "output_second_moment" in metrics.state_dict()
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    restored = GatedLanguageModel.load_from_checkpoint(tmp_path / "run.ckpt")
    assert torch.equal(restored.gates.reconstruction, gates.reconstruction)
    resumed = HeadMetrics()
    resumed.load_state_dict(metrics.state_dict())
    resumed.setup(trainer, module, "fit")
    assert torch.equal(resumed.compute()["output_second_moment"], metrics.compute()["output_second_moment"])


def test_an_unknown_compensation_is_named():
    with pytest.raises(ValueError, match=r"compensate='median' must be True, False or one of \('none', 'mean', 'li"):
        HeadPruning(compensate="median")


def test_a_layer_without_finite_statistics_keeps_the_mean_and_says_so(tokens):
    model = tiny_model("llama")
    gates = attach_gates(model)
    metrics = measure_head_metrics(model, [{"input_ids": tokens}], second_moment=True)
    gates.prune([(0, 1), (1, 2)], compensation=metrics["output_mean"])
    metrics["output_second_moment"][1, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"no finite output statistics or fit for layer\(s\) \[1\]"):
        HeadPruning.fit_linear_compensation(gates, metrics, [0, 1])
    assert gates.reconstruction[0, 1].any() and not gates.reconstruction[1].any()
    assert torch.equal(gates.compensation[1, 2], metrics["output_mean"][1, 2])


def test_a_uniform_llama_with_linear_compensation_loads_with_plain_transformers(tokens, tmp_path):
    gated = uniform_llama()
    fit_every_pruned_layer(gated, tokens)
    assert find_gates(gated).reconstruction.any()
    compacted = compact_exactly(gated, tokens)
    save_pruned(compacted, str(tmp_path / "model"))
    assert not any(os.path.isfile(tmp_path / "model" / name) for name in CODE_FILES)
    printed = load_without_package(tmp_path / "model", compacted, tokens, tmp_path, trust_remote_code=False)
    assert printed.split()[0] == "LlamaForCausalLM"
