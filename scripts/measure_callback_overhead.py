"""Measures what ``HeadMetrics`` adds to a training step: the entropy-recording step and the gate-gradient read.

On one batch in ``entropy_every_n_steps`` ``HeadMetrics`` lets the module's own training step run with the
entropy-recording (eager) attention instead of the model's fast kernel. This script times a plain training step
(forward, backward, AdamW) of the gated model against the same step while an ``EntropyRecording`` is open, in
interleaved pairs, and reports the median of the per-pair ratios. The amortised overhead is
``(recorded / plain - 1) / entropy_every_n_steps``. Writes ``pruning_results/callback_overhead.json`` and ``.md``.

    python scripts/measure_callback_overhead.py               # the embedded default, batch 4 x 256
    python scripts/measure_callback_overhead.py --quick       # a tiny model, for the tests
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.progress import track

from sentinel_lightning import GatedLanguageModel, HeadMetrics
from sentinel_lightning.attention_entropy import EntropyRecording
from sentinel_lightning.tiny import tiny_model


def measure(module: GatedLanguageModel, batch: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds of ``repeats`` interleaved pairs of a plain and an entropy-recording training step on ``batch``."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    module.train()

    def step() -> None:
        loss = module.training_step({"input_ids": batch}, 0)
        loss.backward()
        module.gates.values.grad.abs()  # what HeadMetrics reads before each optimizer step
        optimizer.step()
        optimizer.zero_grad()

    def recorded_step() -> None:
        with EntropyRecording(module.model):
            step()

    step(), recorded_step()  # warm-up
    times: dict[str, list[float]] = {"step": [], "recorded_step": []}
    for index in track(range(repeats), description="timing"):
        pair = (("step", step), ("recorded_step", recorded_step))
        for name, run in pair if index % 2 == 0 else pair[::-1]:  # alternate which goes first
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="hub name or local path; default: the embedded model")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="a tiny model and few repeats (for the tests)")
    parser.add_argument("--output-dir", default="pruning_results")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.quick:
        module, args.repeats, args.block_size = GatedLanguageModel(tiny_model("llama")), 2, 32
    else:
        module = GatedLanguageModel(args.model)
    batch = torch.randint(0, module.model.config.vocab_size, (args.batch_size, args.block_size))
    times = measure(module, batch, args.repeats)
    ratios = [recorded / plain for plain, recorded in zip(times["step"], times["recorded_step"])]
    every = HeadMetrics().entropy_every_n_steps
    ratio = statistics.median(ratios)
    result = {
        "model": args.model or ("tiny llama" if args.quick else "embedded SmolLM2-135M-Instruct"),
        "batch": [args.batch_size, args.block_size],
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "repeats": args.repeats,
        "step_seconds": statistics.median(times["step"]),
        "recorded_step_seconds": statistics.median(times["recorded_step"]),
        "recorded_over_plain": ratio,
        "recorded_over_plain_pairs": ratios,
        "entropy_every_n_steps": every,
        "amortised_overhead": (ratio - 1.0) / every,
    }
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "callback_overhead.json").write_text(json.dumps(result, indent=2))
    (output / "callback_overhead.md").write_text(
        "| model | batch | plain step (s) | recording step (s) | recording / plain (median of pairs) "
        "| every n steps | amortised overhead |\n|---|---|---|---|---|---|---|\n"
        f"| {result['model']} | {args.batch_size} x {args.block_size} | {result['step_seconds']:.3f} | "
        f"{result['recorded_step_seconds']:.3f} | {ratio:.3f} | {every} | {result['amortised_overhead']:.2%} |\n"
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
