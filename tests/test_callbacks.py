import lightning as L
import pytest
import torch
from conftest import ScriptedPerplexity, tiny_data, tiny_model, tiny_trainer

from sentinel_lightning import GatedLanguageModel, HeadMetrics, HeadPruning, HeadReactivation, attach_gates, find_gates
from sentinel_lightning.events import HeadEventListener
from sentinel_lightning.metrics import PerHeadMean


class GateProbe(HeadEventListener):
    """Records the gates after every training epoch (it runs after the callbacks listed before it)."""

    def __init__(self):
        self.active_counts, self.snapshots, self.at_events = [], [], []

    def on_train_epoch_end(self, trainer, pl_module):
        gates = find_gates(pl_module)
        self.active_counts.append(gates.num_active)
        self.snapshots.append((gates.values.detach().clone(), gates.active.clone()))

    def on_head_event(self, trainer, pl_module, event):
        self.at_events.append((event.kind, find_gates(pl_module).values.detach().clone()))


def fit(callbacks, epochs, module=None, **trainer_kwargs):
    L.seed_everything(0)
    module = module or GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    trainer = tiny_trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, tiny_data())
    return module, trainer


@pytest.mark.parametrize("strategy", ["entropy", "gradient", "random"])
def test_schedule_fires_at_its_epochs_with_exact_counts(strategy):
    probe = GateProbe()
    pruning = HeadPruning(strategy, schedule={1: 0.25, 3: 0.5})
    fit([HeadMetrics(entropy_every_n_steps=2), pruning, probe], epochs=5)
    assert probe.active_counts == [8, 6, 6, 4, 4]
    assert [(event.epoch, len(event.heads)) for event in pruning.events] == [(1, 2), (3, 2)]
    assert all(event.kind == "prune" and event.value > 0 for event in pruning.events)


def test_pruned_gates_stay_exactly_zero_while_training_goes_on():
    probe = GateProbe()
    module = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3, gate_learning_rate=0.5)
    module, trainer = fit([HeadMetrics(), HeadPruning("gradient", {0: 0.5}), probe], epochs=3, module=module)
    pruned = ~module.gates.active
    assert pruned.sum() == 4
    assert torch.all(module.gates.effective()[pruned] == 0.0)
    values_at_pruning = probe.snapshots[0][0]
    assert torch.equal(module.gates.values.detach()[pruned], values_at_pruning[pruned])  # not moved by AdamW
    assert not torch.equal(module.gates.values.detach()[~pruned], values_at_pruning[~pruned])  # the others learn
    state = trainer.optimizers[0].state[module.gates.values]
    assert torch.all(state["exp_avg"][pruned] == 0) and torch.all(state["exp_avg_sq"][pruned] == 0)


def test_reactivation_fires_on_a_regression_and_restores_gate_values():
    module = ScriptedPerplexity([10.0, 20.0, 20.0], model=tiny_model("llama"), learning_rate=1e-3)
    pruning = HeadPruning("gradient", schedule={0: 0.25, 1: 0.25})
    reactivation = HeadReactivation(monitor="fake_ppl", tolerance=0.05, cooldown=1)
    probe = GateProbe()
    fit([HeadMetrics(), pruning, reactivation, probe], epochs=3, module=module)
    first, refill = pruning.events
    (event,) = reactivation.events
    assert event.kind == "reactivate" and event.epoch == 1 and event.heads == first.heads
    assert event.value == 20.0 and "fake_ppl 20 > 10" in event.reason
    assert refill.epoch == 1 and not set(refill.heads) & set(first.heads)  # target met with other heads
    kind, values_after_reactivation = probe.at_events[1]
    assert kind == "reactivate"
    for layer, head in first.heads:  # back at the value they had when pruned
        assert module.gates.active[layer, head]
        assert values_after_reactivation[layer, head] == probe.at_events[0][1][layer, head]
    assert probe.active_counts == [6, 6, 6]


def test_no_reactivation_within_tolerance_or_before_patience():
    module = ScriptedPerplexity([10.0, 10.4, 10.4], model=tiny_model("llama"), learning_rate=1e-3)
    reactivation = HeadReactivation(monitor="fake_ppl", tolerance=0.05)
    fit([HeadMetrics(), HeadPruning("gradient", {0: 0.25}), reactivation], epochs=3, module=module)
    assert reactivation.events == [] and module.gates.num_active == 6
    module = ScriptedPerplexity([10.0, 20.0, 10.0, 20.0], model=tiny_model("llama"), learning_rate=1e-3)
    reactivation = HeadReactivation(monitor="fake_ppl", patience=2)
    fit([HeadMetrics(), HeadPruning("gradient", {0: 0.25}), reactivation], epochs=4, module=module)
    assert reactivation.events == []  # never two regressed validations in a row


