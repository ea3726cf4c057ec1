"""HeadPruning(interval="step"): gradual schedules inside an epoch; and no decision on a non-finite model."""

import lightning as L
import pytest
import torch
from conftest import tiny_data, tiny_model, tiny_trainer

from sentinel_lightning import GatedLanguageModel, HeadMetrics, HeadPruning
from sentinel_lightning.callbacks.divergence import DivergenceError


class ActiveEveryStep(L.Callback):
    def __init__(self):
        self.active = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.active.append((trainer.global_step, pl_module.gates.num_active))


def test_step_schedule_prunes_inside_the_epoch_at_its_steps():
    L.seed_everything(0)
    module = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    pruning = HeadPruning("gradient", schedule={2: 0.25, 4: 0.5}, interval="step")
    probe = ActiveEveryStep()
    tiny_trainer(max_epochs=2, limit_train_batches=3, callbacks=[HeadMetrics(), pruning, probe]).fit(
        module, tiny_data()
    )
    assert probe.active == [(1, 8), (2, 6), (3, 6), (4, 4), (5, 4), (6, 4)]
    assert [(event.epoch, event.step, len(event.heads)) for event in pruning.events] == [(0, 2, 2), (1, 4, 2)]
    assert "at step 2" in pruning.events[0].reason


def test_step_schedule_keys_are_positive_steps():
    with pytest.raises(ValueError, match=r"key 0; with interval='step' every key is an integer step index >= 1"):
        HeadPruning(schedule={0: 0.1}, interval="step")
    with pytest.raises(ValueError, match=r"interval='batch' is not one of \('epoch', 'step'\)"):
        HeadPruning(interval="batch")


class PoisonWeights(L.Callback):
    """Sets one weight to NaN after the last training batch, as a diverging update would."""

    def on_train_epoch_end(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")


def test_no_pruning_decision_on_a_non_finite_model():
    L.seed_everything(0)
    module = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    pruning = HeadPruning("random", schedule={0: 0.25})
    trainer = tiny_trainer(max_epochs=1, limit_val_batches=0, callbacks=[PoisonWeights(), HeadMetrics(), pruning])
    with pytest.raises(DivergenceError, match=r"the model is non-finite in \['model.model.layers.0.mlp.up_proj"):
        trainer.fit(module, tiny_data())
    assert module.gates.num_active == 8 and pruning.events == []
