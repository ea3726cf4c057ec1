"""The fine-tune-with-pruning job from Python: the same run as ``sentinel-lightning fit``, for users who prefer a script.

    python scripts/finetune_prune.py                                  # embedded SmolLM2-135M, gradient pruning
    python scripts/finetune_prune.py --strategy entropy --epochs 6 --train-batches 50
    python scripts/finetune_prune.py --quick                          # a tiny model, for the tests
"""

from __future__ import annotations

import argparse
import json

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from sentinel_lightning import (
    GatedLanguageModel,
    GateMonitor,
    HeadMetrics,
    HeadPruning,
    HeadReactivation,
    LanguageModelingDataModule,
)
from sentinel_lightning.pretrained import byte_level_tokenizer


def _tiny_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=256, eos_token_id=256, pad_token_id=256,
    )
    return AutoModelForCausalLM.from_config(config)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="hub name or local path; default: the embedded model")
    parser.add_argument("--strategy", default="gradient", choices=["entropy", "gradient", "random"])
    parser.add_argument("--schedule", default='{"0": 0.1, "1": 0.2, "2": 0.3}', help="JSON: epoch -> fraction")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-batches", type=int, default=8, help="training batches per epoch")
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--log-dir", default="lightning_logs")
    parser.add_argument("--quick", action="store_true", help="a tiny random model and the byte-level tokenizer")
    args = parser.parse_args(argv)
    schedule = {int(epoch): float(target) for epoch, target in json.loads(args.schedule).items()}

    L.seed_everything(0)
    if args.quick:
        model, tokenizer, args.block_size = GatedLanguageModel(_tiny_model(), learning_rate=1e-3), byte_level_tokenizer(), 32
    else:
        model, tokenizer = GatedLanguageModel(args.model, learning_rate=args.learning_rate), args.model
    data = LanguageModelingDataModule(tokenizer=tokenizer, block_size=args.block_size, batch_size=args.batch_size)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.train_batches,
        limit_val_batches=args.val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        gradient_clip_val=1.0,
        logger=TensorBoardLogger(args.log_dir, name=""),
        callbacks=[
            HeadMetrics(),
            HeadPruning(args.strategy, schedule),
            HeadReactivation(monitor="val_ppl"),
            GateMonitor(log_every_n_steps=4),
            RichProgressBar(),
        ],
    )
    before = trainer.validate(model, data, verbose=False)[0]["val_ppl"]
    trainer.fit(model, data)
    after = trainer.validate(model, data, verbose=False)[0]["val_ppl"]
    result = {
        "val_ppl_before": before,
        "val_ppl_after": after,
        "pruned_fraction": model.gates.sparsity,
        "pruned_heads": model.gates.pruned_heads(),
        "checkpoint": trainer.checkpoint_callback.best_model_path,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
