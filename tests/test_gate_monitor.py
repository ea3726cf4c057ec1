import csv
import glob
import os

import lightning as L
import pytest
import torch
from conftest import tiny_data, tiny_model, tiny_trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sentinel_lightning import GatedLanguageModel
from sentinel_lightning.callbacks.gate_monitor import GateMonitor
from sentinel_lightning.events import HeadEvent, notify_head_event
from sentinel_lightning.heatmaps import render_heatmap


class PruneAfterTraining(L.Callback):
    """Prunes two heads when training ends and announces it, as a pruning callback does."""

    def on_train_end(self, trainer, pl_module):
        pl_module.gates.prune([(0, 1), (1, 3)])
        event = HeadEvent(
            "prune",
            trainer.current_epoch,
            trainer.global_step,
            [(0, 1), (1, 3)],
            "test pruning",
            value=12.5,
            sparsity=pl_module.gates.sparsity,
        )
        notify_head_event(trainer, pl_module, event)


def read_events(log_dir: str) -> EventAccumulator:
    (event_file,) = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    accumulator = EventAccumulator(event_file, size_guidance={"images": 0, "histograms": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    """A tiny run with a TensorBoardLogger, HeadMetrics and a pruning event at the end."""
    from sentinel_lightning.callbacks.head_metrics import HeadMetrics

    L.seed_everything(0)
    module = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    logger = TensorBoardLogger(str(tmp_path_factory.mktemp("tb")), name="run")
    trainer = tiny_trainer(
        logger=logger,
        limit_train_batches=4,
        limit_val_batches=0,
        log_every_n_steps=1,
        callbacks=[HeadMetrics(entropy_every_n_steps=1), GateMonitor(log_every_n_steps=2), PruneAfterTraining()],
    )
    trainer.fit(module, tiny_data())
    return read_events(logger.log_dir), module


def test_tensorboard_gets_images_histogram_and_scalars(tensorboard_run):
    events, _ = tensorboard_run
    tags = events.Tags()
    assert {"gates/heatmap", "head_metrics/entropy", "head_metrics/grad_norm"} <= set(tags["images"])
    assert "gates/histogram" in tags["histograms"]
    assert {"gates/active_fraction", "gates_active_heads/layer_0", "gates_active_heads/layer_1"} <= set(tags["scalars"])
    # Logged at the start (step 0), every 2 steps (2, 4) and at the pruning event (step 4).
    assert sorted({event.step for event in events.Images("gates/heatmap")}) == [0, 2, 4]
    image = events.Images("gates/heatmap")[-1]
    assert image.width > 300 and image.height > 200
    fractions = [event.value for event in events.Scalars("gates/active_fraction")]
    assert fractions[0] == 1.0 and fractions[-1] == pytest.approx(6 / 8)
    layer_1 = [event.value for event in events.Scalars("gates_active_heads/layer_1")]
    assert layer_1[0] == 4 and layer_1[-1] == 3
    histogram = events.Histograms("gates/histogram")[-1].histogram_value
    assert histogram.num == 8 and histogram.min == 0.0


def test_pruning_event_appears_as_text(tensorboard_run):
    events, _ = tensorboard_run
    (text,) = events.Tensors("gates/events/text_summary")
    message = text.tensor_proto.string_val[0].decode()
    assert "**prune** 2 head(s)" in message and "L0 (H1), L1 (H3)" in message and "test pruning" in message
    assert "12.500" in message and text.step == 4


def test_csv_logger_gets_scalars_and_no_logger_does_nothing(tmp_path):
    module = GatedLanguageModel(tiny_model("gpt2"))
    logger = CSVLogger(str(tmp_path), name="csv")
    monitor = GateMonitor(log_every_n_steps=1)
    trainer = tiny_trainer(
        logger=logger, limit_train_batches=2, limit_val_batches=0, callbacks=[monitor, PruneAfterTraining()]
    )
    trainer.fit(module, tiny_data())
    with open(os.path.join(logger.log_dir, "metrics.csv")) as file:
        rows = list(csv.DictReader(file))
    fractions = [float(row["gates/active_fraction"]) for row in rows if row.get("gates/active_fraction")]
    assert fractions[0] == 1.0 and fractions[-1] == pytest.approx(6 / 8)

    quiet = GatedLanguageModel(tiny_model("gpt2"))
    trainer = tiny_trainer(
        logger=False, limit_train_batches=2, limit_val_batches=0, callbacks=[GateMonitor(1), PruneAfterTraining()]
    )
    trainer.fit(quiet, tiny_data())
    assert quiet.gates.num_active == 6


def test_log_every_n_steps_is_validated():
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match="log_every_n_steps"):
            GateMonitor(log_every_n_steps=bad)


def test_heatmap_marks_pruned_heads_and_missing_values():
    values = torch.tensor([[1.0, 0.5, 0.0], [0.2, float("nan"), 0.9]])  # [num_layers=2, num_heads=3]
    pruned = torch.tensor([[False, False, True], [False, False, False]])
    image = render_heatmap(values, "test", "gate value", pruned, 0.0, 1.0)
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[2] == 3
    grey = torch.tensor([200, 200, 200], dtype=torch.uint8)  # the pruned cells' colour

    def grey_pixels(picture):
        return int((picture == grey).all(dim=-1).sum())

    assert grey_pixels(image) > 300  # one hatched grey cell, plus the legend's swatch
    plain = render_heatmap(values, "test", "gate value", None, 0.0, 1.0)
    assert grey_pixels(plain) < 50  # at most a few anti-aliased pixels of the text
