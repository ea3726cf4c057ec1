"""Two CPU processes under DDP: different batches, metrics reduced over both ranks, one pruning decision."""

import lightning as L
import torch
from conftest import tiny_data, tiny_model, tiny_trainer

from sentinel_lightning import GatedLanguageModel, HeadMetrics, HeadPruning, HeadReactivation, find_gates


class RankRecorder(L.Callback):
    """Saves, on every rank, what that rank saw and decided."""

    def __init__(self, folder):
        self.folder = folder
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.extend((trainer.current_epoch, tuple(row.tolist())) for row in batch["input_ids"])

    def on_train_end(self, trainer, pl_module):
        metrics = next(cb for cb in trainer.callbacks if isinstance(cb, HeadMetrics))
        local = {"total": metrics.grad_norm.total.clone(), "weight": metrics.grad_norm.weight.clone()}
        reduced = metrics.compute()["grad_norm"]  # a collective: every rank calls it here
        gates = find_gates(pl_module)
        events = [event.to_dict() for event in trainer.callbacks[1].events]
        torch.save(
            {
                "active": gates.active,
                "values": gates.values.detach(),
                "batches": self.batches,
                "local": local,
                "reduced": reduced,
                "events": events,
            },
            f"{self.folder}/rank{trainer.global_rank}.pt",
        )


def test_two_processes_share_metrics_and_decisions(tmp_path):
    L.seed_everything(0)
    module = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    callbacks = [
        HeadMetrics(entropy_every_n_steps=2, reset_on_prune=False),
        HeadPruning("gradient", schedule={0: 0.25, 1: 0.5}),
        HeadReactivation(),
        RankRecorder(str(tmp_path)),
    ]
    trainer = tiny_trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, limit_train_batches=3, callbacks=callbacks
    )
    trainer.fit(module, tiny_data())
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for epoch in (0, 1):  # each rank saw its own blocks (a few blocks of the corpus repeat, e.g. rules of dashes)
        seen0, seen1 = ([block for e, block in rank["batches"] if e == epoch] for rank in (rank0, rank1))
        assert len(seen0) == len(seen1) == 12 and len(set(seen0) & set(seen1)) <= 2
    assert torch.equal(rank0["active"], rank1["active"]) and int(rank0["active"].sum()) == 4
    assert torch.equal(rank0["values"], rank1["values"])
    assert rank0["events"] == rank1["events"] and len(rank0["events"]) == 2
    expected = (rank0["local"]["total"] + rank1["local"]["total"]) / (
        rank0["local"]["weight"] + rank1["local"]["weight"]
    )
    assert torch.allclose(rank0["reduced"], expected.float()) and torch.equal(rank0["reduced"], rank1["reduced"])
