"""Measures what ``HeadMetrics`` adds to a training step: the entropy pass and the gate-gradient read.

A training step (forward, backward, AdamW) of the gated model is timed against the extra eval-mode entropy pass
that ``HeadMetrics`` runs on one batch in ``entropy_every_n_steps``, interleaved, medians over repeats. The
amortised overhead is ``entropy_pass / entropy_every_n_steps / step``. Writes
``pruning_results/callback_overhead.json`` and ``.md``.

    python scripts/measure_callback_overhead.py               # the embedded default, batch 4 x 256
    python scripts/measure_callback_overhead.py --quick       # a tiny model, for the tests
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.progress import track

from sentinel_lightning import GatedLanguageModel
from sentinel_lightning.attention_entropy import attention_entropy
from sentinel_lightning.callbacks.head_metrics import HeadMetrics


def _tiny_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )
    return AutoModelForCausalLM.from_config(config)


def measure(module: GatedLanguageModel, batch: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of a training step and of one entropy pass on ``batch`` ``[batch, seq]``."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    module.train()

    def step() -> None:
        loss = module.training_step({"input_ids": batch}, 0)
        loss.backward()
        module.gates.values.grad.abs()  # what HeadMetrics reads before each optimizer step
        optimizer.step()
        optimizer.zero_grad()

    def entropy_pass() -> None:
        attention_entropy(module.model, batch)

    step(), entropy_pass()  # warm-up
    times = {"step": [], "entropy_pass": []}
    for _ in track(range(repeats), description="timing"):
        for name, run in (("step", step), ("entropy_pass", entropy_pass)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="hub name or local path; default: the embedded model")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a tiny model and few repeats (for the tests)")
    parser.add_argument("--output-dir", default="pruning_results")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.quick:
        module, vocab, args.repeats, args.block_size = GatedLanguageModel(_tiny_model()), 512, 2, 32
    else:
        module = GatedLanguageModel(args.model)
        vocab = module.model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch_size, args.block_size))
    timings = measure(module, batch, args.repeats)
    every = HeadMetrics().entropy_every_n_steps
    result = {
        "model": args.model or ("tiny llama" if args.quick else "embedded SmolLM2-135M-Instruct"),
        "batch": [args.batch_size, args.block_size],
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "step_seconds": timings["step"],
        "entropy_pass_seconds": timings["entropy_pass"],
        "entropy_every_n_steps": every,
        "entropy_pass_over_step": timings["entropy_pass"] / timings["step"],
        "amortised_overhead": timings["entropy_pass"] / every / timings["step"],
    }
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "callback_overhead.json").write_text(json.dumps(result, indent=2))
    (output / "callback_overhead.md").write_text(
        f"| model | batch | training step (s) | entropy pass (s) | pass / step | every n steps | overhead |\n"
        f"|---|---|---|---|---|---|---|\n"
        f"| {result['model']} | {args.batch_size} x {args.block_size} | {result['step_seconds']:.3f} | "
        f"{result['entropy_pass_seconds']:.3f} | {result['entropy_pass_over_step']:.3f} | {every} | "
        f"{result['amortised_overhead']:.2%} |\n"
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
