"""Measured ablation: each unit's loss increase when it alone is pruned, and the ``ablation`` pruning strategy."""

import math

import lightning as L
import pytest
import torch
from conftest import tiny_data, tiny_model, tiny_trainer

from sentinel_lightning import GatedLanguageModel, HeadMetrics, HeadPruning
from sentinel_lightning.gates import attach_gates
from sentinel_lightning.losses import causal_lm_nll
from sentinel_lightning.measure.ablation import unit_ablation
from sentinel_lightning.measure.statistics import measure_head_metrics
from sentinel_lightning.reconstruction import linear_compensation
from sentinel_lightning.strategies import STRATEGIES, needs_ablation


def mean_loss(model, batches):
    totals = [causal_lm_nll(model, batch) for batch in batches]
    return sum(float(nll) for nll, _ in totals) / sum(float(tokens) for _, tokens in totals)


@pytest.fixture
def gated():
    torch.manual_seed(0)
    model = tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2).eval()
    return model, attach_gates(model)


def batches():
    generator = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(3, 200, (2, 16), generator=generator)} for _ in range(2)]


@pytest.mark.parametrize("unit, group_size", [("head", 1), ("group", 2), ("layer", 1)])
def test_each_unit_gets_the_loss_increase_of_pruning_it_alone(gated, unit, group_size):
    model, gates = gated
    gates.prune([(1, 3)])  # already pruned: its unit is measured with what is left of it
    with torch.no_grad():
        base = mean_loss(model, batches())
        gates.prune([(0, 2), (0, 3)])  # layer 0's second group by hand
        by_hand = mean_loss(model, batches()) - base
        gates.reactivate([(0, 2), (0, 3)])
    increase = unit_ablation(model, batches(), unit, group_size)
    assert increase.shape == gates.active.shape and math.isnan(increase[1, 3])
    assert torch.equal(gates.active, torch.tensor([[True] * 4, [True, True, True, False]]))  # left as it was
    assert torch.isfinite(increase[gates.active]).all()
    if unit == "group":
        assert increase[0, 2] == increase[0, 3] == pytest.approx(by_hand, rel=1e-6)
        assert increase[1, 2] != increase[1, 0]  # group (1, 2) is head 2 alone now
    if unit == "layer":
        assert len(set(increase[0].tolist())) == 1 and len(set(increase[1, :3].tolist())) == 1


def test_ablated_heads_write_the_compensation_they_are_given(gated):
    model, gates = gated
    plain = unit_ablation(model, batches(), "head")
    compensation = torch.randn(*gates.active.shape, gates.head_dim)
    compensated = unit_ablation(model, batches(), "head", compensation=compensation)
    assert not torch.allclose(plain, compensated)
    assert not gates.compensation.any()  # restored


def test_the_ablation_strategy_prunes_the_unit_that_costs_least(gated):
    L.seed_everything(0)
    module = GatedLanguageModel(tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2), learning_rate=1e-3)
    pruning = HeadPruning("ablation", {0: 0.5}, unit="group", scope="uniform", compensate="mean",
                          calibration_batches=2)
    recorder = []

    class Spy(L.Callback):  # what the strategy saw: the recent batches, with the model before the event
        def on_train_epoch_end(self, trainer, pl_module):
            metrics = trainer.callbacks[0].compute()
            recorder.append(unit_ablation(pl_module, list(pruning._recent_batches), "group", 2,
                                          metrics["output_mean"]))

    trainer = tiny_trainer(max_epochs=1, callbacks=[HeadMetrics(), Spy(), pruning])
    trainer.fit(module, tiny_data())
    (expected,) = recorder
    kept_group = [int(expected[layer, ::2].argmax()) for layer in range(2)]  # the costlier group of each layer
    assert [module.gates.active[layer, 2 * g].item() for layer, g in enumerate(kept_group)] == [True, True]
    assert module.gates.num_active == 4 and needs_ablation(STRATEGIES["ablation"](0))


def test_the_ablation_strategy_needs_dict_batches_and_a_positive_count():
    with pytest.raises(ValueError, match="calibration_batches=0"):
        HeadPruning("ablation", calibration_batches=0)
    pruning = HeadPruning("ablation", {0: 0.5})
    with pytest.raises(ValueError, match=r"must be dicts with 'input_ids'.*got tuple"):
        pruning.on_train_batch_end(None, None, None, (torch.zeros(1, 4, dtype=torch.long),), 0)


def test_replaying_the_earlier_layers_gives_the_loss_of_a_full_forward(family):
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    gates = attach_gates(model)
    increase = unit_ablation(model, batches(), "layer")
    with torch.no_grad():
        base = mean_loss(model, batches())
        gates.prune([(gates.num_layers - 1, head) for head in range(gates.num_heads)])
        by_hand = mean_loss(model, batches()) - base  # every layer computed, none replayed
    assert increase[-1, 0].item() == pytest.approx(by_hand, rel=1e-5, abs=1e-7)


def test_with_second_moments_ablated_heads_write_their_linear_prediction(gated):
    """Each unit is measured as HeadPruning(compensate="linear") would leave it: the prediction fitted from the
    layer's other active heads, heads pruned before refitted too; the gates come back as they were."""
    model, gates = gated
    metrics = measure_head_metrics(model, batches(), second_moment=True)
    mean, moment = metrics["output_mean"], metrics["output_second_moment"]
    gates.prune([(1, 0)], compensation=mean)
    before = {name: tensor.clone() for name, tensor in gates.state_dict().items()}
    increase = unit_ablation(model, batches(), "group", 2, mean, moment)
    assert gates.reconstruction is None  # none before, none after
    torch.testing.assert_close(gates.state_dict(), before, rtol=0, atol=0, equal_nan=True)
    with torch.no_grad():
        base = mean_loss(model, batches())
        gates.prune([(1, 2), (1, 3)])
        constants, matrix = linear_compensation(mean[1], moment[1], gates.active[1], gates.values[1].detach())
        gates.set_linear_compensation(1, constants, matrix)
        by_hand = mean_loss(model, batches()) - base
    assert increase[1, 2] == increase[1, 3] == pytest.approx(by_hand, rel=1e-5)
    with_mean = unit_ablation(model, batches(), "group", 2, mean)
    assert not torch.allclose(increase[0], with_mean[0])
    with pytest.raises(ValueError, match=r"needs the heads' mean outputs as compensation"):
        unit_ablation(model, batches(), "group", 2, None, moment)


def test_the_pruning_ablates_with_its_compensation_when_asked():
    L.seed_everything(0)
    module = GatedLanguageModel(tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2), learning_rate=1e-3)
    pruning = HeadPruning("ablation", {0: 0.5}, unit="group", scope="uniform", compensate="linear",
                          ablate_with="compensation")
    recorder = []

    class Spy(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            metrics = trainer.callbacks[0]
            moment = metrics.output_second_moment(range(2))
            mean = metrics.compute(["output_mean"])["output_mean"]
            recorder.append(unit_ablation(pl_module, list(pruning._recent_batches), "group", 2, mean, moment))

    tiny_trainer(max_epochs=1, callbacks=[HeadMetrics(), Spy(), pruning]).fit(module, tiny_data())
    (expected,) = recorder
    kept_group = [int(expected[layer, ::2].argmax()) for layer in range(2)]
    assert [module.gates.active[layer, 2 * g].item() for layer, g in enumerate(kept_group)] == [True, True]
    with pytest.raises(ValueError, match=r"ablate_with='linear' is not one of \('mean', 'compensation'\)"):
        HeadPruning(ablate_with="linear")