def test_a_run_that_ends_below_its_schedule_says_so():
    # pruned after epoch 0, given back after epoch 1, and no later entry prunes again: the model ends dense
    module = ScriptedPerplexity([10.0, 20.0, 20.0], model=tiny_model("llama"), learning_rate=1e-3)
    pruning = HeadPruning("gradient", schedule={0: 0.25})
    reactivation = HeadReactivation(monitor="fake_ppl", tolerance=0.05)
    with pytest.warns(UserWarning, match=r"ends with 0 of 8 query heads pruned, fewer than the 2 of the target 0.25 "
                                         r"scheduled at epoch 0"):
        fit([HeadMetrics(), pruning, reactivation], epochs=3, module=module)
    assert len(reactivation.events) == 1 and module.gates.num_active == 8
    assert pruning.last_target(2) == (0, 0.25, 2) and pruning.last_target(-1) is None


def test_importance_reactivation_takes_the_most_important_pruned_heads():
    module = ScriptedPerplexity([10.0, 10.0, 30.0], model=tiny_model("llama"), learning_rate=1e-3)
    pruning = HeadPruning("random", schedule={0: 0.25, 1: 0.5}, seed=3)
    reactivation = HeadReactivation(monitor="fake_ppl", reactivate="importance", fraction=0.5)
    fit([HeadMetrics(), pruning, reactivation], epochs=3, module=module)
    (event,) = reactivation.events
    importance = module.gates.importance_at_pruning
    pruned_before = [pair for prune in pruning.events for pair in prune.heads]
    ranked = sorted(pruned_before, key=lambda pair: -importance[pair].item())
    assert len(pruned_before) == 4 and event.heads == ranked[:2]


class Interrupt(L.Callback):
    def __init__(self, after_epoch):
        self.after_epoch = after_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = trainer.current_epoch >= self.after_epoch


def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    def callbacks():
        return [
            HeadMetrics(entropy_every_n_steps=3),
            HeadPruning("entropy", schedule={0: 0.125, 1: 0.25, 2: 0.375, 3: 0.5}),
            HeadReactivation(tolerance=0.0),
        ]

    full_callbacks = callbacks()
    full, _ = fit(full_callbacks, epochs=4)
    _, trainer = fit([*callbacks(), Interrupt(after_epoch=1)], epochs=4)  # same schedule, stopped half-way
    assert trainer.current_epoch == 2
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed_callbacks = callbacks()
    L.seed_everything(0)
    resumed = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    tiny_trainer(max_epochs=4, callbacks=resumed_callbacks).fit(resumed, tiny_data(), ckpt_path=tmp_path / "half.ckpt")
    assert torch.equal(full.gates.values, resumed.gates.values)
    assert torch.equal(full.gates.active, resumed.gates.active)
    for whole, part in zip(full_callbacks[1:], resumed_callbacks[1:]):
        assert [e.to_dict() for e in whole.events] == [e.to_dict() for e in part.events]
    assert len(full_callbacks[1].events) >= 3


