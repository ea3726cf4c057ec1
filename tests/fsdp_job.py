"""A tiny pruning job on two CPU processes, launched by ``torch.distributed.run`` (tests/test_fsdp.py).

``--strategy fsdp``: Lightning's ``ModelParallelStrategy`` (FSDP2 over the two ranks, full checkpoints, or with
``--sharded_checkpoints`` folders of one shard per rank, Lightning's default); ``ddp``: plain DDP, the reference.
Every rank saves what it decided to ``<out>/rank<r>.pt``; checkpoints go to ``<out>/ckpt``.
"""

import argparse
import os

import lightning as L
import torch
from conftest import tiny_data, tiny_model, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from sentinel_lightning import GatedLanguageModel, HeadMetrics, HeadPruning, HeadReactivation, find_gates
from sentinel_lightning.sharding import is_sharded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["fsdp", "ddp"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--sharded_checkpoints", action="store_true", help="one shard per rank in a folder")
    args = parser.parse_args()
    L.seed_everything(0)
    module = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    metrics = HeadMetrics(entropy_every_n_steps=2)
    pruning = HeadPruning("gradient_compensated", schedule={0: 0.25, 1: 0.5}, compensate="linear")
    checkpoints = ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), save_top_k=-1, every_n_epochs=1)
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=args.sharded_checkpoints
    )
    trainer = tiny_trainer(
        devices=2,
        strategy=strategy if args.strategy == "fsdp" else "ddp",
        max_epochs=args.epochs,
        limit_train_batches=3,
        gradient_clip_val=0.5,
        enable_checkpointing=True,
        callbacks=[metrics, pruning, HeadReactivation(), checkpoints],
    )
    trainer.fit(module, tiny_data(), ckpt_path=args.resume)
    gates = find_gates(module)
    layer = module.model.model.layers[0].self_attn.q_proj.weight
    torch.save(
        {
            "active": gates.active.clone(),
            "values": gates.values.detach().clone(),
            "reconstruction": gates.reconstruction.clone(),
            "events": [event.to_dict() for event in pruning.events],
            "val_ppl": float(trainer.callback_metrics["val_ppl"]),
            "grad_norm": metrics.compute()["grad_norm"],  # a collective: every rank calls it
            "sharded": is_sharded(layer),
            "gates_sharded": is_sharded(gates.values),
        },
        os.path.join(args.out, f"rank{trainer.global_rank}.pt"),
    )
    # Every rank ends its process group before the interpreter exits: a loaded machine once aborted a rank at exit
    # ("terminate called without an active exception") with the group's threads still alive.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
