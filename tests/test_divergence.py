"""A diverging run never ends silently: DivergenceGuard, finite-only reactivation, GateMonitor on NaN gates, the
per-head means' skipped updates, and the command line's exit code and checkpoints."""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import ScriptedPerplexity, tiny_data, tiny_model, tiny_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sentinel_lightning import (
    DivergenceError,
    DivergenceGuard,
    GatedLanguageModel,
    GateMonitor,
    HeadMetrics,
    HeadPruning,
    HeadReactivation,
)
from sentinel_lightning.checks import nonfinite_parameters
from sentinel_lightning.cli import EXIT_DIVERGED, main
from sentinel_lightning.gates import find_causal_lm
from sentinel_lightning.measure.statistics import HeadStatistics
from sentinel_lightning.metrics import PerHeadMean
from sentinel_lightning.tiny import save_tiny_model


class PoisonWeight(L.Callback):
    """Sets an output-embedding weight to infinity before training batch number ``at`` (counted over epochs)."""

    def __init__(self, at: int = 2):
        self.at = at
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batches == self.at:
            with torch.no_grad():
                find_causal_lm(pl_module).get_output_embeddings().weight[0, 0] = float("inf")
        self.batches += 1


class NanLossAt(GatedLanguageModel):
    """Its training loss is NaN on the batches listed in ``bad``; its weights stay finite."""

    def __init__(self, bad, **kwargs):
        super().__init__(**kwargs)
        self.bad = set(bad)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx in self.bad else loss


class CountBatches(L.Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1


def fit(callbacks, epochs=1, module=None, **trainer_kwargs):
    L.seed_everything(0)
    module = module or GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    trainer = tiny_trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, tiny_data())
    return module, trainer


def test_a_nan_loss_stops_fit_saying_what_and_when_before_any_update():
    module = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    with pytest.raises(DivergenceError, match=r"the training loss is nan at epoch 1, step 6\b.*learning rate"):
        fit([DivergenceGuard(), PoisonWeight(at=6)], epochs=2, module=module)
    assert len(nonfinite_parameters(module)) == 1  # the poisoned weight only: no step was taken with the NaN loss


def test_the_guard_works_in_a_users_own_module():
    from test_callbacks import PlainHFModule

    module = PlainHFModule()
    with pytest.raises(DivergenceError, match="the training loss is nan at epoch 0, step 1"):
        fit([DivergenceGuard(monitor="val_loss"), PoisonWeight(at=1)], module=module)


def test_a_non_finite_monitored_metric_stops_the_run_before_pruning_decides():
    module = ScriptedPerplexity([float("nan")], model=tiny_model("llama"), learning_rate=1e-3)
    pruning = HeadPruning("random", {0: 0.25})
    with pytest.raises(DivergenceError, match=r"fake_ppl is nan at epoch 0, step 4"):
        fit([DivergenceGuard(monitor="fake_ppl"), pruning], module=module)
    assert pruning.events == [] and module.gates.num_active == 8


def test_skip_mode_skips_the_bad_steps_and_leaves_the_weights_as_they_were():
    module = NanLossAt({1, 2}, model=tiny_model("llama"), learning_rate=1e-3)
    guard = DivergenceGuard(on_nonfinite="skip")

    class Snapshot(L.Callback):
        def __init__(self):
            self.before, self.after = {}, {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before[batch_idx] = [p.detach().clone() for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after[batch_idx] = [p.detach().clone() for p in pl_module.parameters()]

    snapshot = Snapshot()
    with pytest.warns(UserWarning, match=r"skipped the optimizer step at epoch 0, step 2.*\(2 skipped so far\)"):
        fit([guard, HeadMetrics(), snapshot], module=module)
    assert guard.skipped_steps == 2 and not nonfinite_parameters(module)
    for batch_idx in (1, 2):
        assert all(torch.equal(b, a) for b, a in zip(snapshot.before[batch_idx], snapshot.after[batch_idx]))
    assert not all(torch.equal(b, a) for b, a in zip(snapshot.before[3], snapshot.after[3]))


def test_reactivation_takes_no_decision_on_a_non_finite_model():
    module = ScriptedPerplexity([10.0, float("nan")], model=tiny_model("llama"), learning_rate=1e-3)
    reactivation = HeadReactivation(monitor="fake_ppl")
    with pytest.raises(DivergenceError, match=r"fake_ppl is nan at epoch 1.*HeadReactivation takes no decision"):
        fit([HeadMetrics(), HeadPruning("gradient", {0: 0.25}), reactivation], epochs=2, module=module)
    assert reactivation.events == []


def test_an_unlogged_reactivation_monitor_fails_before_the_first_training_batch():
    counter = CountBatches()
    with pytest.raises(RuntimeError, match=r"monitor='val_acc'.*val_ppl"):
        fit([HeadMetrics(), HeadReactivation(monitor="val_acc"), counter])
    assert counter.batches == 0


def test_the_reactivation_check_leaves_the_trainers_sanity_setting_as_it_was():
    _, trainer = fit([HeadMetrics(), HeadReactivation()])
    assert trainer.num_sanity_val_steps == 0


def test_gate_monitor_draws_non_finite_gates_as_missing(tmp_path):
    L.seed_everything(0)
    module = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    monitor = GateMonitor(log_every_n_steps=100)
    trainer = tiny_trainer(logger=logger, limit_train_batches=1, limit_val_batches=0, callbacks=[monitor])
    trainer.fit(module, tiny_data())
    with torch.no_grad():
        module.gates.values[0, :2] = float("nan")
    monitor.log_gates(trainer, module, step=10)
    with torch.no_grad():
        module.gates.values.fill_(float("nan"))
    monitor.log_gates(trainer, module, step=11)  # nothing finite to draw: no histogram, no crash
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0}).Reload()
    histograms = {event.step: event.histogram_value for event in events.Histograms("gates/histogram")}
    assert histograms[10].num == 6 and 11 not in histograms
    assert {10, 11} <= {event.step for event in events.Images("gates/heatmap")}


