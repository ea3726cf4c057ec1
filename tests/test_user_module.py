"""The callbacks on a user's own LightningModule whose batches are tuples, not dicts: entropy comes from the
module's own training step, whatever its batch format."""

import glob
import os

import lightning as L
import torch
from conftest import VOCAB, tiny_model, tiny_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from sentinel_lightning import GateMonitor, HeadMetrics, HeadPruning, find_gates
from sentinel_lightning.events import ModuleHeadEventListener, PruningAwareModule
from sentinel_lightning.measure.attention_entropy import attention_entropy


class TupleBatchModule(L.LightningModule):
    """A user's module around a plain Hugging Face model, fed ``(input_ids,)`` tuples from a TensorDataset."""

    def __init__(self, family="gpt2", learning_rate=1e-3):
        super().__init__()
        self.lm = tiny_model(family).train()
        self.learning_rate = learning_rate

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return self.lm(input_ids=input_ids, labels=input_ids).loss

    def validation_step(self, batch, batch_idx):
        (input_ids,) = batch
        self.log("val_loss", self.lm(input_ids=input_ids, labels=input_ids).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.learning_rate)


def tuple_loader(num_blocks=16, length=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randint(3, VOCAB, (num_blocks, length), generator=generator)), batch_size=4)


def test_entropy_strategy_prunes_a_tuple_batch_module_and_events_record_its_monitor():
    L.seed_everything(0)
    module = TupleBatchModule()
    metrics = HeadMetrics(entropy_every_n_steps=2, reset_on_prune=False)
    pruning = HeadPruning("entropy", {0: 0.25}, monitor="val_loss")
    trainer = tiny_trainer(max_epochs=1, callbacks=[metrics, pruning])
    trainer.fit(module, tuple_loader(), tuple_loader(seed=1))
    assert find_gates(module).num_active == 6
    assert metrics.entropy.weight == 2 * 4 * 24  # batches 0 and 2 of 4 recorded, every token of 4 x 24 a query
    (event,) = pruning.events
    assert len(event.heads) == 2 and event.monitor == "val_loss"
    assert event.value == float(trainer.callback_metrics["val_loss"])  # validated before the epoch's end


def test_recorded_entropy_equals_a_separate_measurement_of_the_same_batch():
    L.seed_everything(0)
    module = TupleBatchModule(family="llama", learning_rate=0.5)  # llama: no dropout, so train mode = eval mode
    initial = tiny_model("llama")
    metrics = HeadMetrics(entropy_every_n_steps=1)
    loader = tuple_loader(num_blocks=4)
    tiny_trainer(max_epochs=1, limit_train_batches=1, callbacks=[metrics]).fit(module, loader)
    (input_ids,) = next(iter(loader))
    sums, count = attention_entropy(initial, input_ids)  # the weights the recorded forward ran with
    assert torch.allclose(metrics.compute()["entropy"], sums / count, atol=1e-5)
    assert module.lm.config._attn_implementation == "sdpa"  # the fast kernel is back after the recorded step


def test_gate_monitor_draws_the_entropy_heatmap_of_a_tuple_batch_module(tmp_path):
    L.seed_everything(0)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = tiny_trainer(
        max_epochs=1, logger=logger, log_every_n_steps=1, limit_val_batches=0,
        callbacks=[HeadMetrics(entropy_every_n_steps=1), GateMonitor(log_every_n_steps=2)],
    )
    trainer.fit(TupleBatchModule(), tuple_loader())
    (event_file,) = glob.glob(os.path.join(logger.log_dir, "events.out.tfevents.*"))
    events = EventAccumulator(event_file, size_guidance={"images": 0})
    events.Reload()
    assert "head_metrics/entropy" in events.Tags()["images"]


class RankDecisions(L.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        metrics = next(cb for cb in trainer.callbacks if isinstance(cb, HeadMetrics))
        local_weight = metrics.entropy.weight.clone()
        torch.save(
            {"active": find_gates(pl_module).active, "entropy_weight": local_weight},
            f"{self.folder}/rank{trainer.global_rank}.pt",
        )


def test_ddp_ranks_take_one_entropy_decision_on_tuple_batches(tmp_path):
    L.seed_everything(0)
    callbacks = [
        HeadMetrics(entropy_every_n_steps=1, reset_on_prune=False),
        HeadPruning("entropy", {0: 0.25, 1: 0.5}, monitor="val_loss"),
        RankDecisions(str(tmp_path)),
    ]
    trainer = tiny_trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, limit_train_batches=2,
                           callbacks=callbacks)
    trainer.fit(TupleBatchModule(), tuple_loader(), tuple_loader(seed=1))
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1))
    assert torch.equal(rank0["active"], rank1["active"]) and int(rank0["active"].sum()) == 4
    assert rank0["entropy_weight"] > 0 and rank1["entropy_weight"] > 0  # each rank recorded its own batches


class ListeningModule(TupleBatchModule):
    """A user's module that hears the pruning through the module protocols of ``events`` (no library base class)."""

    def __init__(self):
        super().__init__(family="llama")
        self.heard = []

    def on_before_prune(self, trainer, heads):
        self.heard.append(("before_prune", sorted(heads), find_gates(self).num_active))

    def on_head_event(self, trainer, event):
        self.heard.append((event.kind, sorted(event.heads), find_gates(self).num_active))


def test_a_users_module_hears_the_pruning_before_and_after_the_gates_change():
    L.seed_everything(0)
    module = ListeningModule()
    assert isinstance(module, ModuleHeadEventListener) and isinstance(module, PruningAwareModule)
    assert not isinstance(TupleBatchModule(), ModuleHeadEventListener)
    pruning = HeadPruning("gradient", {0: 0.25})
    tiny_trainer(max_epochs=1, callbacks=[HeadMetrics(), pruning]).fit(module, tuple_loader())
    (event,) = pruning.events
    heads = sorted(event.heads)
    assert module.heard == [("before_prune", heads, 8), ("prune", heads, 6)]