class PlainHFModule(L.LightningModule):
    """A user's own LightningModule around a plain Hugging Face model, knowing nothing about gates."""

    def __init__(self):
        super().__init__()
        self.lm = tiny_model("gpt2").train()

    def training_step(self, batch, batch_idx):
        return self.lm(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.lm(input_ids=batch["input_ids"], labels=batch["labels"]).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_callbacks_attach_gates_to_a_users_own_module_before_the_optimizer():
    module = PlainHFModule()
    metrics = HeadMetrics()
    fit([metrics, HeadPruning("gradient", {0: 0.25}), HeadReactivation(monitor="val_loss")], 2, module=module)
    gates = find_gates(module)
    assert gates is not None and gates.num_active == 6
    assert torch.isfinite(metrics.grad_norm.compute()).all()


def test_unlogged_monitor_fails_at_the_first_validation():
    with pytest.raises(RuntimeError, match=r"monitor='val_acc'.*val_ppl"):
        fit([HeadMetrics(), HeadPruning("random", {0: 0.25}), HeadReactivation(monitor="val_acc")], epochs=1)


def test_non_finite_metrics_never_prune():
    pruning = HeadPruning(lambda metrics: torch.full_like(metrics["grad_norm"], float("nan")), {0: 0.5})
    with pytest.warns(UserWarning, match="needs 4 more pruned heads but only 0"):
        module, _ = fit([HeadMetrics(), pruning], epochs=1)
    assert module.gates.num_active == 8 and pruning.events == []
    mean = PerHeadMean(1, 2)
    mean.update(torch.tensor([[1.0, float("inf")]]))
    mean.update(torch.tensor([[3.0, 5.0]]))
    assert torch.equal(mean.compute(), torch.tensor([[3.0, 5.0]])) and mean.skipped == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: HeadPruning(schedule={1: 1.0}), r"target 1.0.*\[0, 1\)"),
        (lambda: HeadPruning(schedule={1: -0.1}), r"target -0.1"),
        (lambda: HeadPruning(schedule={1: 0.3, 2: 0.2}), "decreases at epoch 2"),
        (lambda: HeadPruning(strategy="magnitude"), "strategy='magnitude'"),
        (lambda: HeadPruning(scope="head"), "scope='head'"),
        (lambda: HeadPruning(min_active_heads_per_layer=-1), "min_active_heads_per_layer=-1"),
        (lambda: HeadMetrics(entropy_every_n_steps=0), "entropy_every_n_steps=0"),
        (lambda: HeadReactivation(tolerance=-0.1), "tolerance=-0.1"),
        (lambda: HeadReactivation(patience=0), "patience=0"),
        (lambda: HeadReactivation(reactivate="best"), "reactivate='best'"),
        (lambda: HeadReactivation(fraction=0.0), r"fraction=0.0 must lie in \(0, 1\]"),
        (lambda: HeadReactivation(cooldown=-1), "cooldown=-1"),
    ],
)
def test_bad_arguments_fail_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "pruning, message",
    [
        (HeadPruning("random", min_active_heads_per_layer=5), "min_active_heads_per_layer=5 is larger than the 4"),
        (HeadPruning("random", {0: 0.9}, min_active_heads_per_layer=1), r"asks for 7 of 8 heads.*only 6 prunable"),
        (HeadPruning("entropy", {0: 0.25}), "needs a HeadMetrics callback"),
        (HeadPruning(lambda metrics: -metrics["entropy"], {0: 0.25}), "strategy='<lambda>'.* needs a HeadMetrics"),
    ],
)
def test_model_dependent_arguments_fail_before_training(pruning, message):
    with pytest.raises(ValueError, match=message):
        fit([pruning], epochs=1)


def test_a_callable_strategy_that_declares_no_head_metrics_prunes_without_them():
    def first_heads(metrics):
        return -torch.arange(metrics["active"].numel(), dtype=torch.float).reshape(metrics["active"].shape)

    first_heads.needs_head_metrics = False
    pruning = HeadPruning(first_heads, {0: 0.25})
    fit([pruning], epochs=1)
    assert pruning.events[0].heads == [(0, 0), (0, 1)]


def test_trainer_free_measurement_uses_the_same_estimators_as_head_metrics():
    from sentinel_lightning.measure.statistics import measure_head_metrics

    L.seed_everything(0)
    initial = tiny_model("llama")
    module = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    data = tiny_data()
    metrics = HeadMetrics(entropy_every_n_steps=1)
    tiny_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[metrics]).fit(module, data)
    first_batch = next(iter(data.train_dataloader()))  # the epoch-0 order is seeded: the batch that was trained on
    attach_gates(initial)
    measured = measure_head_metrics(initial, [first_batch])  # the weights that batch's step ran with
    during_fit = metrics.compute()
    assert torch.allclose(measured["entropy"], during_fit["entropy"], atol=1e-5)
    assert torch.allclose(measured["grad_norm"], during_fit["grad_norm"], rtol=1e-4, atol=1e-7)


def test_reactivation_state_lives_in_the_gates_and_travels_in_the_state_dict():
    module = ScriptedPerplexity([10.0, 30.0], model=tiny_model("llama"), learning_rate=1e-3)
    fit([HeadMetrics(), HeadPruning("gradient", {0: 0.25}), HeadReactivation(monitor="fake_ppl", cooldown=2)],
        epochs=2, module=module)
    state = module.state_dict()
    given_back = state["gates.protected_until"] >= 0
    assert int(given_back.sum()) == 2 and torch.all(state["gates.protected_until"][given_back] == 1 + 2)
    assert torch.isfinite(state["gates.importance_at_pruning"]).sum() == 2  # importance of the heads once pruned