def test_per_head_means_warn_of_and_count_the_updates_they_leave_out():
    mean = PerHeadMean(1, 2, name="grad_norm")
    with pytest.warns(UserWarning, match=r"grad_norm: an update with 1 non-finite value\(s\) was left out"):
        mean.update(torch.tensor([[1.0, float("nan")]]))
    mean.update(torch.tensor([[3.0, 5.0]]))
    assert torch.equal(mean.compute(), torch.tensor([[3.0, 5.0]])) and mean.total_skipped() == 1
    statistics = HeadStatistics(1, 2)
    with pytest.warns(UserWarning, match="grad_norm"):
        statistics.update_gradient(torch.tensor([[float("inf"), 1.0]]))
    assert {name: n for name, n in statistics.skipped().items() if n} == {"grad_norm": 1}


def test_head_metrics_show_the_skipped_steps_of_a_skipping_run():
    module = NanLossAt({1}, model=tiny_model("llama"), learning_rate=1e-3)
    metrics = HeadMetrics()
    with pytest.warns(UserWarning):
        fit([metrics, DivergenceGuard(on_nonfinite="skip")], module=module)
    skipped = {name: n for name, n in metrics.skipped().items() if n}
    assert skipped == {"grad_norm": 1, "example_importance": 1, "compensated_importance": 1}
    statistics = metrics.compute()
    assert torch.isfinite(statistics["grad_norm"]).all() and metrics.grad_norm.weight == 3


@pytest.fixture
def tiny_model_dir(tmp_path):
    return Path(save_tiny_model(str(tmp_path / "tiny-llama")))


def test_the_cli_exits_non_zero_on_divergence_and_keeps_its_finite_checkpoints(tmp_path, tiny_model_dir, capsys):
    config = {
        "trainer": {
            "max_epochs": 3, "limit_train_batches": 3, "limit_val_batches": 2, "default_root_dir": str(tmp_path),
            "enable_progress_bar": False, "logger": False,
            "callbacks": [{"class_path": "test_divergence.PoisonWeight", "init_args": {"at": 4}}],
        },
        "model": {"model": str(tiny_model_dir), "learning_rate": 1e-3},
        "data": {"block_size": 32, "batch_size": 2, "cache": False},
        "pruning": {"strategy": "random", "schedule": {0: 0.25, 1: 0.5}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert exit_info.value.code == EXIT_DIVERGED != 0
    error = capsys.readouterr().err
    assert "Training diverged: the training loss is nan at epoch 1, step 4" in error
    last = tmp_path / "checkpoints" / "last.ckpt"
    (best,) = (tmp_path / "checkpoints" / "best").glob("*.ckpt")
    assert f"{last} (last)" in error and f"{best} (best val_ppl)" in error
    for checkpoint in (last, best):
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(value).all() for key, value in state.items() if "importance" not in key)
    main(["export", "--ckpt_path", str(best), "--output_dir", str(tmp_path / "pruned")])
    assert "8/8 heads kept" in capsys.readouterr().out  # best: the model epoch 0 validated, before its pruning


def test_export_refuses_a_checkpoint_with_non_finite_weights(tmp_path):
    module = GatedLanguageModel(tiny_model("llama"))
    trainer = tiny_trainer()
    trainer.strategy.connect(module)
    with torch.no_grad():
        module.gates.values[1, 2] = float("nan")
    trainer.save_checkpoint(tmp_path / "nan.ckpt")
    message = r"nan.ckpt' holds non-finite .* in 1 weight or gate tensor\(s\) \(.*gates.values"
    with pytest.raises(ValueError, match=message):
        main(["export", "--ckpt_path", str(tmp_path / "nan.ckpt"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


class NanLossOnRankOne(GatedLanguageModel):
    """Its training loss is NaN on rank 1 only, at the second batch."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_rank == 1 and batch_idx == 1 else loss


def test_every_ddp_rank_stops_when_one_rank_diverges():
    L.seed_everything(0)
    module = NanLossOnRankOne(tiny_model("llama"), learning_rate=1e-3)
    trainer = tiny_trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", limit_train_batches=3, callbacks=[DivergenceGuard()]
    )
    with pytest.raises(Exception, match=r"Training diverged: the training loss is (nan|non-finite on another process)"):
        trainer.fit(module, tiny_data())  # both ranks raise: neither waits for the other in backward


def test_the_nonfinite_check_names_the_weights_and_gates_it_finds():
    from sentinel_lightning.checks import SHOWN_NAMES, describe_nonfinite

    model = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(SHOWN_NAMES + 1)))
    assert nonfinite_parameters(model) == []
    with torch.no_grad():
        for layer in model:
            layer.bias[0] = float("inf")
    names = nonfinite_parameters(model)
    assert names == [f"{index}.bias" for index in range(SHOWN_NAMES + 1)]
    described = describe_nonfinite(names)
    assert described.startswith(f"non-finite (NaN or infinite) values in {SHOWN_NAMES + 1} weight or gate tensor(s)")
    assert f"{SHOWN_NAMES - 1}.bias, ...)" in described and f"{SHOWN_NAMES}.bias" not in described
