"""HeadPruning with pruning units (head, group, layer) and the uniform scope, in tiny Trainer runs."""

import subprocess
import sys

import lightning as L
import pytest
import torch
from conftest import FAMILIES, ScriptedPerplexity, tiny_data, tiny_model, tiny_trainer

from sentinel_lightning import GatedLanguageModel, HeadMetrics, HeadPruning, HeadReactivation, find_gates
from sentinel_lightning.standalone.families import family_of
from sentinel_lightning.strategies import uniform_shape


class ActiveProbe(L.Callback):
    """Records the active mask after every training epoch (it runs after the callbacks listed before it)."""

    def __init__(self):
        self.masks = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.masks.append(find_gates(pl_module).active.clone())


def fit(pruning, epochs=1, model=None, module=None, extra=()):
    """Fits a tiny Llama (4 query heads, 2 key/value heads unless ``model`` says otherwise) with ``pruning``."""
    L.seed_everything(0)
    module = module or GatedLanguageModel(model or tiny_model("llama", num_heads=4, num_kv_heads=2), learning_rate=1e-3)
    probe = ActiveProbe()
    tiny_trainer(max_epochs=epochs, callbacks=[HeadMetrics(), pruning, *extra, probe]).fit(module, tiny_data())
    return module, probe.masks


def per_group(active, group_size):
    """Active query heads per key/value group, ``[L, K]``."""
    return active.reshape(active.shape[0], -1, group_size).sum(dim=2)


def test_group_unit_prunes_whole_key_value_groups():
    pruning = HeadPruning("gradient", {0: 0.25, 1: 0.5}, unit="group")
    _, masks = fit(pruning, epochs=2)
    for mask, pruned in zip(masks, (2, 4)):
        assert (~mask).sum() == pruned and set(per_group(mask, 2).flatten().tolist()) <= {0, 2}
    assert all(len(event.heads) == 2 and event.heads[0][1] // 2 == event.heads[1][1] // 2 for event in pruning.events)
    assert (per_group(masks[-1], 2) == 0).sum(dim=1).tolist() == [1, 1]  # every layer keeps its other group


def test_layer_unit_prunes_whole_layers():
    pruning = HeadPruning("gradient", {0: 0.5}, unit="layer")
    _, masks = fit(pruning)
    assert pruning.min_active_heads_per_layer == 0
    assert sorted(masks[0].sum(dim=1).tolist()) == [0, 4]


def test_rounding_to_whole_units_is_warned_from_what_to_what():
    with pytest.warns(UserWarning, match=r"unit='group', scope='uniform'.*target 0.25 \(2 of 8 query heads\) rounds "
                      r"to 0.5 \(4 heads\).*2 heads per layer in every layer"):
        _, masks = fit(HeadPruning("gradient", {0: 0.25}, scope="uniform", unit="group"))
    assert uniform_shape(masks[0], 2) == (1, 2)


@pytest.mark.parametrize(
    "unit, num_kv_heads, shapes",
    [("head", 2, [(2, 3), (2, 2)]), ("group", 4, [(3, 2), (2, 2)])],  # 8 query heads: G=4 and G=2
)
def test_uniform_scope_keeps_every_layer_and_group_the_same_over_two_events(unit, num_kv_heads, shapes):
    model = tiny_model("llama", num_heads=8, num_kv_heads=num_kv_heads)
    pruning = HeadPruning("gradient", {0: 0.25, 1: 0.5}, scope="uniform", unit=unit)
    _, masks = fit(pruning, epochs=2, model=model)
    assert [uniform_shape(mask, 8 // num_kv_heads) for mask in masks] == shapes
    assert torch.all(masks[1] <= masks[0])  # the second event continued from the first one's shape


def test_a_two_step_schedule_reaches_its_uniform_shape_through_an_unequal_one(recwarn):
    model = tiny_model("llama", num_heads=8, num_kv_heads=4)  # 2 layers of 4 groups of 2 heads
    pruning = HeadPruning("gradient", {0: 0.125, 1: 0.25}, scope="uniform", unit="group")
    _, masks = fit(pruning, epochs=2, model=model)
    assert sorted(masks[0].sum(dim=1).tolist()) == [6, 8]  # one group of one layer: the cheaper one first
    assert uniform_shape(masks[1], 2) == (3, 2)  # then one group of the other
    assert not [str(w.message) for w in recwarn if "HeadPruning" in str(w.message)]  # a planned step, no warning


def test_uniform_scope_re_evens_after_reactivation_gave_heads_back():
    model = tiny_model("llama", num_heads=8, num_kv_heads=2)
    module = ScriptedPerplexity([10.0, 20.0], model=model, learning_rate=1e-3)
    pruning = HeadPruning("gradient", {0: 0.25, 1: 0.25}, scope="uniform")
    reactivation = HeadReactivation(monitor="fake_ppl", fraction=0.5, cooldown=1)
    _, masks = fit(pruning, epochs=2, module=module, extra=[reactivation])
    (given_back,) = reactivation.events
    assert len(given_back.heads) == 2
    assert [uniform_shape(mask, 4) for mask in masks] == [(2, 3), (2, 3)]
    refill = set(pruning.events[1].heads)
    assert len(refill) == 2 and not refill & set(given_back.heads)  # protected heads stay, their groups lose others
    assert {(layer, head // 4) for layer, head in refill} == {(layer, head // 4) for layer, head in given_back.heads}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: HeadPruning(unit="layer", min_active_heads_per_layer=1), r"unit='layer'.*must be 0 or None.*=1"),
        (lambda: HeadPruning(unit="layer", scope="uniform"), r"unit='layer' needs scope='global'.*'uniform'"),
        (lambda: HeadPruning(unit="layer", scope="layer"), r"unit='layer' needs scope='global'.*'layer'"),
        (lambda: HeadPruning(unit="block"), r"unit='block' is not one of \('head', 'group', 'layer'\)"),
        (lambda: HeadPruning(scope="even"), r"scope='even' is not one of \('global', 'layer', 'uniform'\)"),
    ],
)
def test_impossible_units_fail_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "pruning, message",
    [
        (HeadPruning("random", {0: 0.75}, unit="group"), r"asks for 6 of 8 heads, but unit='group'.*only 4 prunable"),
        (HeadPruning("random", {0: 0.25}, unit="group", min_active_heads_per_layer=3),
         r"asks for 2 of 8.*min_active_heads_per_layer=3 leave only 0 prunable"),
        (HeadPruning("random", {0: 0.75}, scope="uniform"), r"asks for 8 of 8 heads.*scope='uniform'.*only 4 prunable"),
    ],
)
def test_unreachable_targets_fail_at_setup(pruning, message):
    with pytest.raises(ValueError, match=message):
        fit(pruning)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_whole_groups(family):
    model = tiny_model(family)
    group_size = family_of(model).group_size(model.config)
    module, masks = fit(HeadPruning("random", {0: 0.5}, unit="group"), model=model)
    assert (~masks[0]).sum() == 4 and set(per_group(masks[0], group_size).flatten().tolist()) <= {0, group_size}
    assert torch.all(module.gates.effective()[~masks[0]] == 0)


def test_cli_takes_unit_and_uniform_scope():
    command = [sys.executable, "-m", "sentinel_lightning.cli", "fit", "--pruning.unit", "group", "--pruning.scope",
               "uniform", "--print_config"]
    printed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    pruning = printed[printed.index("\npruning:"):]
    assert "  unit: group" in pruning and "  scope: uniform" in pruning
